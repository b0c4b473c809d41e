"""ligerzoo: Llama-family models written from scratch on their own Triton kernels."""

from ligerzoo.checkpoint import from_pretrained

__version__ = "0.1.0"

__all__ = ["__version__", "from_pretrained"]
