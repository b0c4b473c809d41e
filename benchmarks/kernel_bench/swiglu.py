"""SwiGLU, the Llama MLP's gating: silu(gate) * up on gate, up [8192, 14336]."""

from functools import partial

import torch
import torch.nn.functional as F

from .case import Case, autograd_reference, compiled, liger_ops, ligerzoo_kernel, randn

GRAD_INPUTS = ("gate", "up")
OUTPUTS = ("out",)


def eager_swiglu(gate, up):
    # transformers LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), all in the model dtype
    return F.silu(gate) * up


def swiglu64(t):
    g = t["gate"]
    return (g * torch.sigmoid(g) * t["up"],)


def reference(master):
    return autograd_reference(master, swiglu64, GRAD_INPUTS, OUTPUTS)


def make_inputs(n, i, dev, g):
    return {
        "gate": randn((n, i), dev, g),
        "up": randn((n, i), dev, g),
        "grad:out": randn((n, i), dev, g),
    }


def bytes_moved(n, i, direction):
    # fwd: read gate, up; write out. bwd: read gate, up, dout; write dgate, dup.
    return 2.0 * n * i * (3 if direction == "fwd" else 8)


def build_eager():
    return lambda t: (eager_swiglu(t["gate"], t["up"]),)


def build_compile():
    fn = compiled(eager_swiglu)
    return lambda t: (fn(t["gate"], t["up"]),)


LIGER_NOTE = "liger: LigerSiLUMulFunction backward writes dgate/dup over the saved gate/up"


def build_liger():
    fn = liger_ops().LigerSiLUMulFunction
    return lambda t: (fn.apply(t["gate"], t["up"]),)


def build_ligerzoo():
    fn = ligerzoo_kernel("swiglu", "swiglu")
    return lambda t: (fn(t["gate"], t["up"]),)


def cases(small: bool) -> list[Case]:
    n, i = (64, 640) if small else (8192, 14336)
    case = Case(
        name="swiglu",
        label="SwiGLU",
        shape=f"gate,up[{n},{i}]",
        make=partial(make_inputs, n, i),
        grad_inputs=GRAD_INPUTS,
        out_names=OUTPUTS,
        peers={
            "eager": build_eager,
            "compile": build_compile,
            "liger": build_liger,
            "ligerzoo": build_ligerzoo,
        },
        reference=reference,
        work=partial(bytes_moved, n, i),
        notes=[LIGER_NOTE],
    )
    return [case]
