"""RMSNorm, Llama's: x[8192, 4096] and a weight, eps 1e-6."""

from functools import partial

import torch

from .case import Case, autograd_reference, compiled, liger_ops, ligerzoo_kernel, randn

EPS = 1e-6
GRAD_INPUTS = ("x", "w")
OUTPUTS = ("y",)


def sizes(small: bool) -> tuple[int, int]:
    """(rows, hidden), shared with add+RMSNorm."""
    return (64, 384) if small else (8192, 4096)


def eager_rms_norm(x, w):
    # transformers LlamaRMSNorm.forward
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype)


def rms_norm64(t):
    x, w = t["x"], t["w"]
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w,)


def reference(master):
    return autograd_reference(master, rms_norm64, GRAD_INPUTS, OUTPUTS)


def make_inputs(n, h, dev, g):
    return {
        "x": randn((n, h), dev, g),
        "w": randn((h,), dev, g, 0.1, 1.0),
        "grad:y": randn((n, h), dev, g),
    }


def bytes_moved(n, h, direction):
    # fwd: read x, w; write y. bwd: read x, w, dy; write dx, dw.
    return 2.0 * ((2 * n * h + h) if direction == "fwd" else (5 * n * h + 3 * h))


def build_eager():
    return lambda t: (eager_rms_norm(t["x"], t["w"]),)


def build_compile():
    fn = compiled(eager_rms_norm)
    return lambda t: (fn(t["x"], t["w"]),)


LIGER_NOTE = (
    "liger: LigerRMSNormFunction with in_place=True (its Llama patch's setting): backward writes dx over dy"
)


def build_liger():
    fn = liger_ops().LigerRMSNormFunction
    # (X, W, eps, offset, casting_mode, in_place, row_mode): LigerRMSNorm's Llama defaults
    return lambda t: (fn.apply(t["x"], t["w"], EPS, 0.0, "llama", True),)


def build_ligerzoo():
    fn = ligerzoo_kernel("rms_norm", "rms_norm")
    return lambda t: (fn(t["x"], t["w"], EPS),)


def cases(small: bool) -> list[Case]:
    n, h = sizes(small)
    case = Case(
        name="rms_norm",
        label="RMSNorm",
        shape=f"x[{n},{h}]",
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
