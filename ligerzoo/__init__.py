"""ligerzoo: Llama-family models written from scratch on their own Triton kernels.

The top-level names are imported on first use, so that `import ligerzoo.cli` (and `ligerzoo
--help`) or reading a tokenizer does not import torch and Triton.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "from_pretrained": "ligerzoo.hf.pretrained",
    "generate": "ligerzoo.inference",
    "load_tokenizer": "ligerzoo.tokenizer",
}

if TYPE_CHECKING:
    from ligerzoo.hf.pretrained import from_pretrained
    from ligerzoo.inference import generate
    from ligerzoo.tokenizer import load_tokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ligerzoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = ["__version__", "from_pretrained", "generate", "load_tokenizer"]
