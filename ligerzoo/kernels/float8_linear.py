"""The FP8 linear layer: y = x @ W^T + b with its three products in FP8, outputs in x's dtype.

Every product casts both operands along the dimension it contracts (float8.py defines the casts
and the recipes):
    forward         y  = x @ W^T     x  [M, K] along K,   W   [N, K] along K
    input gradient  dx = dy @ W      dy [M, N] along N,   W^T [K, N] along N (W's columns)
    weight gradient dW = dy^T @ x    dy^T [N, M] along M, x^T [K, M] along M (x's columns)
Under "tensorwise" one scale per tensor serves both layouts, so a transposed operand is the same
FP8 bytes transposed; under "rowwise" each layout is its own cast (x, W and dy twice each). The
backward is the FP8 product of the exact gradient formulas, not the derivative of the rounded
forward (straight-through, as every FP8 recipe). The bias is added to the product's output in
x's dtype; its gradient is dy summed in float32.

Saved for the backward: x's FP8 cast from the forward (1 byte an element and a float32 scale a
row), never x itself (2 bytes an element; the FP8-emitting kernels will not even write it).
Tensorwise its bytes, transposed, are dW's operand. Rowwise dW needs x cast along M: the recipe
takes it from the saved cast (values exact in float32, cast again along M), which is the cast of x
itself along M wherever a value lies in both casts' normal range, because multiplying by a power
of two does not change where a 3-bit mantissa rounds. The two differ only in values far below
their row's or column's largest (under 2**-14 of it, FP8 subnormals), by at most the column cast's
subnormal spacing: measured on 4096 x 512 Gaussian rows, 0.005% of the elements, by at most 6e-6
of the largest. Saving x would make it the cast of x exactly, for twice the bytes; casting x
along M in the forward would cost a pass that activation checkpointing throws away and repeats.
The weight: the parameter itself (no memory), its columns cast in the backward; or, given
`weight_fp8` (cast once a step by `quantize_weight`, shared by the micro-batches), its columns;
or, given rowwise W's rows alone (`quantize_rows(weight)`, 1 byte an element kept instead of 2),
those rows, from which the backward makes W's columns as it makes x's (dequantized exactly, cast
again along N: FSDP2's FP8 all-gather and the kept casts of models/float8.py hand rows over).

Error bound, each element, against the exact product of the unrounded operands (tests/test_float8.py
checks it): an operand's cast errs by at most u|v| + eta (u = 2**-4 for e4m3, 2**-3 for e5m2: half
the spacing of 3 or 2 mantissa bits; eta = half the smallest subnormal times the scale, 2**-10 s and
2**-17 s, for values that fall below the normal range; rowwise dW's x, cast twice, errs by at most
u|x| + eta_row + eta_column), so
    |y_hat - y| <= (u_a + u_b + u_a u_b) sum_k |a_k||b_k| + (subnormal terms in eta)
                   + float32 sums (K 2**-24 sum_k |a_k||b_k|) + one rounding to the output dtype,
and on the GPU the tensor cores' partial sums (the forward's sum all of K: float8.py's scaled_mm).
The bound follows sum |a||b|, not |y|: an output that cancels to near zero has no relative bound.

Shapes `torch._scaled_mm` cannot take (M, the flattened leading dims, or K or N zero or not a
multiple of 16) run the whole layer as the plain product in x's dtype (`F.linear`), exact: a
one-token decode step, a tiny test model. The choice is made from shapes, so it traces without a branch on
values.

Where the casts run: the forward's (x, unless given, and W along K) and tensorwise's are PyTorch
ops, which Inductor fuses into a kernel or two; rowwise, the backward's transposed casts (dy along
both dimensions, W's columns, x's saved rows along M) are float8_columns.py's Triton passes, which
took 0.71 ms for gate/up's dy [16384, 16384] where compiled PyTorch took 1.79 (H100). Measured
before those kernels, compiled, forward and backward of one layer over 16,384 tokens: w13 (K
2048, N 16384) bf16 4.15 ms, rowwise 4.76, tensorwise 3.20; w2 (K 8192, N 2048) 2.24, 2.80, 2.06;
the rowwise forward product alone 0.90 and 0.40 ms (1,217 and 1,387 TFLOP/s): casts by separate
passes eat the products' gain, which is why the kernels that produce an operand write it in FP8.

An activation already in FP8 (`x_fp8`): the norm and SwiGLU kernels will write their output's FP8
cast in the pass that computes it. float8_linear takes it beside x itself, the output in its own
dtype, which autograd sends dx to: the producer's own Function keeps its backward. x is not saved,
so once its other readers are done it is freed. The caller guarantees that x_fp8 is the cast of x
this recipe defines (`quantize_rows(x)` or `quantize_tensor(x)`); checking it would read x again.

The products themselves are the public `float8_forward_product` and `float8_backward_products`:
`_Float8LinearFunction` calls them, and so do the Functions that fuse a producer with its linear
layer (float8_fused.py), so there is one implementation of the recipe.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ligerzoo.kernels.float8 import E4M3, E5M2, Float8Rows, quantize_rows, quantize_tensor, scaled_mm
from ligerzoo.kernels.float8_columns import quantize_columns, quantize_rows_and_columns

RECIPES = ("rowwise", "tensorwise")
# The output gradient's format (float8.py says why): activations and weights are e4m3 in both.
GRAD_DTYPE = {"rowwise": E4M3, "tensorwise": E5M2}


class Float8Weight(NamedTuple):
    """A weight W [N, K] cast for both products that read it (see `quantize_weight`)."""
    rows: Float8Rows  # W [N, K] along K: the forward's operand
    cols: Float8Rows  # W^T [K, N] along N: the input gradient's operand


def _cast(t: torch.Tensor, fp8_dtype: torch.dtype, recipe: str) -> Float8Rows:
    """t [R, C] cast along C: one scale per row (rowwise) or one for the tensor."""
    return quantize_rows(t, fp8_dtype) if recipe == "rowwise" else quantize_tensor(t, fp8_dtype)


def _cast_transposed(t: torch.Tensor, cast: Float8Rows | None, fp8_dtype: torch.dtype,
                     recipe: str) -> Float8Rows:
    """t^T [C, R] cast along R. Tensorwise: the bytes of t's own cast (given, or made) transposed."""
    if recipe == "rowwise":
        # A cast has no gradient (float8.py's casts detach too); e4m3, the rowwise recipe's format.
        return Float8Rows(*quantize_columns(t.detach()))
    cast = cast if cast is not None else quantize_tensor(t, fp8_dtype)
    return Float8Rows(cast.data.t().contiguous(), cast.scale)


def _product(a: Float8Rows, b_t: Float8Rows, out_dtype: torch.dtype,
             fast_accum: bool = False) -> torch.Tensor:
    """a [M, K] @ b_t [N, K]^T, both cast along K (fast_accum: `scaled_mm`'s)."""
    return scaled_mm(a.data, b_t.data.t(), a.scale, b_t.scale.t(), out_dtype, fast_accum)


def quantize_weight(weight: torch.Tensor, recipe: str = "rowwise") -> Float8Weight:
    """W [N, K] cast for `float8_linear(..., weight_fp8=)`: once a step rather than once a call."""
    _check_recipe(recipe)
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [N, K]")
    rows = _cast(weight, E4M3, recipe)
    return Float8Weight(rows, _cast_transposed(weight, rows, E4M3, recipe))


def takes_fp8_product(m: int, k: int, n: int) -> bool:
    """Whether [M, K] @ [K, N] runs in FP8: every dimension a positive multiple of 16, as
    `torch._scaled_mm` requires. Shapes only, so a traced caller branches on nothing else."""
    return all(d > 0 and d % 16 == 0 for d in (m, k, n))


def float8_forward_product(x_cast: Float8Rows, weight: torch.Tensor, bias: torch.Tensor | None,
                           recipe: str, w_cast: Float8Rows | None = None) -> torch.Tensor:
    """y = x @ W^T + b [M, N] in weight's dtype, from x's cast [M, K] along K.

    weight: W [N, K], cast here unless w_cast, its cast along K (`Float8Weight.rows`), is given."""
    w_cast = w_cast if w_cast is not None else _cast(weight, E4M3, recipe)
    # The tensor cores' own sums over K (the layer's input width): torchao's forward default.
    y = _product(x_cast, w_cast, weight.dtype, fast_accum=True)
    return y + bias if bias is not None else y


def float8_backward_products(dy: torch.Tensor | Float8Rows, x_cast: Float8Rows | None,
                             weight: torch.Tensor | Float8Rows | None, recipe: str,
                             bias_grad: bool = False, out_dtype: torch.dtype | None = None) -> tuple:
    """(dx [M, K], dW [N, K], db [N]) of y = x @ W^T + b for dy [M, N], in dy's dtype, each None
    where not asked for.

    x_cast: x's cast from the forward (dW reads it, cast again along M under "rowwise"), or None:
    no dW. weight: W [N, K], whose columns are cast here, or their cast W^T [K, N] along N
    (`Float8Weight.cols`), or None: no dx. bias_grad: whether to return db.
    Rowwise, dy may come as its own cast along N (Float8Rows, written by the kernel that computed
    it), with out_dtype the outputs' dtype: dy's columns are then made from its rows as x's are
    (cast again along M), and there is no db (dy's exact values are gone).
    """
    dx = dw = db = None
    needs_dx, needs_dw = weight is not None, x_cast is not None
    given_rows = isinstance(dy, Float8Rows)
    if given_rows and (recipe != "rowwise" or bias_grad or out_dtype is None):
        raise ValueError("dy as FP8 rows needs the rowwise recipe and out_dtype, and gives no bias gradient")
    out_dtype = out_dtype if given_rows else dy.dtype
    if recipe == "rowwise":
        dy_cast, dyt_cast = _rowwise_dy_casts(dy, needs_dx, needs_dw)
        # x's forward cast, exact in float32, cast again along M (module docstring).
        xt_cast = Float8Rows(*quantize_columns(x_cast.data, x_cast.scale)) if needs_dw else None
    else:
        grad_dtype = GRAD_DTYPE[recipe]
        dy_cast = quantize_tensor(dy, grad_dtype) if needs_dx or needs_dw else None
        dyt_cast = _cast_transposed(dy, dy_cast, grad_dtype, recipe) if needs_dw else None
        xt_cast = Float8Rows(x_cast.data.t().contiguous(), x_cast.scale) if needs_dw else None
    # dW first: its operands (x's columns are as large as x) are freed before dx is allocated.
    if needs_dw:
        dw = _product(dyt_cast, xt_cast, out_dtype)
        del dyt_cast, xt_cast
    if needs_dx:
        wt_cast = weight if isinstance(weight, Float8Rows) else _cast_transposed(weight, None, E4M3, recipe)
        dx = _product(dy_cast, wt_cast, out_dtype)
    if bias_grad:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db


def _rowwise_dy_casts(dy: torch.Tensor | Float8Rows, needs_dx: bool, needs_dw: bool) -> tuple:
    """dy's casts along N (dx's operand) and along M (dW's, stored transposed), None where not
    needed; dy given as its rows: those, and its columns made from them."""
    if isinstance(dy, Float8Rows):
        return dy, Float8Rows(*quantize_columns(dy.data, dy.scale)) if needs_dw else None
    if needs_dx and needs_dw:
        data, scale, t_data, t_scale = quantize_rows_and_columns(dy)
        return Float8Rows(data, scale), Float8Rows(t_data, t_scale)
    if needs_dx:
        return quantize_rows(dy, GRAD_DTYPE["rowwise"]), None
    return None, Float8Rows(*quantize_columns(dy)) if needs_dw else None


class _Float8LinearFunction(torch.autograd.Function):
    """x [M, K], weight [N, K], bias [N] or None; the FP8 arguments None, or the casts of x (rows)
    and of the weight (rows and columns) that float8_linear was given; tensorwise, wt_scale None
    (w_scale serves both)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_data, x_scale, w_data, w_scale, wt_data, wt_scale, recipe):
        x_cast = Float8Rows(x_data, x_scale) if x_data is not None else _cast(x, E4M3, recipe)
        w_cast = Float8Rows(w_data, w_scale) if w_data is not None else None
        y = float8_forward_product(x_cast, weight, bias, recipe, w_cast)
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        x_saved, x_scale_saved = x_cast if needs_dw else (None, None)
        # What dx reads: the given cast of W's columns; W's given rows, whose columns the backward
        # makes; or the parameter, cast in the backward.
        w_saved, w_scale_saved, ctx.weight_given = None, None, None
        if needs_dx:
            if wt_data is not None:
                w_saved, w_scale_saved = wt_data, (wt_scale if wt_scale is not None else w_scale)
                ctx.weight_given = "columns"
            elif w_data is not None:
                w_saved, w_scale_saved, ctx.weight_given = w_data, w_scale, "rows"
            else:
                w_saved = weight
        ctx.save_for_backward(x_saved, x_scale_saved, w_saved, w_scale_saved)
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_saved, x_scale_saved, w_saved, w_scale_saved = ctx.saved_tensors
        x_cast = Float8Rows(x_saved, x_scale_saved) if x_saved is not None else None
        weight = w_saved
        if ctx.weight_given == "columns":
            weight = Float8Rows(w_saved, w_scale_saved)
        elif ctx.weight_given == "rows":
            weight = Float8Rows(*quantize_columns(w_saved, w_scale_saved))
        dx, dw, db = float8_backward_products(dy, x_cast, weight, ctx.recipe,
                                              bias_grad=ctx.has_bias and ctx.needs_input_grad[2])
        return dx, dw, db, None, None, None, None, None, None, None


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe is {recipe!r}, expected one of {RECIPES}")


def _check_cast(name: str, cast: Float8Rows, shape: tuple, scale_shape: tuple) -> None:
    if not isinstance(cast, Float8Rows):
        raise TypeError(f"{name} is a {type(cast).__name__}, expected a Float8Rows (from quantize_rows / "
                        f"quantize_tensor)")
    if cast.data.dtype != E4M3 or tuple(cast.data.shape) != shape:
        raise ValueError(f"{name}.data is {cast.data.dtype} {tuple(cast.data.shape)}, expected "
                         f"torch.float8_e4m3fn {shape}")
    if cast.scale.dtype != torch.float32 or tuple(cast.scale.shape) != scale_shape:
        raise ValueError(f"{name}.scale is {cast.scale.dtype} {tuple(cast.scale.shape)}, expected "
                         f"torch.float32 {scale_shape} for this recipe")


def _check(x, weight, bias, recipe, x_fp8, weight_fp8) -> None:
    _check_recipe(recipe)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected x [..., K] and "
                         f"weight [N, K]")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} and weight {weight.dtype}: expected one float dtype for both "
                         f"(the products' outputs take it)")
    n, k = weight.shape
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias is {bias.dtype} {tuple(bias.shape)}, expected {x.dtype} ({n},)")
    rowwise = recipe == "rowwise"
    if x_fp8 is not None:
        _check_cast("x_fp8", x_fp8, tuple(x.shape), tuple(x.shape[:-1]) + (1,) if rowwise else ())
    if isinstance(weight_fp8, Float8Weight):
        _check_cast("weight_fp8.rows", weight_fp8.rows, (n, k), (n, 1) if rowwise else ())
        _check_cast("weight_fp8.cols", weight_fp8.cols, (k, n), (k, 1) if rowwise else ())
    elif weight_fp8 is not None:
        if not rowwise or not isinstance(weight_fp8, Float8Rows):
            rows = " or, rowwise, quantize_rows(weight)" if rowwise else ""
            raise TypeError(f"weight_fp8 is a {type(weight_fp8).__name__}, expected a Float8Weight "
                            f"(from quantize_weight){rows}")
        _check_cast("weight_fp8", weight_fp8, (n, k), (n, 1))


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  recipe: str = "rowwise", *, x_fp8: Float8Rows | None = None,
                  weight_fp8: Float8Weight | Float8Rows | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the forward, input-gradient and weight-gradient products in FP8.

    x: [..., K]; weight: [N, K]; bias: [N]; one float dtype for all, the outputs' and gradients'.
    recipe: "rowwise" or "tensorwise" (float8.py).
    x_fp8: x already cast by its producer, `quantize_rows(x)` (rowwise) or `quantize_tensor(x)`.
    weight_fp8: `quantize_weight(weight, recipe)`, made once for several calls; or, rowwise, W's
    rows alone, `quantize_rows(weight)`, whose columns the backward makes from them. The gradient
    still goes to `weight`.
    """
    _check(x, weight, bias, recipe, x_fp8, weight_fp8)
    *lead, k = x.shape
    n = weight.shape[0]
    m = x.numel() // k if k else 0
    if not takes_fp8_product(m, k, n):
        return F.linear(x, weight, bias)
    x_data = x_scale = w_data = w_scale = wt_data = wt_scale = None
    if x_fp8 is not None:
        x_data = x_fp8.data.reshape(m, k)
        x_scale = x_fp8.scale.reshape(m, 1) if recipe == "rowwise" else x_fp8.scale
    if isinstance(weight_fp8, Float8Rows):
        w_data, w_scale = weight_fp8
    elif weight_fp8 is not None:
        (w_data, w_scale), (wt_data, wt_scale) = weight_fp8
        if recipe == "tensorwise":
            # One scale serves both layouts, and torch.compile refuses a tensor passed twice.
            wt_scale = None
    y = _Float8LinearFunction.apply(x.reshape(m, k), weight, bias, x_data, x_scale, w_data, w_scale,
                                    wt_data, wt_scale, recipe)
    return y.reshape(*lead, n)
