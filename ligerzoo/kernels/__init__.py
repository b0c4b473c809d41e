"""ligerzoo's Triton kernels: each file holds one kernel's forward and backward, its launchers
(registered as torch.library ops so they trace inside torch.compile), its autograd.Function and
its public function or module."""

from ligerzoo.kernels._utils import IGNORE_INDEX
from ligerzoo.kernels.cross_entropy import CrossEntropyLoss, cross_entropy
from ligerzoo.kernels.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from ligerzoo.kernels.rms_norm import RMSNorm, add_rms_norm, rms_norm
from ligerzoo.kernels.rope import apply_rope, apply_rope_qkv
from ligerzoo.kernels.swiglu import swiglu, swiglu_packed

__all__ = [
    "IGNORE_INDEX",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "RMSNorm",
    "add_rms_norm",
    "apply_rope",
    "apply_rope_qkv",
    "cross_entropy",
    "linear_cross_entropy",
    "rms_norm",
    "swiglu",
    "swiglu_packed",
]

# FP8 training (issue 23): the casts, the scaled product and the FP8 linear layer.
from ligerzoo.kernels.float8 import Float8Rows, quantize_rows, quantize_tensor, scaled_mm
from ligerzoo.kernels.float8_fused import (
    add_rms_norm_linear,
    add_rms_norm_mlp,
    rms_norm_linear,
    swiglu_linear,
)
from ligerzoo.kernels.float8_linear import Float8Weight, float8_linear, quantize_weight

__all__ += ["Float8Rows", "Float8Weight", "add_rms_norm_linear", "add_rms_norm_mlp", "float8_linear",
            "quantize_rows", "quantize_tensor", "quantize_weight", "rms_norm_linear", "scaled_mm",
            "swiglu_linear"]
