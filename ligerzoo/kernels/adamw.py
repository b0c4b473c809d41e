"""AdamW's update of one parameter, in one pass over it, its gradient and its two moments.

    g          = grad / grad_scale                   (gradient clipping folded in; 1 without it)
    param     *= 1 - lr * weight_decay               (decoupled weight decay)
    exp_avg    = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    param     -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

the formulas of `torch.optim.AdamW`'s fused CUDA kernel, in float32 whatever the tensors' dtype,
each stored back rounded to its own (the weight decay as a product, where torch subtracts
lr * weight_decay * param: the two differ by a rounding). `step` is the step's count
after this update, a float32 tensor on the parameter's device, so nothing waits on the host.

Purely memory bound: 8 bytes an element read and 6 written for bf16 tensors. torch's fused AdamW
takes the same formulas through `multi_tensor_apply`, and with a `grad_scale` it also writes
each gradient back divided: on an H100, Llama-3.2-1B's 1.24B bf16 parameters took 9.2 ms there
(7.6 without the scale) and 6.0 ms here, one launch a tensor (2.9 TB/s; a copy runs at 3.05;
benchmarks/RESULTS.md).
"""

import math

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import check_same_device, interpreting, runs_triton
from ligerzoo.kernels.float8 import E4M3, Float8Rows, quantize_rows
from ligerzoo.kernels.float8_rows import abs_max_bits, cast_e4m3, power_of_two_scales

# Elements a program: 4 warps, a 16-byte load a thread from each bf16 tensor. 1024 to 4096 took
# the same time on an H100; 8192 (16 warps) 5% more.
BLOCK = 1024
NUM_WARPS = 4
# A row-casting program's slice: rows of Llama's block weights are 2048 to 14336 wide.
ROW_BLOCK = 2048


@triton.jit
def _update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_scale_ptr, offsets, mask,
            lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
            HAS_GRAD_SCALE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The update at `offsets`, stored; returns the parameter as stored, in float32."""
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr)
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    step = tl.load(step_ptr)
    # beta**step as 2**(step * log2(beta)): no float pow in Triton's language.
    step_size = lr / (1.0 - tl.exp2(step * log2_beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
    param = param * (1.0 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    param = param - step_size * exp_avg / (tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps)
    param = _rounded(param, param_ptr.dtype.element_ty, EMULATE_BF16)
    tl.store(param_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, _rounded(exp_avg, exp_avg_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, _rounded(exp_avg_sq, exp_avg_sq_ptr.dtype.element_ty, EMULATE_BF16),
             mask=mask)
    return param.to(tl.float32)


@triton.jit
def _adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_scale_ptr,
    n, lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
    HAS_GRAD_SCALE: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_scale_ptr, offsets, offsets < n,
            lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2, HAS_GRAD_SCALE, EMULATE_BF16)


@triton.jit
def _adamw_rows_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_scale_ptr, rows_ptr, rows_scale_ptr,
    n_cols, lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
    HAS_GRAD_SCALE: tl.constexpr, ROWS_FROM_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr,
    EMULATE_FLOAT8: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program a row of a [N, K] parameter: the update of each BLOCK-wide slice, its row's
    amax taken on the way; then each slice, read back as stored (from L2, mostly), cast to the
    row's FP8 (rows_ptr e4m3 [N, K], rows_scale_ptr float32 [N]). ROWS_FROM_BF16: the rows are
    of the parameter rounded to bf16 (float32 master weights, bf16 compute)."""
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    amax_bits = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        offsets = row_start + start + cols
        param = _update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_scale_ptr,
                        offsets, mask, lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
                        HAS_GRAD_SCALE, EMULATE_BF16)
        param = _row_value(param, ROWS_FROM_BF16, EMULATE_BF16)
        amax_bits = tl.maximum(amax_bits, abs_max_bits(tl.where(mask, param, 0.0)))
    quantize, dequantize = power_of_two_scales(amax_bits)
    tl.debug_barrier()  # every thread's stores of the row before any reads it back
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        offsets = row_start + start + cols
        param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        param = _row_value(param, ROWS_FROM_BF16, EMULATE_BF16)
        tl.store(rows_ptr + offsets, cast_e4m3(param, quantize, EMULATE_FLOAT8), mask=mask)
    tl.store(rows_scale_ptr + tl.program_id(0), dequantize)


@triton.jit
def _row_value(param, ROWS_FROM_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The parameter's value as the rows cast it: itself, or rounded to bf16."""
    if ROWS_FROM_BF16:
        param = _rounded(param, tl.bfloat16, EMULATE_BF16).to(tl.float32)
    return param


@triton.jit
def _rounded(v, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 v in dtype, rounded to nearest even. EMULATE_BF16: Triton's interpreter (3.6)
    truncates float32 to bfloat16 (1 + 2**-8 + 2**-10 -> 1), so v is rounded on its bits first,
    to a value the truncation then keeps (a carry into the exponent rounds up to inf)."""
    if EMULATE_BF16 and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        v = tl.where(v != v, v, rounded)  # NaN's bits could carry into the sign
    return v.to(dtype)


def _adamw_torch(param, grad, exp_avg, exp_avg_sq, step, grad_scale,
                 lr, beta1, beta2, eps, weight_decay) -> None:
    """The kernel's math in PyTorch, for CPU tensors when Triton is not interpreting."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    step = step.float()
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = (1.0 - beta2**step).sqrt()
    p = param.float() * (1.0 - lr * weight_decay)
    m = beta1 * exp_avg.float() + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq.float() + (1.0 - beta2) * g * g
    param.copy_(p - step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _check(param, grad, exp_avg, exp_avg_sq, step, grad_scale) -> None:
    tensors = {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in tensors.items():
        if t.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, param {tuple(param.shape)}")
    for name, t in {"param": param, **tensors}.items():
        if not t.is_floating_point() or not t.is_contiguous():
            raise ValueError(f"{name} is {t.dtype} with strides {t.stride()}: "
                             "expected a contiguous float tensor")
    for name, t in {"step": step, "grad_scale": grad_scale}.items():
        if t is not None and (t.numel() != 1 or t.dtype != torch.float32):
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}: expected one float32 value")
    check_same_device(param=param, step=step, grad_scale=grad_scale, **tensors)


@torch.no_grad()
def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: torch.Tensor, grad_scale: torch.Tensor | None, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, rows: Float8Rows | None = None,
                rows_from: torch.dtype | None = None) -> None:
    """One AdamW update of param, exp_avg and exp_avg_sq in place (module docstring). All four of
    one shape, contiguous, any float dtypes; step (the count including this update) and
    grad_scale (None: no scaling) one float32 value each, on their device.

    rows: buffers (data e4m3 [N, K], scale float32 [N, 1]) for a [N, K] param's FP8 rows, written
    in the same pass: `quantize_rows(param.to(rows_from))` of the updated param bit for bit
    (rows_from: param's dtype, the default, or bfloat16)."""
    _check(param, grad, exp_avg, exp_avg_sq, step, grad_scale)
    rows_from = rows_from or param.dtype
    if rows is not None:
        _check_rows(param, rows, rows_from)
    if param.numel() == 0:
        return
    if not runs_triton(param):
        _adamw_torch(param, grad, exp_avg, exp_avg_sq, step, grad_scale, lr, beta1, beta2, eps, weight_decay)
        if rows is not None:
            cast = quantize_rows(param.to(rows_from))
            rows.data.copy_(cast.data)
            rows.scale.copy_(cast.scale)
        return
    # The kernels themselves, not `launch`'s wrap_triton: an optimizer step is not traced, and
    # through wrap_triton a launch costs about 200 us of host time, more than most updates.
    operands = (param, grad, exp_avg, exp_avg_sq, step, grad_scale if grad_scale is not None else step)
    hyperparameters = (lr, beta1, beta2, eps, weight_decay, _log2(beta1), _log2(beta2))
    if rows is None:
        _adamw_kernel[(triton.cdiv(param.numel(), BLOCK),)](
            *operands, param.numel(), *hyperparameters,
            HAS_GRAD_SCALE=grad_scale is not None, EMULATE_BF16=interpreting(), BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
        return
    n_rows, n_cols = param.shape
    block = min(triton.next_power_of_2(n_cols), ROW_BLOCK)
    _adamw_rows_kernel[(n_rows,)](
        *operands, rows.data, rows.scale, n_cols, *hyperparameters,
        HAS_GRAD_SCALE=grad_scale is not None, ROWS_FROM_BF16=rows_from != param.dtype,
        EMULATE_BF16=interpreting(), EMULATE_FLOAT8=interpreting(), BLOCK=block,
        num_warps=max(1, NUM_WARPS * block // BLOCK),
    )


def _check_rows(param: torch.Tensor, rows: Float8Rows, rows_from: torch.dtype) -> None:
    if param.dim() != 2:
        raise ValueError(f"param has shape {tuple(param.shape)}: FP8 rows are of a [N, K] matrix")
    data, scale = rows
    if data.dtype != E4M3 or data.shape != param.shape or not data.is_contiguous():
        raise ValueError(f"the rows' data is {data.dtype} {tuple(data.shape)}: expected contiguous "
                         f"torch.float8_e4m3fn {tuple(param.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (param.shape[0], 1) or not scale.is_contiguous():
        raise ValueError(f"the rows' scale is {scale.dtype} {tuple(scale.shape)}: expected contiguous "
                         f"torch.float32 ({param.shape[0]}, 1)")
    if rows_from not in (param.dtype, torch.bfloat16):
        raise ValueError(f"rows from {rows_from}: the kernel casts the {param.dtype} param itself or rounded "
                         "to torch.bfloat16")
    check_same_device(param=param, data=data, scale=scale)


def _log2(beta: float) -> float:
    """log2(beta), and for beta 0 (no averaging) a value whose 2**(step * it) is 0 from step 1."""
    return math.log2(beta) if beta > 0 else -1e30
