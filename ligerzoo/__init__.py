"""ligerzoo: Llama-family models written from scratch on their own Triton kernels."""

__version__ = "0.1.0"
