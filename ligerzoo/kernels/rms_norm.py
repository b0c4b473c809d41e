"""RMSNorm, alone or fused with the residual add before it.

    y = x / sqrt(mean(x^2) + eps) * weight

`add_rms_norm(x, residual, weight, eps)` returns `(rms_norm(x + residual), x + residual)` in one
pass over memory: every decoder block needs that pair twice per layer.

For FP8 training the forward launcher `rms_norm_forward_float8` writes y only as FP8 rows (float8.py's
rowwise e4m3 cast of y as the plain kernel rounds it, bit for bit) in the same pass, so that y is
never written in x's dtype and read again to be cast. It has no autograd.Function here: the FP8
layer that reads y calls it from its own Function, and `rms_norm_backward` from that Function's backward
(the gradient is the plain norm's, whatever format y was written in).
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import (
    MAX_ROW_BLOCK,
    as_rows,
    check_float,
    check_rows,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_shape,
    interpreting,
    kernel_op,
    launch,
    program_count,
    row_block,
    runs_triton,
)
from ligerzoo.kernels.float8 import E4M3, quantize_rows
from ligerzoo.kernels.float8_rows import abs_max_bits, cast_e4m3, power_of_two_scales


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, y_scale_ptr, sum_ptr, rstd_ptr,
    x_row_stride, residual_row_stride, y_row_stride, sum_row_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, FLOAT8: tl.constexpr, EMULATE_FLOAT8: tl.constexpr, BLOCK: tl.constexpr,
):
    """FLOAT8: y_ptr is e4m3 and y_scale_ptr float32 [rows]: y rounded to x's dtype (the plain
    kernel's output), cast with its row's power-of-two scale (float8_rows.py). The same kernel as
    the plain one, so that rstd and y come from the same instructions and reduction order."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # Round the sum to the storage dtype first: the norm must see the same tensor we return.
        s = (x + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row_stride + cols, s, mask=mask)
        x = s.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    y = (x * rstd * w).to(x_ptr.dtype.element_ty)
    if FLOAT8:
        y = y.to(tl.float32)
        quantize, dequantize = power_of_two_scales(abs_max_bits(y))
        tl.store(y_scale_ptr + row, dequantize)
        y = cast_e4m3(y, quantize, EMULATE_FLOAT8)
    tl.store(y_ptr + row * y_row_stride + cols, y, mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, x_ptr, weight_ptr, rstd_ptr, dsum_ptr, dx_ptr, dweight_partial_ptr,
    dy_row_stride, x_row_stride, dsum_row_stride, dx_row_stride,
    n_rows, n_cols,
    HAS_SUM_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # Persistent programs walk rows pid, pid + P, ...; each keeps its own float32 partial of
    # dweight in registers and writes it once, so the weight gradient needs no atomics and
    # reduces in the same order on every run.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid.to(tl.int64), n_rows, n_programs):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dy_w = dy * w
        dx = rstd * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / n_cols))
        if HAS_SUM_GRAD:
            dx += tl.load(dsum_ptr + row * dsum_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dweight_partial_ptr + pid * n_cols + cols, dw, mask=mask)


# Programs per multiprocessor for the backward's persistent grid (each walks its rows one after
# another). Measured on the H100 at [8192, 4096] bf16: 1 -> 101 us, 2 -> 73 us (2750 GB/s),
# 4 -> 100 us, 8 -> 103 us; more programs also mean more float32 partials of dweight to reduce.
BACKWARD_PROGRAMS_PER_SM = 2


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[c] = sum over p of partial[p, c], in a fixed order, cast to out's dtype on store."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


# The PyTorch path: the kernels' math, for CPU tensors when Triton is not interpreting.


def _forward_torch(x, residual, weight, eps, y, summed, rstd) -> None:
    """As `_rms_norm_forward_kernel`, the sum rounded to x's dtype before it is normalised."""
    h = x.float() if residual is None else (x.float() + residual.float()).to(x.dtype)
    if residual is not None:
        summed.copy_(h)
    h = h.float()
    rstd.copy_(torch.rsqrt(h.pow(2).mean(-1) + eps))
    y.copy_(h * rstd[:, None] * weight.float())


def _backward_torch(dy, x, weight, rstd, dsum, dx) -> torch.Tensor:
    """As `_rms_norm_backward_kernel` and the partials' sum: fills dx, returns dweight."""
    x_hat = x.float() * rstd[:, None]
    dy_w = dy.float() * weight.float()
    grad = rstd[:, None] * (dy_w - x_hat * (dy_w * x_hat).mean(-1, keepdim=True))
    if dsum is not None:
        grad = grad + dsum.float()
    dx.copy_(grad)
    return (dy.float() * x_hat).sum(0).to(weight.dtype)


def _run_forward(x, residual, weight, eps, float8: bool):
    """The forward both ops launch. x, residual: [N, D] with unit column stride. Returns (y in
    x's dtype, None), or with float8 (y's e4m3 rows [N, D], their float32 dequantizing scales
    [N, 1]); then x + residual or an empty placeholder, and the per-row reciprocal RMS in float32."""
    n_rows, n_cols = x.shape
    summed = torch.empty((n_rows if residual is not None else 0, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if not runs_triton(x):
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        if n_rows:
            _forward_torch(x, residual, weight, eps, y, summed, rstd)
        # FP8 rows on the PyTorch path: its output, then float8.py's cast of it.
        y, y_scale = quantize_rows(y) if float8 else (y, None)
        return y, y_scale, summed, rstd
    y = torch.empty((n_rows, n_cols), dtype=E4M3 if float8 else x.dtype, device=x.device)
    y_scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device) if float8 else None
    if n_rows == 0:
        return y, y_scale, summed, rstd
    block, num_warps = row_block(n_cols)
    launch(_rms_norm_forward_kernel)[(n_rows,)](
        x, residual if residual is not None else x, weight, y, y_scale, summed, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), summed.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, FLOAT8=float8, EMULATE_FLOAT8=interpreting(),
        BLOCK=block, num_warps=num_warps,
    )
    return y, y_scale, summed, rstd


@kernel_op("rms_norm_forward")
def rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: [N, D] with unit column stride. Returns (y, x + residual or an empty
    placeholder, per-row reciprocal RMS in float32)."""
    y, _, summed, rstd = _run_forward(x, residual, weight, eps, float8=False)
    return y, summed, rstd


@kernel_op("rms_norm_forward_float8")
def rms_norm_forward_float8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `rms_norm_forward` (D >= 1), y written only as FP8 rows: (y's e4m3 data [N, D], its float32
    dequantizing scales [N, 1], x + residual or an empty placeholder, rstd [N]); the data and
    scales are `quantize_rows(y)` bit for bit, y as `rms_norm_forward` writes it."""
    return _run_forward(x, residual, weight, eps, float8=True)


@kernel_op("rms_norm_backward")
def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    dsum: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x (plus dsum, the gradient reaching the returned sum, when fused) and weight."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    if not runs_triton(x):
        return dx, _backward_torch(dy, x, weight, rstd, dsum, dx)
    block, num_warps = row_block(n_cols)
    n_programs = min(n_rows, program_count(x.device, per_sm=BACKWARD_PROGRAMS_PER_SM))
    dweight_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    dweight = torch.empty_like(weight)
    launch(_rms_norm_backward_kernel)[(n_programs,)](
        dy, x, weight, rstd, dsum if dsum is not None else dy, dx, dweight_partial,
        dy.stride(0), x.stride(0), dsum.stride(0) if dsum is not None else 0, dx.stride(0),
        n_rows, n_cols,
        HAS_SUM_GRAD=dsum is not None, BLOCK=block, num_warps=num_warps,
    )
    # A kernel rather than `.sum(0).to(dtype)`: one launch instead of two ops, which matters
    # because the backward runs on autograd's device thread, where each PyTorch op costs about
    # 150 us of host time (H100 machine, torch 2.11) against a few for a Triton launch.
    launch(_sum_partials_kernel)[(triton.cdiv(n_cols, 64),)](
        dweight_partial, dweight, n_programs, n_cols, BLOCK_ROWS=32, BLOCK_COLS=64, num_warps=4,
    )
    return dx, dweight


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        x2 = as_rows(x)
        r2 = as_rows(residual) if residual is not None else None
        y, summed, rstd = rms_norm_forward(x2, r2, weight, eps)
        # The backward needs only the normalised input and the per-row 1/rms: we save the input
        # (or the sum, an output anyway) and recompute x_hat from it. The tensors saved are the
        # input and the output themselves, not [rows, width] views: under torch.compile, a saved
        # view of either inside a checkpointed region is an aliasing error.
        ctx.has_residual = residual is not None
        if residual is None:
            ctx.save_for_backward(x, weight, rstd)
            return y.view(shape)
        summed = summed.view(shape)
        ctx.save_for_backward(summed, weight, rstd)
        return y.view(shape), summed

    @staticmethod
    def backward(ctx, dy, dsum=None):
        h, weight, rstd = ctx.saved_tensors
        dy2 = as_rows(dy)
        dsum2 = as_rows(dsum) if (ctx.has_residual and dsum is not None) else None
        dh, dweight = rms_norm_backward(dy2, as_rows(h), weight, rstd, dsum2)
        dh = dh.view(dy.shape)
        if ctx.has_residual:
            return dh, dh, dweight, None
        return dh, None, dweight, None


def check_norm_inputs(x, weight, residual=None, weight_name: str = "weight") -> None:
    """The norm's arguments (also where the FP8 fused layers take them, whose `weight_name` is
    norm_weight), each error naming the argument."""
    check_float("x", x)
    check_rows("x", x)
    if x.shape[-1] > MAX_ROW_BLOCK:
        raise ValueError(f"rms_norm: rows of {x.shape[-1]} elements exceed the supported {MAX_ROW_BLOCK}")
    check_float(weight_name, weight)
    check_shape(weight_name, weight, [x.shape[-1]])
    if residual is not None:
        check_float("residual", residual)
        check_same_shape("residual", residual, "x", x)
        check_same_dtype("residual", residual, "x", x)
    check_same_device(**{"x": x, weight_name: weight, "residual": residual})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading dims); output in x's dtype."""
    check_norm_inputs(x, weight)
    return _RMSNormFunction.apply(x, None, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x's dtype."""
    check_norm_inputs(x, weight, residual)
    return _RMSNormFunction.apply(x, residual, weight, eps)


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x); with a residual, the pair (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
