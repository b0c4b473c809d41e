"""What a kernel case is, and the helpers every case module uses to build one.

A case names its inputs (a dict of tensors; "grad:<output>" entries are the fixed upstream
gradients of the backward), its outputs, a float64 reference, the bytes or flops one call must
move, and one builder per peer. A builder runs once per kernel, after Dynamo's reset, and returns
the call that is timed: fn(inputs) -> tuple of outputs. It raises, with the reason, when its peer
cannot run (the table then says why in that peer's column).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BF16 = torch.bfloat16
IGNORE = -100  # the loss's ignore_index, as Hugging Face's labels use it
PEERS = ("eager", "compile", "liger", "ligerzoo")
DIRECTIONS = ("fwd", "fwd+bwd")

Inputs = dict  # name -> tensor; "grad:<output>" -> that output's upstream gradient
Peer = Callable[[Inputs], tuple]


@dataclass
class Case:
    name: str  # --only key
    label: str  # kernel column
    shape: str  # shape column
    make: Callable[[torch.device, torch.Generator], Inputs]  # bf16 inputs on the device
    grad_inputs: tuple  # inputs that get gradients in fwd+bwd
    out_names: tuple
    peers: dict[str, Callable[[], Peer]]  # peer name -> builder
    reference: Callable[[Inputs], dict]  # inputs -> {output name / "d"+input: float32 tensor}
    work: Callable[[str], float]  # direction -> bytes (unit "GB/s") or flops (unit "TFLOP/s")
    unit: str = "GB/s"
    rep_ms: int = 100
    excl_grads_in_table: bool = False  # LCE: the table shows peak memory minus the gradient outputs
    directions: tuple = DIRECTIONS  # ("fwd",) for an output with no backward of its own (FP8 rows)
    table: str | None = None  # the title of a table of its own after the main one, for other peers
    notes: list = field(default_factory=list)


def randn(shape, dev, g, scale=1.0, offset=0.0, dtype=BF16):
    """Normal samples drawn in float32, scaled and shifted, then cast."""
    t = torch.randn(shape, device=dev, generator=g, dtype=torch.float32)
    return (t * scale + offset).to(dtype)


def targets(n, vocab, dev, g):
    """Uniform token ids with about 5 % set to IGNORE."""
    t = torch.randint(0, vocab, (n,), device=dev, generator=g)
    drop = torch.rand((n,), device=dev, generator=g) < 0.05
    return t.masked_fill(drop, IGNORE)


def autograd_reference(master: Inputs, op64, grad_inputs, out_names) -> dict:
    """op64 run in float64 on the inputs, then differentiated by autograd with the upstream grads."""
    t64 = {}
    for k, v in master.items():
        if k.startswith("grad:"):
            continue
        v = v.double() if v.is_floating_point() else v
        t64[k] = v.requires_grad_(True) if k in grad_inputs else v
    outs = op64(t64)
    ups = [master["grad:" + n].double() if "grad:" + n in master else None for n in out_names]
    torch.autograd.backward(list(outs), ups)
    ref = {n: o.detach().float() for n, o in zip(out_names, outs)}
    ref.update({"d" + k: t64[k].grad.float() for k in grad_inputs})
    return ref


def liger_ops():
    """liger_kernel.ops, or raise with a short reason (the liger column then says why)."""
    try:
        return importlib.import_module("liger_kernel.ops")
    except Exception as e:  # ImportError, or its device detection failing
        raise RuntimeError(f"liger-kernel not importable ({type(e).__name__}: {e})") from None


def ligerzoo_kernel(module: str, name: str):
    """ligerzoo.kernels.<module>.<name>, or raise with a short reason."""
    try:
        mod = importlib.import_module(f"ligerzoo.kernels.{module}")
    except Exception as e:
        raise RuntimeError(f"ligerzoo.kernels.{module} not importable ({type(e).__name__}: {e})") from None
    if not hasattr(mod, name):
        raise RuntimeError(f"ligerzoo.kernels.{module} has no {name}")
    return getattr(mod, name)


def compiled(fn):
    """The compile peer: each eager function is its own code object, so each is compiled afresh."""
    return torch.compile(fn, dynamic=False)
