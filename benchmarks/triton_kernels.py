#!/usr/bin/env python3
"""Kernel benchmarks: ligerzoo against torch eager, torch.compile and liger-kernel, in one run.

Shapes, peers and targets come from BENCHMARKS.md. For every (kernel, peer, direction) this
measures two median times (triton.testing.do_bench): the wall time of eager calls (host work
included: Python, autograd, launches) and the GPU time (the call captured in a CUDA graph, graph
replays timed), the achieved GB/s (TFLOP/s for the fused linear cross-entropy) against the copy
and matmul ceilings from each, the peak memory above the inputs, and the relative error of the
output and gradients against a float64 reference, then prints a markdown table. See
benchmarks/README.md for the columns.

    python benchmarks/triton_kernels.py [--only rms_norm,swiglu] [--quick] [--out benchmarks/RESULTS-kernels.md]
    python benchmarks/triton_kernels.py --dry-run        # CPU, tiny shapes, no GPU timing: checks the plumbing
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# Run from a checkout without installing: the repository root goes on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPS = 1e-6
IGNORE = -100
COPY_CEILING_GBS = 3000.0  # H100 device-to-device copy, bytes read + written (BENCHMARKS.md)
MATMUL_CEILING_TFLOPS = 742.0  # H100 bf16 matmul 8192^3 (BENCHMARKS.md)
PEERS = ("eager", "compile", "liger", "ligerzoo")
# CUDA-graph capture order within a kernel: peers whose capture is likelier to fail last, so a
# failed capture that left the context unusable would cost the fewest GPU times.
GRAPH_ORDER = ("ligerzoo", "eager", "compile", "liger")
GRAPH_WARMUP_CALLS = 3
DIRECTIONS = ("fwd", "fwd+bwd")
MiB = float(2**20)
BAD_REL_ERR = 1e-2  # bf16 results land between 1e-3 and 1e-2 of a float64 reference; above is wrong
BF16 = torch.bfloat16

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Eager peers: the plain PyTorch a Hugging Face model runs (fp32 upcasts where HF does them).
# Each is its own function (own code object), so each torch.compile peer is compiled afresh.
# --------------------------------------------------------------------------------------------


def eager_rms_norm(x, w):
    # transformers LlamaRMSNorm.forward
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype)


def eager_add_rms_norm(x, r, w):
    # decoder layer: residual = residual + hidden; hidden = norm(residual)
    s = x + r
    dtype = s.dtype
    h = s.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype), s


def eager_swiglu(gate, up):
    # transformers LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), all in the model dtype
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    # transformers apply_rotary_pos_emb, in ligerzoo's [B, T, H, D] layout (HF unsqueezes dim 1
    # of [B, H, T, D]; here cos/sin [T, D] broadcast over batch and heads the same way)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_cross_entropy(logits, target):
    # transformers ForCausalLMLoss: logits.float() then F.cross_entropy
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def eager_linear_cross_entropy(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.t()).float(), target, ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------
# float64 references (exact math, no intermediate rounding)
# --------------------------------------------------------------------------------------------


def ref_rms_norm(t):
    x, w = t["x"], t["w"]
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w,)


def ref_add_rms_norm(t):
    s = t["x"] + t["residual"]
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * t["w"], s


def ref_swiglu(t):
    g = t["gate"]
    return (g * torch.sigmoid(g) * t["up"],)


def ref_rope(t):
    return eager_rope(t["q"], t["k"], t["cos"], t["sin"])


def _ce_rows64(logits64, target):
    """Sum of the row losses and d(sum)/d(logits) (softmax - onehot, zero on ignored rows)."""
    valid = target != IGNORE
    tgt = target.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits64, dim=-1)
    loss_sum = ((lse - logits64.gather(1, tgt).squeeze(1)) * valid).sum()
    p = torch.exp(logits64 - lse.unsqueeze(1))
    p.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=p.dtype))
    p.mul_(valid.unsqueeze(1).to(p.dtype))
    return loss_sum, p


def ref_cross_entropy(master, chunk=1024):
    logits, target = master["logits"], master["target"]
    n_valid = int((target != IGNORE).sum())
    dlogits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        ls, p = _ce_rows64(logits[i : i + chunk].double(), target[i : i + chunk])
        loss += ls
        dlogits[i : i + chunk] = p / n_valid
        del p
    return {"loss": (loss / n_valid).float(), "dlogits": dlogits}


def ref_linear_cross_entropy(master, chunk=1024):
    h, w, target = master["hidden"], master["weight"], master["target"]
    n_valid = int((target != IGNORE).sum())
    w64 = w.double()
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dw64 = torch.zeros_like(w64)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], chunk):
        h64 = h[i : i + chunk].double()
        ls, g = _ce_rows64(h64 @ w64.t(), target[i : i + chunk])
        g /= n_valid
        loss += ls
        dh[i : i + chunk] = g @ w64
        dw64.addmm_(g.t(), h64)
        del g, h64
    dw = dw64.float()
    del dw64, w64
    return {"loss": (loss / n_valid).float(), "dhidden": dh, "dweight": dw}


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str  # --only key
    label: str  # kernel column
    shape: str  # shape column
    make: Callable[[torch.device, torch.Generator], dict]  # master inputs; "grad:<out>" = upstream grads
    grad_inputs: tuple  # inputs that get gradients in fwd+bwd
    out_names: tuple
    peer_builders: dict  # peer -> zero-arg builder returning fn(t) -> tuple of outputs
    reference: Callable[[dict], dict]  # master -> {out name / "d"+input: float32 tensor}
    work: Callable[[str], float]  # direction -> bytes (unit "GB/s") or flops (unit "TFLOP/s")
    unit: str = "GB/s"
    rep_ms: int = 100
    excl_grads_in_table: bool = False  # LCE: the table shows peak memory minus the gradient outputs
    notes: list = field(default_factory=list)


def _randn(shape, dev, g, scale=1.0, offset=0.0, dtype=BF16):
    t = torch.randn(shape, device=dev, generator=g, dtype=torch.float32)
    return (t * scale + offset).to(dtype)


def _targets(n, vocab, dev, g):
    t = torch.randint(0, vocab, (n,), device=dev, generator=g)
    drop = torch.rand((n,), device=dev, generator=g) < 0.05
    return t.masked_fill(drop, IGNORE)


def autograd_reference(case, fn64):
    def run(master):
        t64 = {}
        for k, v in master.items():
            if k.startswith("grad:"):
                continue
            v = v.double() if v.is_floating_point() else v
            t64[k] = v.requires_grad_(True) if k in case.grad_inputs else v
        outs = fn64(t64)
        ups = [master["grad:" + n].double() if "grad:" + n in master else None for n in case.out_names]
        torch.autograd.backward(list(outs), ups)
        ref = {n: o.detach().float() for n, o in zip(case.out_names, outs)}
        ref.update({"d" + k: t64[k].grad.float() for k in case.grad_inputs})
        return ref

    return run


def _liger():
    """liger_kernel.ops, or raise with a short reason (the liger column then says why)."""
    try:
        return importlib.import_module("liger_kernel.ops")
    except Exception as e:  # ImportError, or its device detection failing
        raise RuntimeError(f"liger-kernel not importable ({type(e).__name__}: {e})") from None


def _zoo(module, name):
    try:
        mod = importlib.import_module(f"ligerzoo.kernels.{module}")
    except Exception as e:
        raise RuntimeError(f"ligerzoo.kernels.{module} not importable ({type(e).__name__}: {e})") from None
    if not hasattr(mod, name):
        raise RuntimeError(f"ligerzoo.kernels.{module} has no {name}")
    return getattr(mod, name)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def build_cases(small: bool) -> list[Case]:
    cases = []

    # ---- RMSNorm ------------------------------------------------------------------------------
    N, H = (64, 384) if small else (8192, 4096)

    def make_rms(dev, g):
        return {
            "x": _randn((N, H), dev, g),
            "w": _randn((H,), dev, g, 0.1, 1.0),
            "grad:y": _randn((N, H), dev, g),
        }

    def liger_rms():
        fn = _liger().LigerRMSNormFunction
        # (X, W, eps, offset, casting_mode, in_place, row_mode): LigerRMSNorm's Llama defaults
        return lambda t: (fn.apply(t["x"], t["w"], EPS, 0.0, "llama", True),)

    def zoo_rms():
        fn = _zoo("rms_norm", "rms_norm")
        return lambda t: (fn(t["x"], t["w"], EPS),)

    def compile_rms():
        fn = _compiled(eager_rms_norm)
        return lambda t: (fn(t["x"], t["w"]),)

    c = Case(
        name="rms_norm",
        label="RMSNorm",
        shape=f"x[{N},{H}]",
        make=make_rms,
        grad_inputs=("x", "w"),
        out_names=("y",),
        peer_builders={
            "eager": lambda: (lambda t: (eager_rms_norm(t["x"], t["w"]),)),
            "compile": compile_rms,
            "liger": liger_rms,
            "ligerzoo": zoo_rms,
        },
        reference=None,
        # fwd: read x, w; write y. bwd: read x, w, dy; write dx, dw.
        work=lambda d: 2.0 * ((2 * N * H + H) if d == "fwd" else (5 * N * H + 3 * H)),
    )
    c.reference = autograd_reference(c, ref_rms_norm)
    c.notes.append(
        "liger: LigerRMSNormFunction with in_place=True (its Llama patch's setting): "
        "backward writes dx over dy"
    )
    cases.append(c)

    # ---- add + RMSNorm --------------------------------------------------------------------------
    def make_add(dev, g):
        return {
            "x": _randn((N, H), dev, g),
            "residual": _randn((N, H), dev, g),
            "w": _randn((H,), dev, g, 0.1, 1.0),
            "grad:y": _randn((N, H), dev, g),
            "grad:sum": _randn((N, H), dev, g),
        }

    def liger_add():
        lk = _liger()
        fn = getattr(lk, "LigerFusedAddRMSNormFunction", None)
        if fn is None:
            raise RuntimeError("this liger-kernel has no fused add-rmsnorm")
        # (X, R, W, eps, offset, casting_mode, in_place): LigerFusedAddRMSNorm module defaults
        return lambda t: fn.apply(t["x"], t["residual"], t["w"], EPS, 0.0, "llama", False)

    def zoo_add():
        fn = _zoo("rms_norm", "add_rms_norm")
        return lambda t: fn(t["x"], t["residual"], t["w"], EPS)

    def compile_add():
        fn = _compiled(eager_add_rms_norm)
        return lambda t: fn(t["x"], t["residual"], t["w"])

    c = Case(
        name="add_rms_norm",
        label="add+RMSNorm",
        shape=f"x,r[{N},{H}]",
        make=make_add,
        grad_inputs=("x", "residual", "w"),
        out_names=("y", "sum"),
        peer_builders={
            "eager": lambda: (lambda t: eager_add_rms_norm(t["x"], t["residual"], t["w"])),
            "compile": compile_add,
            "liger": liger_add,
            "ligerzoo": zoo_add,
        },
        reference=None,
        # fwd: read x, r, w; write y, sum. bwd: read dy, dsum, sum, w; write d(x+r) (one tensor), dw.
        work=lambda d: 2.0 * ((4 * N * H + H) if d == "fwd" else (8 * N * H + 3 * H)),
    )
    c.reference = autograd_reference(c, ref_add_rms_norm)
    c.notes.append(
        "liger: LigerFusedAddRMSNormFunction (in_place=False, the LigerFusedAddRMSNorm module default); "
        "Liger's Llama patch does not use it"
    )
    cases.append(c)

    # ---- SwiGLU -------------------------------------------------------------------------------
    NS, I = (64, 640) if small else (8192, 14336)

    def make_swiglu(dev, g):
        return {
            "gate": _randn((NS, I), dev, g),
            "up": _randn((NS, I), dev, g),
            "grad:out": _randn((NS, I), dev, g),
        }

    def liger_swiglu():
        fn = _liger().LigerSiLUMulFunction
        return lambda t: (fn.apply(t["gate"], t["up"]),)

    def zoo_swiglu():
        fn = _zoo("swiglu", "swiglu")
        return lambda t: (fn(t["gate"], t["up"]),)

    def compile_swiglu():
        fn = _compiled(eager_swiglu)
        return lambda t: (fn(t["gate"], t["up"]),)

    c = Case(
        name="swiglu",
        label="SwiGLU",
        shape=f"gate,up[{NS},{I}]",
        make=make_swiglu,
        grad_inputs=("gate", "up"),
        out_names=("out",),
        peer_builders={
            "eager": lambda: (lambda t: (eager_swiglu(t["gate"], t["up"]),)),
            "compile": compile_swiglu,
            "liger": liger_swiglu,
            "ligerzoo": zoo_swiglu,
        },
        reference=None,
        # fwd: read gate, up; write out. bwd: read gate, up, dout; write dgate, dup.
        work=lambda d: 2.0 * NS * I * (3 if d == "fwd" else 8),
    )
    c.reference = autograd_reference(c, ref_swiglu)
    c.notes.append("liger: LigerSiLUMulFunction backward writes dgate/dup over the saved gate/up")
    cases.append(c)

    # ---- RoPE ---------------------------------------------------------------------------------
    B, T, HQ, HK, D = (2, 16, 4, 2, 32) if small else (4, 2048, 32, 8, 128)

    def make_rope(dev, g):
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
        freqs = torch.outer(torch.arange(T, device=dev, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return {
            "q": _randn((B, T, HQ, D), dev, g),
            "k": _randn((B, T, HK, D), dev, g),
            "cos": emb.cos().to(BF16),  # HF casts cos/sin to the activations' dtype
            "sin": emb.sin().to(BF16),
            "grad:q_rot": _randn((B, T, HQ, D), dev, g),
            "grad:k_rot": _randn((B, T, HK, D), dev, g),
        }

    def liger_rope():
        fn = _liger().LigerRopeFunction

        # Liger takes q [B, H, T, D], k [B, Hk, T, D]: we hand it the transposed views of our
        # contiguous [B, T, H, D] tensors, exactly what HF's attention passes it (q.view(B, T, H, D)
        # .transpose(1, 2)); Liger transposes back to this physical layout, so no copy is timed.
        def run(t):
            q, k = fn.apply(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["cos"], t["sin"])
            return q.transpose(1, 2), k.transpose(1, 2)

        return run

    def zoo_rope():
        fn = _zoo("rope", "apply_rope")
        return lambda t: tuple(fn(t["q"], t["k"], t["cos"], t["sin"]))

    def compile_rope():
        fn = _compiled(eager_rope)
        return lambda t: fn(t["q"], t["k"], t["cos"], t["sin"])

    c = Case(
        name="rope",
        label="RoPE",
        shape=f"q[{B},{T},{HQ},{D}] k[{B},{T},{HK},{D}]",
        make=make_rope,
        grad_inputs=("q", "k"),
        out_names=("q_rot", "k_rot"),
        peer_builders={
            "eager": lambda: (lambda t: eager_rope(t["q"], t["k"], t["cos"], t["sin"])),
            "compile": compile_rope,
            "liger": liger_rope,
            "ligerzoo": zoo_rope,
        },
        reference=None,
        # fwd: read q, k, cos, sin; write q_rot, k_rot. bwd: the same with the gradients.
        work=lambda d: 2.0 * (2 * B * T * (HQ + HK) * D + 2 * T * D) * (1 if d == "fwd" else 2),
    )
    c.reference = autograd_reference(c, ref_rope)
    c.notes.append(
        "liger RoPE: given q.transpose(1, 2) / k.transpose(1, 2) views ([B,H,T,D] over [B,T,H,D] "
        "storage, as HF calls it); it rotates in place (forward into q/k, backward into the upstream grads)"
    )
    cases.append(c)

    # ---- CrossEntropy -------------------------------------------------------------------------
    NC, V = (64, 1000) if small else (4096, 128256)

    def make_ce(dev, g):
        return {"logits": _randn((NC, V), dev, g, 2.0), "target": _targets(NC, V, dev, g)}

    def liger_ce():
        fn = _liger().LigerCrossEntropyFunction
        # (_input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, ...)
        return lambda t: (fn.apply(t["logits"], t["target"], None, IGNORE, 0.0, 0.0, "mean")[0],)

    def zoo_ce():
        fn = _zoo("cross_entropy", "cross_entropy")
        return lambda t: (fn(t["logits"], t["target"], ignore_index=IGNORE),)

    def compile_ce():
        fn = _compiled(eager_cross_entropy)
        return lambda t: (fn(t["logits"], t["target"]),)

    c = Case(
        name="cross_entropy",
        label="CrossEntropy",
        shape=f"logits[{NC},{V}]",
        make=make_ce,
        grad_inputs=("logits",),
        out_names=("loss",),
        peer_builders={
            "eager": lambda: (lambda t: (eager_cross_entropy(t["logits"], t["target"]),)),
            "compile": compile_ce,
            "liger": liger_ce,
            "ligerzoo": zoo_ce,
        },
        reference=ref_cross_entropy,
        # fwd: read logits. fwd+bwd (scalar loss: the grad can be made in the forward pass):
        # read logits, write dlogits.
        work=lambda d: 2.0 * NC * V * (1 if d == "fwd" else 2),
    )
    c.notes.append("liger CE: writes dlogits over the logits (in place) when they require grad")
    cases.append(c)

    # ---- fused linear cross-entropy, two heads ------------------------------------------------
    heads = [("linear_cross_entropy", 8192, 4096), ("linear_cross_entropy_1b", 16384, 2048)]
    if small:
        heads = [("linear_cross_entropy", 64, 128), ("linear_cross_entropy_1b", 128, 64)]
    VL = 1000 if small else 128256
    for name, NL, HL in heads:

        def make_lce(dev, g, NL=NL, HL=HL):
            return {
                "hidden": _randn((NL, HL), dev, g),
                "weight": _randn((VL, HL), dev, g, 2.0 / math.sqrt(HL)),  # logits ~ N(0, 4)
                "target": _targets(NL, VL, dev, g),
            }

        def liger_lce():
            fn = _liger().LigerFusedLinearCrossEntropyFunction
            # (_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
            #  label_smoothing, reduction, ...): accum_dtype None, as Liger's Llama patch
            return lambda t: (
                fn.apply(t["hidden"], t["weight"], t["target"], None, None, IGNORE, 0.0, 0.0, "mean")[0],
            )

        def zoo_lce():
            fn = _zoo("linear_cross_entropy", "linear_cross_entropy")
            return lambda t: (fn(t["hidden"], t["weight"], t["target"], ignore_index=IGNORE),)

        def compile_lce():
            fn = _compiled(eager_linear_cross_entropy)
            return lambda t: (fn(t["hidden"], t["weight"], t["target"]),)

        c = Case(
            name=name,
            label="LinearCE" if name == "linear_cross_entropy" else "LinearCE (1B head)",
            shape=f"h[{NL},{HL}] W[{VL},{HL}]",
            make=make_lce,
            grad_inputs=("hidden", "weight"),
            out_names=("loss",),
            peer_builders={
                "eager": lambda: (
                    lambda t: (eager_linear_cross_entropy(t["hidden"], t["weight"], t["target"]),)
                ),
                "compile": compile_lce,
                "liger": liger_lce,
                "ligerzoo": zoo_lce,
            },
            reference=ref_linear_cross_entropy,
            work=lambda d, NL=NL, HL=HL: (2.0 if d == "fwd" else 6.0) * NL * HL * VL,
            unit="TFLOP/s",
            rep_ms=400,
            excl_grads_in_table=True,
        )
        c.notes.append(
            "liger LCE: computes dh/dW during the forward when inputs require grad; the fwd rows use "
            "inputs that do not, so every peer does only the logits matmul there"
        )
        cases.append(c)
    return cases


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    ms: float | None = None  # wall time of eager calls (host work included)
    graph_ms: float | None = None  # GPU time: replays of the call captured in a CUDA graph
    graph_error: str | None = None  # why there is no graph_ms (not capturable, capture failed)
    peak_mib: float | None = None  # max allocated during one call, minus allocated before it
    grad_mib: float | None = None  # gradient outputs that are new storage (not written over an input)
    rel_errs: dict = field(default_factory=dict)
    first_call_s: float | None = None
    error: str | None = None

    @property
    def peak_excl_grads_mib(self):
        if self.peak_mib is None or self.grad_mib is None:
            return None
        return self.peak_mib - self.grad_mib


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cleanup(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def clone_inputs(case, master, with_grad):
    t = {}
    for k, v in master.items():
        c = v.clone()
        if with_grad and k in case.grad_inputs:
            c.requires_grad_(True)
        t[k] = c
    return t


def make_step(case, fn, t, direction):
    if direction == "fwd":
        return lambda: fn(t), []
    leaves = [t[k] for k in case.grad_inputs]
    ups = [t.get("grad:" + n) for n in case.out_names]

    def step():
        # fresh gradients every call (do_bench's grad_to_none does it only in its timed loop, not
        # in its warm-up); host-only work, and free once the grads are already None
        for leaf in leaves:
            leaf.grad = None
        outs = fn(t)
        torch.autograd.backward(list(outs), ups)

    return step, leaves


def rel_err(a, ref):
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(a.shape)}, expected {tuple(ref.shape)}")
    a = a.detach().reshape(-1)
    r = ref.reshape(-1)
    num = den = 0.0
    step = 1 << 24
    for i in range(0, r.numel(), step):
        ai, ri = a[i : i + step].double(), r[i : i + step].double()
        num += float((ai - ri).square().sum())
        den += float(ri.square().sum())
    if math.isnan(num):
        return float("nan")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return math.sqrt(num / den)


def check(case, fn, master, ref, direction, dev):
    """One call on fresh inputs: relative error of each output (and each gradient for fwd+bwd)."""
    t = clone_inputs(case, master, direction != "fwd")
    sync(dev)
    t0 = time.perf_counter()
    outs = fn(t)
    got = {n: o.detach().clone() for n, o in zip(case.out_names, outs)}
    if direction != "fwd":
        ups = [t.get("grad:" + n) for n in case.out_names]
        torch.autograd.backward(list(outs), ups)
        for k in case.grad_inputs:
            if t[k].grad is None:
                raise RuntimeError(f"no gradient for {k}")
            got["d" + k] = t[k].grad
    sync(dev)
    first_s = time.perf_counter() - t0
    del outs
    errs = {n: rel_err(v, ref[n]) for n, v in got.items()}
    del got, t
    return errs, first_s


def measure_memory(case, step, leaves, t, dev):
    step()  # warm: nothing compiled or autotuned is allocated inside the measured call
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    sync(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    sync(dev)
    peak = (torch.cuda.max_memory_allocated(dev) - before) / MiB
    input_storages = {v.untyped_storage().data_ptr() for v in t.values()}
    grads = {}
    for leaf in leaves:
        if leaf.grad is not None:
            s = leaf.grad.untyped_storage()
            if s.data_ptr() not in input_storages:
                grads[s.data_ptr()] = s.nbytes()
        leaf.grad = None
    return peak, sum(grads.values()) / MiB


def bench_params(args, rep_ms):
    return (10, max(30, rep_ms // 3)) if args.quick else (25, rep_ms)


def time_step(step, leaves, args, rep_ms, dev):
    if dev.type != "cuda":  # dry run: a rough host clock, only to fill the table
        step()
        times = []
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    warmup, rep = bench_params(args, rep_ms)
    return triton.testing.do_bench(
        step, warmup=warmup, rep=rep, grad_to_none=leaves or None, return_mode="median"
    )


def run_peer(case, fn, master, ref, direction, args, dev) -> Result:
    res = Result()
    res.rel_errs, res.first_call_s = check(case, fn, master, ref, direction, dev)
    cleanup(dev)
    t = clone_inputs(case, master, direction != "fwd")
    step, leaves = make_step(case, fn, t, direction)
    if dev.type == "cuda":
        res.peak_mib, res.grad_mib = measure_memory(case, step, leaves, t, dev)
    res.ms = time_step(step, leaves, args, case.rep_ms, dev)
    del step, leaves, t
    return res


def _first_line(e):
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def _sync_site(exc):
    """file:line of the innermost frame outside torch and this script (where a host sync was made)."""
    here = os.path.abspath(__file__)
    site = None
    for fr in traceback.extract_tb(exc.__traceback__):
        f = fr.filename.replace(os.sep, "/")
        if "/torch/" in f or os.path.abspath(fr.filename) == here:
            continue
        site = "/".join(f.split("/")[-2:]) + f":{fr.lineno}"
    return site


class NotCapturable(Exception):
    pass


def graph_time(case, fn, master, direction, args, dev):
    """GPU time of one call: capture it in a CUDA graph, time replays (no host work in the timing).

    Fresh input clones; warm-up on a side stream (PyTorch's recipe), the first warm-up call with
    sync debug mode "error", so that a host sync (.item(), a blocking copy), which capture forbids,
    is caught before any capture starts. fwd+bwd captures forward and backward together, the input
    gradients None before capture so the backward allocates them from the graph's pool; replays
    overwrite them in place. Raises NotCapturable (with the reason) or any other error.
    """
    import triton.testing

    t = clone_inputs(case, master, direction != "fwd")
    step, leaves = make_step(case, fn, t, direction)
    prev_stream = torch.cuda.current_stream(dev)
    g = inner = None  # inner: the error raised inside the capture, which a failing capture_end masks
    try:
        s = torch.cuda.Stream(dev)
        s.wait_stream(prev_stream)
        with torch.cuda.stream(s):
            old_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as e:
                if "synchroniz" not in str(e):
                    raise
                site = _sync_site(e)
                raise NotCapturable(
                    "host sync in the call" + (f" at {site}" if site else "") + f" ({_first_line(e)})"
                ) from None
            finally:
                torch.cuda.set_sync_debug_mode(old_mode)
            for _ in range(GRAPH_WARMUP_CALLS - 1):
                step()
        prev_stream.wait_stream(s)
        for leaf in leaves:
            leaf.grad = None
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                try:
                    step()
                except Exception as e:
                    inner = e
                    raise
        except Exception as e:
            raise NotCapturable(f"capture failed: {_first_line(inner or e)}") from None
        warmup, rep = bench_params(args, case.rep_ms)
        return triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
    finally:
        # torch.cuda.graph leaves its capture stream current when capture_end raises
        torch.cuda.set_stream(prev_stream)
        for leaf in leaves:
            leaf.grad = None
        del step, leaves, t, g, inner


def run_graph(case, fn, master, direction, args, dev, r):
    """Fills r.graph_ms or r.graph_error; returns False if the CUDA context looks unusable after it."""
    try:
        r.graph_ms = graph_time(case, fn, master, direction, args, dev)
    except NotCapturable as e:
        r.graph_error = f"n/c: {e}"
    except Exception as e:
        traceback.print_exc()
        r.graph_error = f"graph timing failed: {_first_line(e)}"
    try:
        cleanup(dev)
        torch.zeros(1, device=dev).add_(1).item()
        return True
    except Exception as e:
        r.graph_error = (r.graph_error or "") + f"; CUDA context unusable after it: {_first_line(e)}"
        return False


def measure_ceilings(dev, args):
    import triton.testing

    warmup, rep = (10, 50) if args.quick else (25, 200)
    src = torch.randn(2**29, device=dev, dtype=BF16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    copy_gbs = 2 * src.nbytes / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=BF16)
    b = torch.randn(8192, 8192, device=dev, dtype=BF16)
    c = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: torch.mm(a, b, out=c), warmup=warmup, rep=rep, return_mode="median")
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b, c
    cleanup(dev)
    return copy_gbs, tflops


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.2f} ms"


def fmt_rate(case, direction, ms):
    if ms is None:
        return "—", None
    amount = case.work(direction)
    if case.unit == "TFLOP/s":
        rate = amount / (ms * 1e-3) / 1e12
        return f"{rate:.0f} TFLOP/s ({100 * rate / MATMUL_CEILING_TFLOPS:.0f}%)", rate
    rate = amount / (ms * 1e-3) / 1e9
    return f"{rate:.0f} GB/s ({100 * rate / COPY_CEILING_GBS:.0f}%)", rate


def floor_ms(case, direction):
    amount = case.work(direction)
    if case.unit == "TFLOP/s":
        return amount / (MATMUL_CEILING_TFLOPS * 1e12) * 1e3
    return amount / (COPY_CEILING_GBS * 1e9) * 1e3


def fmt_err(e):
    if e is None:
        return "—"
    if math.isnan(e):
        return "NaN BAD"
    return f"{e:.1e}" + (" BAD" if e > BAD_REL_ERR else "")


def worst_err(errs):
    if not errs:
        return None, None
    name = max(errs, key=lambda n: (math.isnan(errs[n]), errs[n]))
    return name, errs[name]


def short_error(msg, n=48):
    if "not importable" in msg:
        return "n/a: " + msg.split(" (")[0]
    msg = _cell(msg)
    return "ERR: " + (msg if len(msg) <= n else msg[: n - 1] + "…")


def peer_cell(r):
    if r is None:
        return "—"
    if r.error is not None:
        return short_error(r.error)
    return fmt_ms(r.ms)


def graph_cell(r):
    if r is None or r.error is not None:
        return "—"
    if r.graph_error is not None:
        return "n/c" if r.graph_error.startswith("n/c") else "ERR"
    return fmt_ms(r.graph_ms)


def table_memory(case, direction, r):
    if r is None or r.error is not None or r.peak_mib is None:
        return "—"
    v = r.peak_excl_grads_mib if (case.excl_grads_in_table and direction != "fwd") else r.peak_mib
    return f"{v:.0f}"


def memory_basis(case, direction):
    if direction == "fwd":
        return "incl. outputs"
    if case.excl_grads_in_table:
        return "excl. grad outputs (" + "+".join("d" + k for k in case.grad_inputs) + ")"
    return "incl. grads"


def build_report(cases, results, header, peers) -> str:
    out = [header, ""]
    cols = (
        ["kernel", "shape", "direction"]
        + [f"{p} wall (eager)" for p in PEERS]
        + [f"{p} GPU (graph)" for p in PEERS]
        + [
            "ligerzoo vs liger (speedup, wall)", "ligerzoo vs liger (GPU)",
            "ligerzoo GB/s or TFLOP/s (% ceiling), wall", "ligerzoo GB/s or TFLOP/s (% ceiling), GPU",
            "peak extra MiB (eager / compile / liger / ligerzoo)", "memory basis",
            "rel err ligerzoo (worst tensor)",
        ]
    )  # fmt: skip
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for case in cases:
        for d in DIRECTIONS:
            rs = {p: results.get((case.name, d, p)) for p in PEERS}
            if all(r is None for r in rs.values()):
                continue
            zoo, lig = rs["ligerzoo"], rs["liger"]
            ok = lambda r: r is not None and r.error is None and r.ms  # noqa: E731
            gok = lambda r: r is not None and r.error is None and r.graph_ms  # noqa: E731
            speed = f"{lig.ms / zoo.ms:.2f}x" if ok(zoo) and ok(lig) else "—"
            gspeed = f"{lig.graph_ms / zoo.graph_ms:.2f}x" if gok(zoo) and gok(lig) else "—"
            rate = fmt_rate(case, d, zoo.ms)[0] if ok(zoo) else "—"
            grate = fmt_rate(case, d, zoo.graph_ms)[0] if gok(zoo) else "—"
            mem = " / ".join(table_memory(case, d, rs[p]) for p in PEERS)
            if ok(zoo) or (zoo is not None and zoo.rel_errs):
                n, e = worst_err(zoo.rel_errs)
                err = f"{fmt_err(e)} ({n})" if n else "—"
            else:
                err = "—"
            row = [case.label, case.shape, d] + [peer_cell(rs[p]) for p in PEERS]
            row += [graph_cell(rs[p]) for p in PEERS]
            row += [speed, gspeed, rate, grate, mem, memory_basis(case, d), err]
            out.append("| " + " | ".join(_cell(x) if i < 3 else x for i, x in enumerate(row)) + " |")

    out += ["", "## Every peer", ""]
    cols = [
        "kernel", "direction", "floor", "peer", "wall (eager)", "x floor", "GB/s or TFLOP/s (% ceiling)",
        "GPU (graph)", "GPU x floor", "GPU GB/s or TFLOP/s (% ceiling)", "peak extra MiB",
        "peak extra minus grad outputs MiB", "rel err vs float64 (each output / grad)",
        "first call s",
    ]  # fmt: skip
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    errors = {}
    for case in cases:
        for d in DIRECTIONS:
            for p in PEERS:
                r = results.get((case.name, d, p))
                if r is None:
                    continue
                fl = floor_ms(case, d)
                if r.error is not None:
                    errors.setdefault(r.error, []).append(f"{case.label} {d} {p}")
                elif r.graph_error is not None:
                    errors.setdefault(r.graph_error, []).append(f"{case.label} {d} {p} (GPU time)")
                ms = r.ms if r.error is None else None
                rate = fmt_rate(case, d, ms)[0]
                xfloor = f"{ms / fl:.2f}" if ms else "—"
                gms = r.graph_ms if r.error is None else None
                grate = fmt_rate(case, d, gms)[0]
                gxfloor = f"{gms / fl:.2f}" if gms else "—"
                pk = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "—"
                pkx = "—"
                if r.peak_excl_grads_mib is not None and d != "fwd":
                    pkx = f"{r.peak_excl_grads_mib:.0f}"
                errs = ", ".join(f"{n} {fmt_err(e)}" for n, e in r.rel_errs.items()) or "—"
                if r.error is not None:
                    errs = errs if r.rel_errs else short_error(r.error)
                first = f"{r.first_call_s:.2f}" if r.first_call_s is not None else "—"
                row = [case.label, d, fmt_ms(fl), p, fmt_ms(ms), xfloor, rate]
                row += [graph_cell(r), gxfloor, grate, pk, pkx, errs, first]
                out.append("| " + " | ".join(_cell(x) for x in row) + " |")

    notes = []
    for case in cases:
        notes += [n for n in case.notes if n not in notes]
    out += ["", "## Notes", ""]
    out += [
        "- fwd rows: inputs that do not require grad (an inference forward); fwd+bwd rows: one forward and "
        "its backward, gradients set to None before each call.",
        "- floor: bytes (each input read once, each output written once, per pass) at "
        f"{COPY_CEILING_GBS:.0f} GB/s, or the matmul flops at {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s.",
        f"- rel err: ||out - ref|| / ||ref|| against float64; BAD above {BAD_REL_ERR:.0e} or NaN.",
        "- wall (eager): median wall time of eager calls, host work included (Python, autograd, kernel "
        "launches; the backward runs on autograd's device thread); for the small kernels this is mostly "
        "host overhead. GPU (graph): median of replays of the call captured in one CUDA graph (forward "
        "and backward together for fwd+bwd): the GPU work alone. n/c: not capturable (see Errors); "
        "— in a dry run.",
        "- ligerzoo vs liger: liger's median over ligerzoo's (above 1: ligerzoo is faster), from the wall "
        "times and from the GPU times.",
    ]
    out += [f"- {n}" for n in notes]
    if "compile" in peers:
        out.append(
            "- compile: torch.compile(eager function, dynamic=False), Dynamo reset before each kernel; "
            "its first call s is the compile time."
        )
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- {_cell(msg)}: {', '.join(where)}" for msg, where in errors.items()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------


def versions():
    def v(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    return torch.__version__, tv, v("liger-kernel")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names (see --list)")
    ap.add_argument(
        "--peers", default=None, help="comma-separated subset of " + ",".join(PEERS) + " (default: all; "
        "the dry run leaves compile out unless named here)"
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, rough host timing, no GPU needed"
    )
    ap.add_argument("--list", action="store_true", help="list the case names and exit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cases = build_cases(small=args.dry_run)
    if args.list:
        for c in cases:
            print(f"{c.name:26s} {c.label} {c.shape}")
        return 0
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {c.name for c in cases}]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    peers = [p.strip() for p in (args.peers or ",".join(PEERS)).split(",") if p.strip()]
    if args.dry_run and args.peers is None:
        peers = [p for p in peers if p != "compile"]
    if any(p not in PEERS for p in peers):
        ap.error(f"--peers takes a subset of {PEERS}")

    if args.dry_run:
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device (use --dry-run to check the script on CPU)")
        dev = torch.device("cuda")

    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 1024

    tv, trv, lv = versions()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run: tiny shapes, host timing)"
    if dev.type == "cuda":
        log("measuring ceilings")
        copy_gbs, mm_tflops = measure_ceilings(dev, args)
        ceil = (
            f"measured ceilings: 1 GiB D2D copy {copy_gbs:.0f} GB/s, "
            f"bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s "
            f"(the % columns use {COPY_CEILING_GBS:.0f} GB/s and {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s)"
        )
        log(ceil)
    else:
        ceil = "ceilings not measured (dry run)"
    header = (
        f"# Kernel benchmarks: {datetime.datetime.now().isoformat(timespec='minutes')} | {gpu} | "
        f"torch {tv} | triton {trv} | liger-kernel {lv} | bf16 | "
        f"{'quick' if args.quick else 'full'} repeats | {ceil}"
    )

    results = {}
    graph_ok = True  # False once a failed capture left the CUDA context unusable: no more captures
    gen = torch.Generator(device=dev)
    for case in cases:
        torch._dynamo.reset()
        cleanup(dev)
        gen.manual_seed(args.seed)
        log(f"{case.name} {case.shape}: inputs and float64 reference")
        try:
            master = case.make(dev, gen)
            ref = case.reference(master)
        except Exception as e:
            traceback.print_exc()
            msg = f"inputs/reference failed: {type(e).__name__}: {e}"
            for d in DIRECTIONS:
                for p in peers:
                    results[(case.name, d, p)] = Result(error=msg)
            cleanup(dev)
            continue
        cleanup(dev)
        fns = {}
        for p in peers:
            try:
                fns[p] = case.peer_builders[p]()
            except Exception as e:
                fns[p] = e
        for d in DIRECTIONS:
            for p in peers:
                if p not in fns:
                    continue
                fn = fns[p]
                if isinstance(fn, Exception):
                    results[(case.name, d, p)] = Result(error=str(fn))
                    continue
                try:
                    r = run_peer(case, fn, master, ref, d, args, dev)
                    n, e = worst_err(r.rel_errs)
                    log(f"{case.name} {d} {p}: {fmt_ms(r.ms)}, peak {r.peak_mib and round(r.peak_mib)} MiB, "
                        f"worst rel err {n} {fmt_err(e)}")  # fmt: skip
                except Exception as e:
                    traceback.print_exc()
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    r = Result(error=f"{type(e).__name__}: {first_line}")
                    log(f"{case.name} {d} {p}: ERROR {r.error}")
                results[(case.name, d, p)] = r
                cleanup(dev)
        # GPU times, after every eager time of this kernel is in (a failed capture cannot spoil those)
        if dev.type == "cuda":
            for p in sorted(peers, key=GRAPH_ORDER.index):
                for d in DIRECTIONS:
                    r = results.get((case.name, d, p))
                    if r is None or r.error is not None:
                        continue
                    if not graph_ok:
                        r.graph_error = "graph timing skipped: a failed capture broke the CUDA context"
                        continue
                    graph_ok = run_graph(case, fns[p], master, d, args, dev, r)
                    log(f"{case.name} {d} {p}: GPU (graph) "
                        f"{fmt_ms(r.graph_ms) if r.graph_error is None else r.graph_error}")  # fmt: skip
        del master, ref, fns
        cleanup(dev)

    report = build_report(cases, results, header, peers)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
