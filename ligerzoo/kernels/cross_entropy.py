"""Cross-entropy over the last dimension of logits, with label smoothing and an ignored target.

For one row x of V logits, target t and smoothing eps (lse = log sum_j exp x_j):

    loss     = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j)
    dloss/dx = softmax(x) - (1 - eps) * onehot(t) - eps / V

Rows whose target is `ignore_index` have loss 0 and gradient 0; "mean" divides by the number of
rows that are not ignored (0 / 0 = NaN when all are, as torch does).

One kernel does both directions: it sweeps the row once for the log-sum-exp (online: a running
max and a running sum of exponentials), then sweeps it again writing the gradient, which is
therefore computed in the forward and kept. The backward only multiplies it by the incoming
gradient, in place, and skips rows whose incoming gradient is exactly 1 (`loss.backward()` on a
"mean" or "sum" loss), so a training step reads the logits twice and writes the gradient once.
"""

import torch
import triton
import triton.language as tl

from ligerzoo.kernels._utils import (
    IGNORE_INDEX,
    as_rows,
    assert_targets_in_range,
    check_float,
    check_loss_options,
    check_rows,
    check_same_device,
    check_target,
    kernel_op,
    launch,
    row_block,
    runs_triton,
)

# Elements of a row one loop step holds. Large, so that few cross-warp reductions are paid per
# row, but small enough that two programs fit on a multiprocessor and the rows in flight stay
# within L2 for the gradient sweep's second read. Measured on the H100 at [4096, 128256] bf16,
# loss and gradient: 8192 -> 1.10 ms, 16384 -> 0.97 ms, 32768 -> 0.99 ms, 65536 -> 1.11 ms.
MAX_BLOCK = 16384


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr, target_stride,
    loss_ptr, scale_ptr, error_flag_ptr,
    n_cols, ignore_index, label_smoothing,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row.

    logits_ptr: [rows, n_cols], unit column stride, any float dtype; read only.
    grad_ptr:   [rows, n_cols] gradient of the row's loss times *scale_ptr; may be logits_ptr
                itself (in place): every element is read before it is written.
    target_ptr: [rows] integer class indices.
    loss_ptr:   [rows] float32, the unscaled per-row loss.
    scale_ptr:  float32 scalar on the device (1 / non-ignored count for "mean"), so the host
                never waits for the count.
    error_flag_ptr: int32 scalar, set to 1 by any row whose target is outside [0, n_cols)
                and not ignore_index; such a row gets NaN loss and gradient and reads nothing.
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    target = tl.load(target_ptr + row * target_stride).to(tl.int64)
    ignored = target == ignore_index
    out_of_range = ((target < 0) | (target >= n_cols)) & (target != ignore_index)
    cols = tl.arange(0, BLOCK)
    n_blocks = tl.cdiv(n_cols, BLOCK)

    if (target != ignore_index) & (target >= 0) & (target < n_cols):
        # Read before the gradient sweep: in place, that sweep overwrites it.
        target_logit = tl.load(logits_row + target).to(tl.float32)
        running_max = float("-inf")
        running_sum = 0.0
        logit_sum = 0.0
        for block in range(0, n_blocks):
            offsets = block * BLOCK + cols
            mask = offsets < n_cols
            # evict_last: the gradient sweep reads these bytes again, from L2 if they stayed.
            x = tl.load(logits_row + offsets, mask=mask, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
            logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = running_max + tl.log(running_sum)
        loss = (1.0 - label_smoothing) * (lse - target_logit)
        if label_smoothing > 0.0:
            # Only here: with eps = 0 a -inf logit (a masked vocabulary entry) must not turn
            # 0 * inf into NaN.
            loss += label_smoothing * (lse - logit_sum / n_cols)
        tl.store(loss_ptr + row, loss)

        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            smoothing_per_class = label_smoothing / n_cols
            # Backwards along the row: the blocks the first sweep read last are the likeliest
            # to still be in L2.
            for step in range(0, n_blocks):
                offsets = (n_blocks - 1 - step) * BLOCK + cols
                mask = offsets < n_cols
                x = tl.load(logits_row + offsets, mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                grad = tl.exp(x - lse) - smoothing_per_class
                grad = tl.where(offsets == target, grad - (1.0 - label_smoothing), grad)
                # evict_first on both: L2 space is better spent on logits still to be re-read.
                tl.store(grad_row + offsets, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")
    else:
        # Ignored rows contribute nothing; out-of-range rows are poisoned and flagged, so the
        # caller's asynchronous assert fires and nothing outside the row is touched.
        fill = tl.where(ignored, 0.0, float("nan"))
        if out_of_range:
            tl.store(error_flag_ptr, 1)
        tl.store(loss_ptr + row, fill)
        if COMPUTE_GRAD:
            fill_block = tl.zeros([BLOCK], dtype=tl.float32) + fill
            for block in range(0, n_blocks):
                offsets = block * BLOCK + cols
                tl.store(grad_row + offsets, fill_block.to(grad_ptr.dtype.element_ty), mask=offsets < n_cols)


@triton.jit
def _scale_rows_kernel(
    grad_ptr, grad_row_stride, grad_output_ptr, grad_output_stride, n_cols, BLOCK: tl.constexpr
):
    """grad[row] *= grad_output[row * grad_output_stride] (stride 0: one scalar for all rows).

    A row whose factor is exactly 1 is left alone: multiplying by 1 changes no bit, and
    skipping it saves a read and a write of the whole gradient in the common case.
    """
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(grad_output_ptr + row * grad_output_stride).to(tl.float32)
    if factor != 1.0:
        grad_row = grad_ptr + row * grad_row_stride
        cols = tl.arange(0, BLOCK)
        for block in range(0, tl.cdiv(n_cols, BLOCK)):
            offsets = block * BLOCK + cols
            mask = offsets < n_cols
            grad = tl.load(grad_row + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_row + offsets, (grad * factor).to(grad_ptr.dtype.element_ty), mask=mask)


# The PyTorch path: the kernels' semantics, for CPU tensors when Triton is not interpreting.


def _cross_entropy_torch(
    logits2d, target, grad_out, scale, ignore_index, label_smoothing, loss_out, error_flag
) -> None:
    """As `_cross_entropy_kernel`, in float32, out of range targets and in-place gradient included."""
    n_cols = logits2d.shape[1]
    x = logits2d.float()
    target = target.long()
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= n_cols))
    safe_target = torch.where(counted & ~bad, target, 0)[:, None]
    lse = torch.logsumexp(x, dim=1)
    loss = (1.0 - label_smoothing) * (lse - x.gather(1, safe_target).squeeze(1))
    if label_smoothing > 0.0:
        loss = loss + label_smoothing * (lse - x.mean(dim=1))
    nan = torch.full_like(loss, float("nan"))
    loss_out.copy_(torch.where(bad, nan, torch.where(counted, loss, 0.0)))
    error_flag.copy_(torch.maximum(error_flag, bad.any().to(torch.int32)))
    if grad_out is not None:
        grad = torch.softmax(x, dim=1) - label_smoothing / n_cols
        grad.scatter_add_(1, safe_target, torch.full_like(loss[:, None], label_smoothing - 1.0))
        grad = torch.where(counted[:, None], grad * scale.float(), 0.0)
        grad_out.copy_(torch.where(bad[:, None], float("nan"), grad))


def _scale_rows_torch(grad, grad_output):
    """As `_scale_rows_kernel`: multiplying by 1 is exact, so this matches its skipping bit for bit."""
    grad.copy_(grad.float() * grad_output.float()[:, None])


def launch_cross_entropy(
    logits2d: torch.Tensor,
    target: torch.Tensor,
    grad_out: torch.Tensor | None,
    scale: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    loss_out: torch.Tensor | None = None,
    error_flag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of `logits2d` and, unless `grad_out` is None, its gradient.

    A plain function (no custom op), for use inside other ops' launchers such as the fused
    linear cross-entropy, which hands it a chunk of logits and `grad_out=logits2d` to turn the
    chunk into its own gradient in place.

    logits2d: [rows, V], any float dtype, unit column stride, any row stride (a view is fine).
    target:   [rows] int64 or int32, any stride.
    grad_out: [rows, V] receiving d loss_row / d logits * scale (may be logits2d itself), or None.
    scale:    float32 scalar tensor on the device, as `gradient_scale` gives it.
    loss_out: optional [rows] float32 to write the unscaled per-row losses into (e.g. a slice).
    error_flag: optional int32 [1] to accumulate into across calls; it is set to 1 when some
        target lies outside [0, V) and is not ignore_index (those rows get NaN). Check it
        with `assert_targets_in_range`: nothing here syncs with the host.
    Returns (loss_out, error_flag).
    """
    n_rows, n_cols = logits2d.shape
    device = logits2d.device
    if loss_out is None:
        loss_out = torch.empty(n_rows, dtype=torch.float32, device=device)
    if error_flag is None:
        error_flag = torch.zeros(1, dtype=torch.int32, device=device)
    if n_rows == 0:
        return loss_out, error_flag
    for name, t in (("logits2d", logits2d), ("grad_out", grad_out)):
        if t is not None and n_cols > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")
    if grad_out is not None and grad_out.shape != logits2d.shape:
        raise ValueError(f"grad_out has shape {list(grad_out.shape)}, expected {list(logits2d.shape)}")
    if not runs_triton(logits2d):
        _cross_entropy_torch(
            logits2d, target, grad_out, scale, ignore_index, label_smoothing, loss_out, error_flag
        )
        return loss_out, error_flag
    block, num_warps = row_block(n_cols, MAX_BLOCK)
    launch(_cross_entropy_kernel)[(n_rows,)](
        logits2d, logits2d.stride(0),
        grad_out if grad_out is not None else logits2d,
        grad_out.stride(0) if grad_out is not None else 0,
        target, target.stride(0),
        loss_out, scale, error_flag,
        n_cols, ignore_index, label_smoothing,
        COMPUTE_GRAD=grad_out is not None, BLOCK=block, num_warps=num_warps,
    )
    return loss_out, error_flag


def gradient_scale(
    target: torch.Tensor, ignore_index: int, reduction: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 factor every row's gradient takes (1 / the rows counted for "mean", else 1)
    and, for "mean", that count of rows whose target is not ignore_index (else None). Device
    scalars, so the host never waits for the count."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=target.device), None
    counted = (target != ignore_index).sum()
    return 1.0 / counted.to(torch.float32), counted


def reduce_loss(loss_rows: torch.Tensor, reduction: str, counted: torch.Tensor | None) -> torch.Tensor:
    """Per-row losses reduced as asked; "mean" divides by `counted` from `gradient_scale` (0 / 0
    is NaN when every target is ignored, as torch's)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / counted


@kernel_op("cross_entropy_forward")
def _forward(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
    reduction: str, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] with unit column stride, target [N]. Returns (loss reduced as asked, in
    logits' dtype; gradient of that loss w.r.t. logits, or an empty [0, V] placeholder; int32
    [1] error flag, nonzero when a target was out of range)."""
    n_rows, n_cols = logits.shape
    scale, counted = gradient_scale(target, ignore_index, reduction)
    grad = torch.empty((n_rows if compute_grad else 0, n_cols), dtype=logits.dtype, device=logits.device)
    loss_rows, error_flag = launch_cross_entropy(
        logits, target, grad if compute_grad else None, scale, ignore_index, label_smoothing
    )
    return reduce_loss(loss_rows, reduction, counted).to(logits.dtype), grad, error_flag


@kernel_op("cross_entropy_scale_grad_", mutates_args={"grad"})
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad [N, C] (unit column stride) *= grad_output, which is [N] (one factor per row, e.g.
    per-row losses) or [1] (a reduced loss). Rows whose factor is exactly 1 are not touched."""
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return
    if not runs_triton(grad):
        _scale_rows_torch(grad, grad_output)
        return
    block, num_warps = row_block(n_cols, MAX_BLOCK)
    launch(_scale_rows_kernel)[(n_rows,)](
        grad, grad.stride(0), grad_output, grad_output.stride(0) if grad_output.shape[0] == n_rows else 0,
        n_cols,
        BLOCK=block, num_warps=num_warps,
    )


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction, compute_grad):
        logits2d = as_rows(logits)
        loss, grad, error_flag = _forward(
            logits2d, target.reshape(-1), ignore_index, label_smoothing, reduction, compute_grad
        )
        assert_targets_in_range(error_flag, "cross_entropy")
        # The gradient is computed now, while the logits are being read anyway, and is all
        # the backward needs. The backward scales it in place, which bumps its version: a
        # second backward through a retained graph raises instead of scaling twice.
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return loss.view(target.shape) if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale_grad_(grad, grad_loss.reshape(-1))
        return grad.view(ctx.logits_shape), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy with the classes on the LAST dimension.

    logits: [..., V] float; target: [...] int64 or int32 class indices. A target outside
    [0, V) that is not ignore_index fails an asynchronous assert (immediately on CPU, as a
    device-side assert on CUDA, like torch's own). The result has logits' dtype.
    """
    check_float("logits", logits)
    check_rows("logits", logits, last_dim="class")
    check_target(target, "logits", logits)
    check_loss_options(ignore_index, label_smoothing, reduction)
    check_same_device(logits=logits, target=target)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return _CrossEntropyFunction.apply(
        logits, target, ignore_index, float(label_smoothing), reduction, compute_grad
    )


class LossOptions(torch.nn.Module):
    """The options every cross-entropy module holds, checked once at construction."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        check_loss_options(ignore_index, label_smoothing, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")


class CrossEntropyLoss(LossOptions):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """cross_entropy(logits [..., V], target [...]) with this module's options."""
        return cross_entropy(logits, target, self.ignore_index, self.label_smoothing, self.reduction)
