"""ligerzoo: Llama-family models written from scratch on their own Triton kernels."""

from ligerzoo.checkpoint import from_pretrained
from ligerzoo.generate import generate
from ligerzoo.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["__version__", "from_pretrained", "generate", "load_tokenizer"]
