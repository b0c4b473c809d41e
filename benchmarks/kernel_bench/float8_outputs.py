"""The kernels' FP8 outputs (issue 23): RMSNorm, add+RMSNorm and packed SwiGLU writing their output
as e4m3 rows with float32 power-of-two scales (float8.py's `quantize_rows` of the bf16 output) in
the pass that computes it, against that output written in bf16 and then cast.

Forward only: the backward is the plain kernels'. Peers, for these cases:
- eager: the output in PyTorch ops (float32 math, rounded once to bf16, as ligerzoo's kernels do),
  then `quantize_rows`;
- compile: torch.compile of that whole function (Inductor may fuse the cast into the producer),
  with Inductor's emulate_precision_casts: by default Inductor drops the rounding to bf16 and
  casts the float32 value, which puts ~1.5% of the elements one FP8 step from the definition's;
- liger: liger-kernel's bf16 kernel, then torch.compile(quantize_rows): a separate compiled cast;
- ligerzoo: the FP8 launchers (`rms_norm_forward_float8`, `swiglu_packed_forward_float8`).
SwiGLU twice per shape: as shipped (a row held in registers up to swiglu.FLOAT8_ROW_IN_REGISTERS
columns) and with every row in two passes (`_two_pass` cases), to choose between them.
"""

import importlib
from contextlib import contextmanager
from functools import partial

import torch

from ligerzoo.kernels.float8 import quantize_rows  # the definition: eager, compile and the reference

from .case import BF16, Case, compiled, liger_ops, ligerzoo_kernel, randn
from .rms_norm import EPS, sizes

TABLE = "FP8 outputs: each kernel writing its output as e4m3 rows, against its bf16 output cast"
NORM_OUTPUTS = ("data", "scale")
ADD_NORM_OUTPUTS = ("data", "scale", "sum")
NOTE = (
    "→FP8 rows (forward only): output as e4m3 data + a float32 power-of-two scale per row, the "
    "rowwise cast of the bf16 output (float8.py's quantize_rows); eager: PyTorch ops, float32 math "
    "rounded once to bf16, then quantize_rows; compile: torch.compile of that function (with "
    "emulate_precision_casts, so that the bf16 rounding stays); liger: "
    "liger-kernel's bf16 kernel, then torch.compile(quantize_rows); ligerzoo: the FP8 launcher, no "
    "bf16 output. rel err: data and scale against the cast of the float64 output rounded to bf16; "
    "(two passes): SwiGLU's rows read twice instead of held in registers"
)


def rms_norm32(x, w):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


def eager_rms_norm_fp8(x, w):
    return tuple(quantize_rows(rms_norm32(x, w)))


def eager_add_rms_norm_fp8(x, r, w):
    s = (x.float() + r.float()).to(x.dtype)
    return (*quantize_rows(rms_norm32(s, w)), s)


def eager_swiglu_fp8(gate_up):
    gate, up = gate_up.float().chunk(2, dim=-1)
    return tuple(quantize_rows((gate * torch.sigmoid(gate) * up).to(gate_up.dtype)))


def reference_rows(y64):
    """The cast of the float64 output rounded to bf16, as float32 tensors."""
    data, scale = quantize_rows(y64.to(BF16))
    return {"data": data.float(), "scale": scale}


def rms_norm_reference(master):
    x, w = master["x"].double(), master["w"].double()
    return reference_rows(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w)


def add_rms_norm_reference(master):
    s = (master["x"].double() + master["residual"].double()).to(BF16)
    ref = rms_norm_reference({"x": s, "w": master["w"]})
    ref["sum"] = s.float()
    return ref


def swiglu_reference(master):
    gate, up = master["gate_up"].double().chunk(2, dim=-1)
    return reference_rows(gate * torch.sigmoid(gate) * up)


def compiled_with_its_roundings(fn):
    """The compile peer, keeping the rounding to bf16 that the cast must see (module docstring)."""
    return torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})


def norm_inputs(n, h, residual, dev, g):
    t = {"x": randn((n, h), dev, g), "w": randn((h,), dev, g, 0.1, 1.0)}
    if residual:
        t["residual"] = randn((n, h), dev, g)
    return t


def swiglu_inputs(n, i, dev, g):
    return {"gate_up": randn((n, 2 * i), dev, g)}


def norm_bytes(n, h, residual, direction):
    read = 2.0 * n * h * (2 if residual else 1) + 2.0 * h  # x (and residual), w
    written = (2.0 * n * h if residual else 0.0) + n * h + 4.0 * n  # (the sum,) e4m3 data, a scale a row
    return read + written


def swiglu_bytes(n, i, direction):
    # read gate_up; write e4m3 data, a float32 scale per row
    return 2.0 * n * 2 * i + n * i + 4.0 * n


@contextmanager
def every_row_in_two_passes():
    swiglu = importlib.import_module("ligerzoo.kernels.swiglu")
    held = swiglu.FLOAT8_ROW_IN_REGISTERS
    swiglu.FLOAT8_ROW_IN_REGISTERS = 0
    try:
        yield
    finally:
        swiglu.FLOAT8_ROW_IN_REGISTERS = held


def norm_peers(residual):
    eager = eager_add_rms_norm_fp8 if residual else eager_rms_norm_fp8
    args = (lambda t: (t["x"], t["residual"], t["w"])) if residual else (lambda t: (t["x"], t["w"]))

    def build_compile():
        fn = compiled_with_its_roundings(eager)
        return lambda t: fn(*args(t))

    def build_liger():
        ops = liger_ops()
        cast = compiled(quantize_rows)
        if residual:
            fn = getattr(ops, "LigerFusedAddRMSNormFunction", None)
            if fn is None:
                raise RuntimeError("this liger-kernel has no fused add-rmsnorm")

            def call(t):
                y, s = fn.apply(t["x"], t["residual"], t["w"], EPS, 0.0, "llama", False)
                return (*cast(y), s)

            return call
        fn = ops.LigerRMSNormFunction
        return lambda t: tuple(cast(fn.apply(t["x"], t["w"], EPS, 0.0, "llama", False)))

    def build_ligerzoo():
        fn = ligerzoo_kernel("rms_norm", "rms_norm_forward_float8")
        if residual:
            return lambda t: fn(t["x"], t["residual"], t["w"], EPS)[:3]
        return lambda t: fn(t["x"], None, t["w"], EPS)[:2]

    def build_eager():
        return lambda t: eager(*args(t))

    return {
        "eager": build_eager,
        "compile": build_compile,
        "liger": build_liger,
        "ligerzoo": build_ligerzoo,
    }


def swiglu_peers(two_pass):
    def build_compile():
        fn = compiled_with_its_roundings(eager_swiglu_fp8)
        return lambda t: fn(t["gate_up"])

    def build_liger():
        fn = liger_ops().LigerSiLUMulFunction
        cast = compiled(quantize_rows)
        return lambda t: tuple(cast(fn.apply(*t["gate_up"].chunk(2, dim=-1))))

    def build_ligerzoo():
        fn = ligerzoo_kernel("swiglu", "swiglu_packed_forward_float8")
        if not two_pass:
            return lambda t: fn(t["gate_up"])

        def call(t):
            with every_row_in_two_passes():
                return fn(t["gate_up"])

        return call

    def build_eager():
        return lambda t: eager_swiglu_fp8(t["gate_up"])

    return {
        "eager": build_eager,
        "compile": build_compile,
        "liger": build_liger,
        "ligerzoo": build_ligerzoo,
    }


def cases(small: bool) -> list[Case]:
    n, h = sizes(small)
    out = [
        Case(
            name="rms_norm_fp8" if not residual else "add_rms_norm_fp8",
            label="RMSNorm→FP8" if not residual else "add+RMSNorm→FP8",
            shape=f"x[{n},{h}]" if not residual else f"x,r[{n},{h}]",
            make=partial(norm_inputs, n, h, residual),
            grad_inputs=(),
            out_names=ADD_NORM_OUTPUTS if residual else NORM_OUTPUTS,
            peers=norm_peers(residual),
            reference=add_rms_norm_reference if residual else rms_norm_reference,
            work=partial(norm_bytes, n, h, residual),
            directions=("fwd",),
            table=TABLE,
            notes=[NOTE],
        )
        for residual in (False, True)
    ]
    # Llama-3.2-1B's MLP over 16,384 tokens and Llama-3.1-8B's over 8,192.
    for n, i in [(64, 640)] if small else [(16384, 8192), (8192, 14336)]:
        for two_pass in (False, True):
            out.append(Case(
                name=f"swiglu_fp8_{i}" + ("_two_pass" if two_pass else ""),
                label="SwiGLU→FP8" + (" (two passes)" if two_pass else ""),
                shape=f"gate_up[{n},{2 * i}]",
                make=partial(swiglu_inputs, n, i),
                grad_inputs=(),
                out_names=NORM_OUTPUTS,
                peers=swiglu_peers(two_pass),
                reference=swiglu_reference,
                work=partial(swiglu_bytes, n, i),
                directions=("fwd",),
                table=TABLE,
                notes=[NOTE],
            ))
    return out
