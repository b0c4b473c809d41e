"""The experts' weight-gradient casts (issue 23, kernels/float8_group_columns.py): an operand of
Mixtral's experts cast along its tokens one expert at a time, stored transposed.

Peers: eager: the definition without a host sync (float8_group_columns.py's PyTorch path: each
row's expert by `searchsorted`, the amaxes by `scatter_reduce`); compile: torch.compile of that;
liger: has no FP8 cast (the column says so); ligerzoo: `quantize_group_columns`. Shapes: a
Mixtral-8x7B layer's experts over 8,192 tokens (16,384 rows, top-2), the rows of its 8 experts
padded to 16 as Float8MoE lays them out (counts drawn once, uneven): dy of gate/up (x 28672),
dy of down (x 4096), and the inputs of gate/up (bf16, x 4096) and of down (FP8 rows, x 14336).
Every peer's bits are the definition's, so rel err is 0.
"""

from functools import partial

import torch

from ligerzoo.kernels import float8_group_columns as group_columns
from ligerzoo.kernels.float8 import quantize_rows

from .case import Case, compiled, ligerzoo_kernel, randn

TABLE = "FP8 column casts per expert: an operand cast along each expert's tokens, stored transposed"
NOTE = (
    "→FP8 columns per group (forward only): e4m3 data of the transpose and a float32 power-of-two "
    "scale per expert and column; eager: float8_group_columns.py's PyTorch path; compile: "
    "torch.compile of it; ligerzoo: its two tiled passes; bytes: t read twice, the cast written once"
)
OUTPUTS = ("columns", "column_scale")
# Rows an expert over 8,192 tokens routed top-2 (16,384 in all), each padded to a multiple of 16.
EXPERT_ROWS = (2416, 1712, 2272, 1936, 2096, 1824, 2160, 1968)


def definition(t: dict):
    return group_columns._reference(t.get("data", t.get("t")), t.get("scale"), t["group_ends"])


def peers():
    def build_liger():
        raise RuntimeError("liger-kernel has no FP8 cast")

    def build_ligerzoo():
        fn = ligerzoo_kernel("float8_group_columns", "quantize_group_columns")
        return lambda t: fn(t["data"], t["group_ends"], t["scale"]) if "data" in t else fn(t["t"], t["group_ends"])

    return {"eager": lambda: definition, "compile": lambda: compiled(definition), "liger": build_liger,
            "ligerzoo": build_ligerzoo}


def reference(master):
    return dict(zip(OUTPUTS, definition(master)))


def inputs(rows, c, fp8_rows: bool, dev, g):
    t = randn((sum(rows), c), dev, g)
    ends = torch.tensor(rows, device=dev).cumsum(0).to(torch.int32)
    if not fp8_rows:
        return {"t": t, "group_ends": ends}
    data, scale = quantize_rows(t)
    return {"data": data, "scale": scale, "group_ends": ends}


def moved_bytes(r, c, groups, fp8_rows: bool, direction):
    element = 1 if fp8_rows else 2
    return r * c * (2 * element + 1) + 4.0 * (groups * c + (r if fp8_rows else 0))


def cases(small: bool) -> list[Case]:
    shapes = [
        ("dy_w13", "dy (experts' gate/up)", 28672, False),
        ("dy_w2", "dy (experts' down)", 4096, False),
        ("x_w13", "x (experts' gate/up)", 4096, False),
        ("x_w2", "x (experts' down) FP8 rows", 14336, True),
    ]
    out = []
    for name, label, c, fp8_rows in shapes:
        rows = (32, 0, 48, 16) if small else EXPERT_ROWS
        c = 80 if small else c
        r = sum(rows)
        out.append(Case(
            name=f"float8_group_columns_{name}",
            label=f"{label}→FP8 columns per expert",
            shape=f"t[{r},{c}] {len(rows)} experts",
            make=partial(inputs, rows, c, fp8_rows),
            grad_inputs=(),
            out_names=OUTPUTS,
            peers=peers(),
            reference=reference,
            work=partial(moved_bytes, r, c, len(rows), fp8_rows),
            directions=("fwd",),
            table=TABLE,
            notes=[NOTE],
        ))
    return out
