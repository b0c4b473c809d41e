"""A producer fused with the FP8 linear layer that reads its output: RMSNorm (with or without the
residual add) before a projection, SwiGLU before the down projection. Rowwise recipe only.

    rms_norm_linear(x, norm_weight, eps, weight, bias)                 = y
    add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)   = (y, x + residual)
    swiglu_linear(gate_up, weight, bias)                               = y
    add_rms_norm_mlp(x, residual, norm_weight, eps, w13, w2)           = (w2 y', x + residual)

with y = float8_linear(h, weight, bias, "rowwise", x_fp8=quantize_rows(h)) for h the producer's
output (`rms_norm`, `add_rms_norm`'s first, `swiglu_packed`), bit for bit. The last is Llama's
whole FFN, the second then the third (y' = SwiGLU of w13's output), in one Function so that its
backward has SwiGLU write gate_up's gradient as the FP8 rows w13's products read: that gradient is
the widest tensor of the step ([M, 2D]), and written in bf16 it was written once and read twice by
the cast (float8_columns.py), 0.7 ms a layer at Llama-3.2-1B's shape. Each also takes
`weight_fp8`, W's rows already cast along K (`quantize_rows(weight)`: FSDP2 gathers them so,
models/float8_gather.py): the forward multiplies by them as they are, the same bits as casting
W, and the backward makes W's columns from them (below); `weight` then gives the gradient's
dtype and shape and receives it, and its values are not read. The producer's kernel
writes h's FP8 rows (e4m3 and a float32 power-of-two scale per row, float8.py's cast of h as the
plain kernel rounds it) in the pass that computes h, and h itself is never written: a cast by
separate PyTorch ops, even compiled, made rowwise slower than bf16 (float8_linear.py's numbers).

Forward: the producer's FP8 launcher, then `float8_forward_product`. Backward:
`float8_backward_products` gives dh (and dW, db) in FP8, then the producer's own backward
launcher turns dh into the gradients of its inputs.

Saved for the backward, per element of the producer's [M, K] output, against the bf16 path
(producer, then nn.Linear saving its input h in bf16):
    norm      its input (x, or the sum x + residual: an output, alive anyway as the residual
              stream) and rstd as the norm saves them, plus h's FP8 rows: 1 byte an element and
              4 a row, where the bf16 path keeps h at 2 bytes an element.
    SwiGLU    gate_up [M, 2K] (SwiGLU's backward reads it; 4 bytes per element of h) and h's
              FP8 rows: 5 bytes an element where the bf16 path keeps 4 + 2 = 6.
The weight is saved as the parameter itself (no memory); its columns are cast in the backward.
Given `weight_fp8`, its rows are saved instead, and W's columns for dh are made from them in the
backward, dequantized exactly (a power-of-two scale) and cast again along N
(`quantize_columns(data, scale)`, float8_columns.py): the values of W's columns cast, wherever a
value lies in both casts' normal range; they differ only for values under 2**-14 of their row's or
column's largest (FP8 subnormals), as float8_linear.py says of x's columns for dW. FSDP2 frees
the gathered rows after the forward and gathers them into the same buffers for the backward, so
keeping them costs what keeping the parameter does.
Beside the unfused FP8 path (the producer, then `float8_linear` casting h), the bytes saved are
the same; what goes is the bf16 h written by the producer and read back by the cast (2 + 2 bytes
an element of traffic, and h's memory until the cast is done).
Recomputed rather than saved: sigmoid(gate) and the norm's x_hat, as the producers do alone.

Shapes `torch._scaled_mm` cannot take (`takes_fp8_product`) run the producer and `F.linear`,
exact, as `float8_linear` does; given `weight_fp8`, with W's values as its rows hold them
(`data.float() * scale` in W's dtype, exact), the gradient still going to `weight`. The choice is
made from shapes only, so it traces without a branch on values.
"""

import torch
import torch.nn.functional as F

from ligerzoo.kernels._utils import (
    as_rows,
    check_float,
    check_same_device,
    check_same_dtype,
    check_shape,
)
from ligerzoo.kernels.float8 import E4M3, Float8Rows
from ligerzoo.kernels.float8_columns import quantize_columns
from ligerzoo.kernels.float8_linear import float8_backward_products, float8_forward_product, takes_fp8_product

# The producers' launchers, as their own autograd.Functions call them (registered ops).
from ligerzoo.kernels.rms_norm import (
    add_rms_norm,
    check_norm_inputs,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward_float8,
)
from ligerzoo.kernels.swiglu import (
    backward_float8_fits_over_dy,
    swiglu_packed,
    swiglu_packed_backward,
    swiglu_packed_backward_float8,
    swiglu_packed_backward_float8_over_dy,
    swiglu_packed_backward_in_place,
    swiglu_packed_forward_float8,
)

RECIPE = "rowwise"  # a scale per row is what a row-per-program producer can compute in its pass


# The Functions take and return [M, K] rows; the public functions reshape around them. Outputs that
# are new tensors, not views made inside a Function: compiled, autograd refuses an in-place write
# into a Function's view output, and SwiGLU's in-place backward writes into w13's output.
# w_data [N, K] e4m3 and w_scale [N, 1]: weight_fp8's rows, or None (the Functions cast weight).


def _given_rows(w_data, w_scale) -> Float8Rows | None:
    return Float8Rows(w_data, w_scale) if w_data is not None else None


def _saved_weight(weight, w_data, w_scale) -> tuple:
    """What dh reads of W, saved: the given rows (data, scale), or the parameter (no memory)."""
    return (w_data, w_scale) if w_data is not None else (weight, None)


def _weight_for_dh(w_saved, w_scale_saved):
    """`_saved_weight`'s pair as float8_backward_products takes it: W's columns made from its rows
    (module docstring), or the parameter, whose columns it casts; None: no dh."""
    if w_scale_saved is None:
        return w_saved
    return Float8Rows(*quantize_columns(w_saved, w_scale_saved))


class _RMSNormLinearFunction(torch.autograd.Function):
    """x [M, K], residual [M, K] or None, norm_weight [K], weight [N, K], bias [N] or None,
    w_data and w_scale (above)."""

    @staticmethod
    def forward(ctx, x, residual, norm_weight, eps, weight, bias, w_data, w_scale):
        h_data, h_scale, summed, rstd = rms_norm_forward_float8(x, residual, norm_weight, eps)
        y = float8_forward_product(Float8Rows(h_data, h_scale), weight, bias, RECIPE,
                                   w_cast=_given_rows(w_data, w_scale))
        needs_dh, needs_dw = any(ctx.needs_input_grad[:3]), ctx.needs_input_grad[4]
        # The norm's input: x, or the sum (an output, alive anyway as the residual stream).
        norm_input = x if residual is None else summed
        ctx.save_for_backward(*(norm_input, norm_weight, rstd) if needs_dh else (None,) * 3,
                              *_saved_weight(weight, w_data, w_scale) if needs_dh else (None, None),
                              *(h_data, h_scale) if needs_dw else (None, None))
        ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
        return y if residual is None else (y, summed)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        norm_input, norm_weight, rstd, w_saved, w_scale_saved, h_data, h_scale = ctx.saved_tensors
        h_fp8 = Float8Rows(h_data, h_scale) if h_data is not None else None
        weight = _weight_for_dh(w_saved, w_scale_saved)
        dh, dw, db = float8_backward_products(as_rows(dy), h_fp8, weight, RECIPE,
                                              bias_grad=ctx.has_bias and ctx.needs_input_grad[5])
        dx = dnorm_weight = None
        if dh is not None:
            dsum = as_rows(dsum) if ctx.has_residual and dsum is not None else None
            dx, dnorm_weight = rms_norm_backward(dh, norm_input, norm_weight, rstd, dsum)
        return dx, dx if ctx.has_residual else None, dnorm_weight, None, dw, db, None, None


class _SwiGLULinearFunction(torch.autograd.Function):
    """gate_up [M, 2K], weight [N, K], bias [N] or None, w_data and w_scale (above)."""

    @staticmethod
    def forward(ctx, gate_up, weight, bias, w_data, w_scale, in_place_backward):
        h_data, h_scale = swiglu_packed_forward_float8(gate_up)
        y = float8_forward_product(Float8Rows(h_data, h_scale), weight, bias, RECIPE,
                                   w_cast=_given_rows(w_data, w_scale))
        needs_dgate_up, needs_dw = ctx.needs_input_grad[:2]
        ctx.save_for_backward(*(gate_up, *_saved_weight(weight, w_data, w_scale)) if needs_dgate_up
                              else (None,) * 3,
                              *(h_data, h_scale) if needs_dw else (None, None))
        ctx.has_bias = bias is not None
        ctx.in_place_backward = in_place_backward  # on the caller's gate_up, or on as_rows' copy of it
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, w_saved, w_scale_saved, h_data, h_scale = ctx.saved_tensors
        h_fp8 = Float8Rows(h_data, h_scale) if h_data is not None else None
        weight = _weight_for_dh(w_saved, w_scale_saved)
        dh, dw, db = float8_backward_products(as_rows(dy), h_fp8, weight, RECIPE,
                                              bias_grad=ctx.has_bias and ctx.needs_input_grad[2])
        grad = None
        if dh is not None:
            if ctx.in_place_backward:
                swiglu_packed_backward_in_place(dh, gate_up)
                grad = gate_up
            else:
                grad = swiglu_packed_backward(dh, gate_up)
        return grad, dw, db, None, None, None


class _FeedForwardFunction(torch.autograd.Function):
    """x, residual [M, H], norm_weight [H], w13 [2D, H], w2 [H, D] (no biases), and the rows of
    each weight given (data, scale) or None: add_rms_norm, then w13, SwiGLU, w2, as the two
    Functions above chained, except that gate_up's gradient is written by SwiGLU's backward as its
    FP8 rows (w13's dy rows), never in bf16 (`add_rms_norm_mlp`)."""

    @staticmethod
    def forward(ctx, x, residual, norm_weight, eps, w13, w2, w13_data, w13_scale, w2_data, w2_scale):
        h_data, h_scale, summed, rstd = rms_norm_forward_float8(x, residual, norm_weight, eps)
        gate_up = float8_forward_product(Float8Rows(h_data, h_scale), w13, None, RECIPE,
                                         w_cast=_given_rows(w13_data, w13_scale))
        a_data, a_scale = swiglu_packed_forward_float8(gate_up)
        y = float8_forward_product(Float8Rows(a_data, a_scale), w2, None, RECIPE,
                                   w_cast=_given_rows(w2_data, w2_scale))
        needs_dx = any(ctx.needs_input_grad[:3])
        needs_dw13, needs_dw2 = ctx.needs_input_grad[4:6]
        needs_dgate_up = needs_dx or needs_dw13
        ctx.save_for_backward(*(summed, norm_weight, rstd) if needs_dx else (None,) * 3,
                              *_saved_weight(w13, w13_data, w13_scale) if needs_dx else (None, None),
                              *(h_data, h_scale) if needs_dw13 else (None, None),
                              gate_up if needs_dgate_up else None,
                              *_saved_weight(w2, w2_data, w2_scale) if needs_dgate_up else (None, None),
                              *(a_data, a_scale) if needs_dw2 else (None, None))
        return y, summed

    @staticmethod
    def backward(ctx, dy, dsum):
        (summed, norm_weight, rstd, w13_saved, w13_scale_saved, h_data, h_scale, gate_up,
         w2_saved, w2_scale_saved, a_data, a_scale) = ctx.saved_tensors
        a_fp8 = Float8Rows(a_data, a_scale) if a_data is not None else None
        w2_for_da = _weight_for_dh(w2_saved, w2_scale_saved)
        da, dw2, _ = float8_backward_products(as_rows(dy), a_fp8, w2_for_da, RECIPE)
        dx = dnorm_weight = dw13 = None
        if da is not None:
            if backward_float8_fits_over_dy(da):  # da is read by nothing else
                dgate_up = Float8Rows(da.view(E4M3), swiglu_packed_backward_float8_over_dy(da, gate_up))
            else:
                dgate_up = Float8Rows(*swiglu_packed_backward_float8(da, gate_up))
            del da
            h_fp8 = Float8Rows(h_data, h_scale) if h_data is not None else None
            w13_for_dh = _weight_for_dh(w13_saved, w13_scale_saved)
            dh, dw13, _ = float8_backward_products(dgate_up, h_fp8, w13_for_dh, RECIPE, out_dtype=dy.dtype)
            if dh is not None:
                dsum = as_rows(dsum) if dsum is not None else None
                dx, dnorm_weight = rms_norm_backward(dh, summed, norm_weight, rstd, dsum)
        return dx, dx, dnorm_weight, None, dw13, dw2, None, None, None, None


class _DequantizedWeightFunction(torch.autograd.Function):
    """weight [N, K] (its gradient's shape and dtype), its rows w_data [N, K] e4m3 and w_scale
    [N, 1]: the rows' values in weight's dtype, exact (a power-of-two scale); the gradient
    passes to weight."""

    @staticmethod
    def forward(ctx, weight, w_data, w_scale):
        return Float8Rows(w_data, w_scale).dequantize(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _exact_weight(weight: torch.Tensor, weight_fp8: Float8Rows | None) -> torch.Tensor:
    """What the exact fallback multiplies by: weight, or the values weight_fp8's rows hold."""
    if weight_fp8 is None:
        return weight
    return _DequantizedWeightFunction.apply(weight, weight_fp8.data, weight_fp8.scale)


def _check_linear(name: str, source: torch.Tensor, k: int, weight: torch.Tensor, bias,
                  weight_fp8: Float8Rows | None) -> None:
    """weight [N, k] and bias [N] in the dtype of the producer's input `source` (named `name`),
    to multiply the producer's output [..., k]; weight_fp8 None or weight's rows cast."""
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape [N, {k}] to multiply {name}'s output, got {list(weight.shape)}")
    check_same_dtype("weight", weight, name, source)
    if bias is not None:
        check_shape("bias", bias, [weight.shape[0]])
        check_same_dtype("bias", bias, name, source)
    check_same_device(**{name: source, "weight": weight, "bias": bias})
    if weight_fp8 is not None:
        _check_weight_fp8(weight, weight_fp8)


def _check_weight_fp8(weight: torch.Tensor, weight_fp8: Float8Rows) -> None:
    """weight_fp8 is what `quantize_rows(weight)` makes: e4m3 data of weight's shape, contiguous
    (the product reads it as it is), a float32 scale a row, on weight's device."""
    if not isinstance(weight_fp8, Float8Rows):
        raise TypeError(f"weight_fp8 must be a Float8Rows, quantize_rows(weight), "
                        f"got a {type(weight_fp8).__name__}")
    data, scale = weight_fp8
    shape = list(weight.shape)
    if data.dtype != E4M3 or list(data.shape) != shape or not data.is_contiguous():
        layout = "contiguous" if data.is_contiguous() else "not contiguous"
        raise ValueError(f"weight_fp8.data must be torch.float8_e4m3fn of weight's shape {shape}, "
                         f"contiguous, got {data.dtype} {list(data.shape)}, {layout}")
    if scale.dtype != torch.float32 or list(scale.shape) != [shape[0], 1]:
        raise ValueError(f"weight_fp8.scale must be torch.float32 of shape {[shape[0], 1]}, one per row of "
                         f"weight, got {scale.dtype} {list(scale.shape)}")
    check_same_device(**{"weight": weight, "weight_fp8.data": data, "weight_fp8.scale": scale})


def _check_norm(x, residual, norm_weight, weight, bias, weight_fp8) -> None:
    check_norm_inputs(x, norm_weight, residual, weight_name="norm_weight")
    _check_linear("x", x, x.shape[-1], weight, bias, weight_fp8)


def _weight_rows(weight_fp8: Float8Rows | None) -> tuple:
    """(w_data, w_scale) for the Functions: weight_fp8's, or (None, None)."""
    return tuple(weight_fp8) if weight_fp8 is not None else (None, None)


def _takes_fp8(source: torch.Tensor, k: int, weight: torch.Tensor) -> bool:
    """Whether the producer's output [M, k] (M: the rows of its input `source`) times weight^T
    runs in FP8."""
    m = source.numel() // source.shape[-1] if source.shape[-1] else 0
    return takes_fp8_product(m, k, weight.shape[0])


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, *,
                    weight_fp8: Float8Rows | None = None) -> torch.Tensor:
    """`F.linear(rms_norm(x, norm_weight, eps), weight, bias)`, its product rowwise FP8 (as
    float8_linear's) and the norm writing only the FP8 rows it reads.

    x: [..., K]; norm_weight: [K]; weight: [N, K]; bias: [N]; x's dtype for all. -> [..., N].
    weight_fp8: W's rows already cast, `quantize_rows(weight)` (e4m3 [N, K] contiguous, float32
    scale [N, 1]), multiplied by as they are; W's columns for dx are made from them. weight then
    gives the gradient's dtype and shape and receives it, its values unread: shapes the FP8
    product cannot take multiply by the rows' values, dequantized exactly."""
    _check_norm(x, None, norm_weight, weight, bias, weight_fp8)
    if not _takes_fp8(x, x.shape[-1], weight):
        return F.linear(rms_norm(x, norm_weight, eps), _exact_weight(weight, weight_fp8), bias)
    y = _RMSNormLinearFunction.apply(as_rows(x), None, norm_weight, eps, weight, bias,
                                     *_weight_rows(weight_fp8))
    return y.view(*x.shape[:-1], -1)


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        weight_fp8: Float8Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`F.linear(rms_norm(x + residual), weight, bias)`, x + residual): `add_rms_norm` and the
    linear layer after it, as `rms_norm_linear` (weight_fp8 too); the sum rounded to x's dtype."""
    _check_norm(x, residual, norm_weight, weight, bias, weight_fp8)
    if not _takes_fp8(x, x.shape[-1], weight):
        h, summed = add_rms_norm(x, residual, norm_weight, eps)
        return F.linear(h, _exact_weight(weight, weight_fp8), bias), summed
    y, summed = _RMSNormLinearFunction.apply(as_rows(x), as_rows(residual), norm_weight, eps, weight, bias,
                                             *_weight_rows(weight_fp8))
    return y.view(*x.shape[:-1], -1), summed.view(x.shape)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  in_place_backward: bool = False, *, weight_fp8: Float8Rows | None = None) -> torch.Tensor:
    """`F.linear(swiglu_packed(gate_up), weight, bias)`, its product rowwise FP8 and SwiGLU
    writing only the FP8 rows it reads.

    gate_up: [..., 2K], gate then up; weight: [N, K]; bias: [N]. in_place_backward: as
    `swiglu_packed`'s, the gradient written over gate_up (for a gate_up nothing else reads).
    weight_fp8: W's rows already cast, as `rms_norm_linear`'s."""
    check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dimension (gate, then up), got shape {list(gate_up.shape)}"
        )
    width = gate_up.shape[-1] // 2
    _check_linear("gate_up", gate_up, width, weight, bias, weight_fp8)
    if not _takes_fp8(gate_up, width, weight):
        return F.linear(swiglu_packed(gate_up, in_place_backward), _exact_weight(weight, weight_fp8), bias)
    y = _SwiGLULinearFunction.apply(as_rows(gate_up), weight, bias, *_weight_rows(weight_fp8),
                                    in_place_backward)
    return y.view(*gate_up.shape[:-1], -1)


def add_rms_norm_mlp(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     w13: torch.Tensor, w2: torch.Tensor, w13_bias: torch.Tensor | None = None,
                     w2_bias: torch.Tensor | None = None, *, w13_fp8: Float8Rows | None = None,
                     w2_fp8: Float8Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp(rms_norm(x + residual)), x + residual) for Llama's gated MLP, mlp(h) =
    `F.linear(swiglu_packed(F.linear(h, w13, w13_bias)), w2, w2_bias)`: `add_rms_norm_linear` for
    w13, then `swiglu_linear` for w2 (w13_fp8 and w2_fp8 as their weight_fp8), in one Function
    whose backward has SwiGLU write gate_up's gradient as the FP8 rows w13's backward reads
    (`swiglu_packed_backward_float8`): 1 byte an element instead of 2, written once instead of
    written and read twice by the cast (float8_columns.py), and written over the memory of w2's
    input gradient, which it is computed from and which holds it exactly, where SwiGLU's kernel
    holds a row in registers (`swiglu_packed_backward_float8_over_dy`). w13's weight gradient
    takes its gradient's columns from those rows, cast again along M, as every weight gradient
    takes x's (float8_linear.py: the cast of the values themselves but for FP8 subnormals).

    x, residual: [..., H]; norm_weight [H]; w13 [2D, H]; w2 [H, D]; x's dtype for all. With a
    bias, or shapes the FP8 product cannot take, it is the two functions one after the other."""
    _check_norm(x, residual, norm_weight, w13, w13_bias, w13_fp8)
    width = w13.shape[0] // 2
    if w13.shape[0] % 2:
        raise ValueError(f"w13 must have an even number of rows (gate, then up), got shape {list(w13.shape)}")
    if w2.dim() != 2 or w2.shape[1] != width:
        raise ValueError(f"w2 must have shape [N, {width}] to multiply SwiGLU's output (half of w13's "
                         f"{w13.shape[0]} rows), got {list(w2.shape)}")
    _check_linear("x", x, width, w2, w2_bias, w2_fp8)
    fused = (w13_bias is None and w2_bias is None and _takes_fp8(x, x.shape[-1], w13)
             and _takes_fp8(x, width, w2))
    if not fused:
        gate_up, summed = add_rms_norm_linear(x, residual, norm_weight, eps, w13, w13_bias,
                                              weight_fp8=w13_fp8)
        # w13's output is read by nothing but SwiGLU: its gradient may take its memory.
        return swiglu_linear(gate_up, w2, w2_bias, in_place_backward=True, weight_fp8=w2_fp8), summed
    y, summed = _FeedForwardFunction.apply(as_rows(x), as_rows(residual), norm_weight, eps, w13, w2,
                                           *_weight_rows(w13_fp8), *_weight_rows(w2_fp8))
    return y.view(*x.shape[:-1], -1), summed.view(x.shape)
