"""The backward's transposed FP8 casts (issue 23, kernels/float8_columns.py): an operand cast along
its columns and stored transposed, alone (the weight's columns for the input gradient, the saved
FP8 rows of x cast along M for the weight gradient) or together with its rows (the output
gradient dy, which both backward products read).

Peers: eager: `quantize_rows` of the tensor and of its transpose (float8.py's definition);
compile: torch.compile of that function; liger: has no FP8 cast (the column says so); ligerzoo:
`quantize_rows_and_columns` / `quantize_columns`. Shapes: a Llama-3.2-1B block's backward over
16,384 tokens: dy of gate/up (16384 x 16384), of q/k/v (16384 x 3072) and of the output and
down projections (16384 x 2048); gate/up's weight (16384 x 2048); the down projection's input as
FP8 rows (16384 x 8192). Every peer's bits are the definition's, so rel err is 0.
"""

from functools import partial

from ligerzoo.kernels.float8 import quantize_rows

from .case import Case, compiled, ligerzoo_kernel, randn

TABLE = "FP8 column casts: an operand cast along its columns (and its rows), stored transposed"
NOTE = (
    "→FP8 columns (forward only): e4m3 data of the transpose and a float32 power-of-two scale per "
    "column (float8.py's quantize_rows of t.t()), with the rows' cast too where named; eager: "
    "quantize_rows of t and t.t(); compile: torch.compile of that; ligerzoo: float8_columns.py's "
    "two tiled passes (amaxes, then the casts); bytes: t read twice, each cast written once"
)
BOTH = ("data", "scale", "columns", "column_scale")
COLUMNS = ("columns", "column_scale")


def definition(t: dict, rows: bool):
    """float8.py's casts of the operand (of t["t"], or of the values FP8 rows stand for)."""
    values = t["data"].float() * t["scale"] if "data" in t else t["t"]
    return (*quantize_rows(values), *quantize_rows(values.t())) if rows else tuple(quantize_rows(values.t()))


def peers(rows: bool):
    def build_eager():
        return lambda t: definition(t, rows)

    def build_compile():
        return compiled(partial(definition, rows=rows))

    def build_liger():
        raise RuntimeError("liger-kernel has no FP8 cast")

    def build_ligerzoo():
        if rows:
            fn = ligerzoo_kernel("float8_columns", "quantize_rows_and_columns")
            return lambda t: fn(t["t"])
        fn = ligerzoo_kernel("float8_columns", "quantize_columns")
        return lambda t: fn(t["data"], t["scale"]) if "data" in t else fn(t["t"])

    return {"eager": build_eager, "compile": build_compile, "liger": build_liger, "ligerzoo": build_ligerzoo}


def reference(master, rows: bool):
    return dict(zip(BOTH if rows else COLUMNS, definition(master, rows)))


def inputs(r, c, fp8_rows: bool, dev, g):
    """A bf16 operand, or one already in FP8 rows (the weight gradient's saved x)."""
    t = randn((r, c), dev, g)
    if not fp8_rows:
        return {"t": t}
    data, scale = quantize_rows(t)
    return {"data": data, "scale": scale}


def moved_bytes(r, c, rows: bool, fp8_rows: bool, direction):
    element = 1 if fp8_rows else 2
    return r * c * (2 * element + (2 if rows else 1)) + 4.0 * (r + c)


def cases(small: bool) -> list[Case]:
    shapes = [
        ("dy_w13", "dy (gate/up)", 16384, 16384, True, False),
        ("dy_wqkv", "dy (q/k/v)", 16384, 3072, True, False),
        ("dy_w2", "dy (out, down)", 16384, 2048, True, False),
        ("w13_columns", "W (gate/up)", 16384, 2048, False, False),
        ("x_w2_columns", "x (down) FP8 rows", 16384, 8192, False, True),
    ]
    out = []
    for name, label, r, c, rows, fp8_rows in shapes:
        if small:
            r, c = 96, 80
        out.append(Case(
            name=f"float8_columns_{name}",
            label=f"{label}→FP8 {'rows+columns' if rows else 'columns'}",
            shape=f"t[{r},{c}]",
            make=partial(inputs, r, c, fp8_rows),
            grad_inputs=(),
            out_names=BOTH if rows else COLUMNS,
            peers=peers(rows),
            reference=partial(reference, rows=rows),
            work=partial(moved_bytes, r, c, rows, fp8_rows),
            directions=("fwd",),
            table=TABLE,
            notes=[NOTE],
        ))
    return out
