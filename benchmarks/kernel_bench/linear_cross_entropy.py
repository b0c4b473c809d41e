"""Fused linear cross-entropy (the LM head and its loss), two heads over Llama 3's vocabulary:
h[8192, 4096] (8B) and h[16384, 2048] (Llama-3.2-1B)."""

import math
from functools import partial

import torch
import torch.nn.functional as F

from .case import IGNORE, Case, compiled, liger_ops, ligerzoo_kernel, randn, targets
from .cross_entropy import loss_and_grad_rows64

# (--only name, table label, rows, hidden)
HEADS = [
    ("linear_cross_entropy", "LinearCE", 8192, 4096),
    ("linear_cross_entropy_1b", "LinearCE (1B head)", 16384, 2048),
]
SMALL_HEADS = [
    ("linear_cross_entropy", "LinearCE", 64, 128),
    ("linear_cross_entropy_1b", "LinearCE (1B head)", 128, 64),
]


def eager_linear_cross_entropy(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.t()).float(), target, ignore_index=IGNORE)


def reference(master, chunk=1024):
    """float64 loss and gradients, by hand in row chunks (float64 logits [N, V] would not fit)."""
    h, w, target = master["hidden"], master["weight"], master["target"]
    n_valid = int((target != IGNORE).sum())
    w64 = w.double()
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dw64 = torch.zeros_like(w64)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], chunk):
        h64 = h[i : i + chunk].double()
        ls, g = loss_and_grad_rows64(h64 @ w64.t(), target[i : i + chunk])
        g /= n_valid
        loss += ls
        dh[i : i + chunk] = g @ w64
        dw64.addmm_(g.t(), h64)
        del g, h64
    dw = dw64.float()
    del dw64, w64
    return {"loss": (loss / n_valid).float(), "dhidden": dh, "dweight": dw}


def make_inputs(n, h, v, dev, g):
    return {
        "hidden": randn((n, h), dev, g),
        "weight": randn((v, h), dev, g, 2.0 / math.sqrt(h)),  # logits ~ N(0, 4)
        "target": targets(n, v, dev, g),
    }


def flops(n, h, v, direction):
    # fwd: the logits matmul. fwd+bwd: that and the two gradient matmuls.
    return (2.0 if direction == "fwd" else 6.0) * n * h * v


def build_eager():
    return lambda t: (eager_linear_cross_entropy(t["hidden"], t["weight"], t["target"]),)


def build_compile():
    fn = compiled(eager_linear_cross_entropy)
    return lambda t: (fn(t["hidden"], t["weight"], t["target"]),)


LIGER_NOTE = (
    "liger LCE: computes dh/dW during the forward when inputs require grad; the fwd rows use "
    "inputs that do not, so every peer does only the logits matmul there"
)


def build_liger():
    fn = liger_ops().LigerFusedLinearCrossEntropyFunction
    # (_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    #  label_smoothing, reduction, ...): accum_dtype None, as Liger's Llama patch
    return lambda t: (
        fn.apply(t["hidden"], t["weight"], t["target"], None, None, IGNORE, 0.0, 0.0, "mean")[0],
    )


def build_ligerzoo():
    fn = ligerzoo_kernel("linear_cross_entropy", "linear_cross_entropy")
    return lambda t: (fn(t["hidden"], t["weight"], t["target"], ignore_index=IGNORE),)


def head_case(name: str, label: str, n: int, h: int, v: int) -> Case:
    return Case(
        name=name,
        label=label,
        shape=f"h[{n},{h}] W[{v},{h}]",
        make=partial(make_inputs, n, h, v),
        grad_inputs=("hidden", "weight"),
        out_names=("loss",),
        peers={
            "eager": build_eager,
            "compile": build_compile,
            "liger": build_liger,
            "ligerzoo": build_ligerzoo,
        },
        reference=reference,
        work=partial(flops, n, h, v),
        unit="TFLOP/s",
        rep_ms=400,
        excl_grads_in_table=True,
        notes=[LIGER_NOTE],
    )


def cases(small: bool) -> list[Case]:
    v = 1000 if small else 128256
    return [head_case(name, label, n, h, v) for name, label, n, h in (SMALL_HEADS if small else HEADS)]
