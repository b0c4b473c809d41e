"""add + RMSNorm, a decoder layer's residual step: residual = x + residual; y = norm(residual)."""

from functools import partial

import torch

from .case import Case, autograd_reference, compiled, liger_ops, ligerzoo_kernel, randn
from .rms_norm import EPS, sizes

GRAD_INPUTS = ("x", "residual", "w")
OUTPUTS = ("y", "sum")


def eager_add_rms_norm(x, r, w):
    # decoder layer: residual = residual + hidden; hidden = norm(residual)
    s = x + r
    dtype = s.dtype
    h = s.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype), s


def add_rms_norm64(t):
    s = t["x"] + t["residual"]
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * t["w"], s


def reference(master):
    return autograd_reference(master, add_rms_norm64, GRAD_INPUTS, OUTPUTS)


def make_inputs(n, h, dev, g):
    return {
        "x": randn((n, h), dev, g),
        "residual": randn((n, h), dev, g),
        "w": randn((h,), dev, g, 0.1, 1.0),
        "grad:y": randn((n, h), dev, g),
        "grad:sum": randn((n, h), dev, g),
    }


def bytes_moved(n, h, direction):
    # fwd: read x, r, w; write y, sum. bwd: read dy, dsum, sum, w; write d(x+r) (one tensor), dw.
    return 2.0 * ((4 * n * h + h) if direction == "fwd" else (8 * n * h + 3 * h))


def build_eager():
    return lambda t: eager_add_rms_norm(t["x"], t["residual"], t["w"])


def build_compile():
    fn = compiled(eager_add_rms_norm)
    return lambda t: fn(t["x"], t["residual"], t["w"])


LIGER_NOTE = (
    "liger: LigerFusedAddRMSNormFunction (in_place=False, the LigerFusedAddRMSNorm module default); "
    "Liger's Llama patch does not use it"
)


def build_liger():
    fn = getattr(liger_ops(), "LigerFusedAddRMSNormFunction", None)
    if fn is None:
        raise RuntimeError("this liger-kernel has no fused add-rmsnorm")
    # (X, R, W, eps, offset, casting_mode, in_place): LigerFusedAddRMSNorm module defaults
    return lambda t: fn.apply(t["x"], t["residual"], t["w"], EPS, 0.0, "llama", False)


def build_ligerzoo():
    fn = ligerzoo_kernel("rms_norm", "add_rms_norm")
    return lambda t: fn(t["x"], t["residual"], t["w"], EPS)


def cases(small: bool) -> list[Case]:
    n, h = sizes(small)
    case = Case(
        name="add_rms_norm",
        label="add+RMSNorm",
        shape=f"x,r[{n},{h}]",
        make=partial(make_inputs, n, h),
        grad_inputs=GRAD_INPUTS,
        out_names=OUTPUTS,
        peers={
            "eager": build_eager,
            "compile": build_compile,
            "liger": build_liger,
            "ligerzoo": build_ligerzoo,
        },
        reference=reference,
        work=partial(bytes_moved, n, h),
        notes=[LIGER_NOTE],
    )
    return [case]
