"""Cross-entropy of a linear layer's output, `cross_entropy(hidden @ weight.T + bias, target)`,
without ever holding the [N, V] logits.

For a chunk of c rows (h = hidden[rows], W = weight, G = d loss / d logits of those rows):

    logits  = h @ W.T + bias           [c, V]   cuBLAS, into one reused buffer
    G       = cross_entropy gradient   [c, V]   the cross-entropy kernel, in place over logits
    dhidden[rows]  = G @ W             [c, H]
    dweight       += G.T @ h           [V, H]
    dbias         += sum over rows of G   (float32)

For "mean" and "sum" the gradient of the loss does not depend on anything the backward brings
but one scalar, so all three matmuls run in the forward, while the chunk's logits are at hand,
and the backward only scales the finished gradients (in place, skipped when the scalar is 1).
For "none" the per-row incoming gradient is unknown until the backward, which therefore
recomputes each chunk's logits (a fourth matmul) and scales the gradient rows before the two
gradient matmuls.

Chunk size. Each chunk streams all of W twice (logits, dhidden) and reads and writes all of
dweight once: 4*V*H*itemsize bytes per chunk against 6*c*V*H flops, so the rows per chunk, not
the vocabulary, decide whether the loop is memory- or compute-bound. At the Llama-3-8B head
(N 8192, H 4096, V 128256, bf16) on an H100 (742 TFLOP/s, 3.0 TB/s) the three matmuls take
34.8 ms. 256-row chunks (a 64 MiB buffer) move 134 GB, 45 ms at least, and each dweight update
takes twice as long as its flops (0.70 ms of traffic for 0.36 ms of math). 512-row chunks
(125 MiB) move 67 GB (22 ms) and put the dweight update at the ridge (0.70 ms for 0.72 ms).
Fewer chunks also mean fewer bf16 roundings of the accumulating dweight. So the buffer gets
CHUNK_BUFFER_BYTES, and a chunk the most rows, a multiple of 128 (cuBLAS tiles), that fit.

Where memory allows, `chunk_rows` asks for more. At the Llama-3.2-1B head (N 16384, H 2048, V
128256) each 512-row chunk's dweight update moves 1 GB (0.35 ms at 3 TB/s) for 269 GFLOP (0.38
ms): at the ridge, and inside a training step, where other kernels share the memory, it ran at
526 TFLOP/s against 660-780 for the other two products. An FP8 training step without activation
checkpointing (H100, benchmarks/RESULTS.md) ran at 74.7k tokens/s with 512-row chunks, 76.7k
with 1,024, 78.0k with 2,048 (a 501 MiB buffer) and 77.4k with 4,096. With checkpointing the
step's peak is in the backward, so 2,048 rows cost no memory there, and keep-attention
checkpointing went from 66.1k to 68.7k tokens/s in one command.
"""

import torch

from ligerzoo.kernels._utils import (
    IGNORE_INDEX,
    as_rows,
    assert_targets_in_range,
    check_float,
    check_loss_options,
    check_rows,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_target,
    kernel_op,
)
from ligerzoo.kernels.cross_entropy import (
    LossOptions,
    gradient_scale,
    launch_cross_entropy,
    reduce_loss,
    scale_grad_,
)

# Memory for one chunk of logits: the 128 MiB allowed beyond inputs and gradients, less 2 MiB
# for what else is live (per-row float32 losses, the float32 bias gradient). 512 rows of the
# 128256-wide Llama-3 vocabulary in bf16 fit (125.25 MiB); see the module docstring for why
# 512 and not 256. 64 MiB (256 rows there) matches Liger's footprint at >= 45 ms instead.
CHUNK_BUFFER_BYTES = 126 * 2**20


def rows_per_chunk(vocab: int, itemsize: int) -> int:
    """As many rows as CHUNK_BUFFER_BYTES holds, rounded down to a multiple of 128."""
    rows = max(1, CHUNK_BUFFER_BYTES // (vocab * itemsize))
    return rows // 128 * 128 if rows >= 128 else rows


# Opaque (see kernel_op): traced, the chunk loop is unrolled into the graph, one copy per chunk,
# with nothing to fuse; 8 chunks took 35 s to compile instead of 3 (Inductor on CPU, dynamic shapes).
@kernel_op("linear_cross_entropy", opaque=True)
def _loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    grad_scale: torch.Tensor, ignore_index: int, label_smoothing: float, chunk_rows: int,
    want_grad_hidden: bool, want_grad_weight: bool, want_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] (unit column stride), weight [V, H], target [N], bias [V] or None.

    grad_scale: float32 scalar multiplying every row's gradient (1 / non-ignored count for
    "mean"), or [N] per-row factors (the incoming gradient of a "none" loss).
    Returns (per-row unscaled losses, float32 [N]; grad of hidden [N, H]; grad of weight [V, H];
    grad of bias [V]; int32 [1] flag, nonzero when a target was out of range). A gradient not
    asked for is an empty placeholder with no rows.
    """
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    error_flag = torch.zeros(1, dtype=torch.int32, device=device)
    grad_hidden = torch.empty((n_rows if want_grad_hidden else 0, width), dtype=hidden.dtype, device=device)
    # The first chunk's matmul writes dweight without reading it (beta = 0): no zero-fill pass.
    new_grad_weight = torch.zeros if n_rows == 0 else torch.empty
    grad_weight_shape = (vocab if want_grad_weight else 0, width)
    grad_weight = new_grad_weight(grad_weight_shape, dtype=weight.dtype, device=device)
    grad_bias = torch.zeros(vocab if want_grad_bias else 0, dtype=torch.float32, device=device)
    computes_grad = want_grad_hidden or want_grad_weight or want_grad_bias
    per_row_scale = grad_scale.dim() == 1
    kernel_scale = torch.ones((), dtype=torch.float32, device=device) if per_row_scale else grad_scale

    rows = min(chunk_rows, n_rows)
    logits = torch.empty((rows, vocab), dtype=hidden.dtype, device=device)
    for start in range(0, n_rows, max(rows, 1)):
        end = min(start + rows, n_rows)
        hidden_chunk = hidden[start:end]
        logits_chunk = logits[: end - start]
        if bias is None:
            torch.mm(hidden_chunk, weight.t(), out=logits_chunk)
        else:
            torch.addmm(bias, hidden_chunk, weight.t(), out=logits_chunk)
        launch_cross_entropy(
            logits_chunk, target[start:end], logits_chunk if computes_grad else None, kernel_scale,
            ignore_index, label_smoothing, loss_out=loss_rows[start:end], error_flag=error_flag,
        )
        if not computes_grad:
            continue
        grad_logits = logits_chunk
        if per_row_scale:
            scale_grad_(grad_logits, grad_scale[start:end])
        if want_grad_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if want_grad_weight:
            if start == 0:
                torch.mm(grad_logits.t(), hidden_chunk, out=grad_weight)
            else:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk)
        if want_grad_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
    bias_dtype = bias.dtype if bias is not None else hidden.dtype
    return loss_rows, grad_hidden, grad_weight, grad_bias.to(bias_dtype), error_flag


@_loss_and_grads.register_fake
def _(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, chunk_rows,
      want_grad_hidden, want_grad_weight, want_grad_bias):
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    bias_dtype = bias.dtype if bias is not None else hidden.dtype
    return (
        hidden.new_empty(n_rows, dtype=torch.float32),
        hidden.new_empty((n_rows if want_grad_hidden else 0, width)),
        weight.new_empty((vocab if want_grad_weight else 0, width)),
        hidden.new_empty(vocab if want_grad_bias else 0, dtype=bias_dtype),
        hidden.new_empty(1, dtype=torch.int32),
    )


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_rows,
                grad_enabled):
        hidden2 = as_rows(hidden)
        target1 = target.reshape(-1)
        # needs_input_grad ignores torch.no_grad(), hence grad_enabled from the caller.
        ctx.wants = tuple(grad_enabled and ctx.needs_input_grad[i] for i in (0, 1, 3))
        ctx.options = (ignore_index, label_smoothing, chunk_rows)
        ctx.reduction = reduction
        ctx.hidden_shape = hidden.shape
        scale, counted = gradient_scale(target1, ignore_index, reduction)
        grads_now = ctx.wants if reduction != "none" else (False, False, False)
        loss_rows, grad_hidden, grad_weight, grad_bias, error_flag = _loss_and_grads(
            hidden2, weight, target1, bias, scale, *ctx.options, *grads_now
        )
        assert_targets_in_range(error_flag, "linear_cross_entropy")
        if reduction == "none":
            # The backward recomputes the logits chunk by chunk from these (no copies).
            ctx.save_for_backward(hidden2, weight, target1, bias)
            return loss_rows.view(target.shape)
        # Finished gradients, scaled in place by the backward: a retained graph must not run
        # backward twice.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        # float32 whatever hidden's dtype, as a model that upcasts its logits before the loss
        # reports it: the logits are never seen here, so there is nothing to match but precision.
        return reduce_loss(loss_rows, reduction, counted)

    @staticmethod
    def backward(ctx, grad_loss):
        want_hidden, want_weight, want_bias = ctx.wants
        if ctx.reduction == "none":
            hidden2, weight, target1, bias = ctx.saved_tensors
            _, grad_hidden, grad_weight, grad_bias, _ = _loss_and_grads(
                hidden2, weight, target1, bias, grad_loss.reshape(-1), *ctx.options, *ctx.wants
            )
        else:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            factor = grad_loss.reshape(1)
            # Reuses cross-entropy's row-scaling op: in place, a no-op when the factor is 1.
            grads = (grad_hidden, grad_weight, grad_bias.view(1, -1))
            for grad, wanted in zip(grads, ctx.wants):
                if wanted:
                    scale_grad_(grad, factor)
        return (
            grad_hidden.view(ctx.hidden_shape) if want_hidden else None,
            grad_weight if want_weight else None,
            None,
            grad_bias if want_bias else None,
            None, None, None, None, None,
        )


def _check(hidden, weight, target, bias) -> None:
    check_float("hidden", hidden)
    check_rows("hidden", hidden, last_dim="feature")
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, {hidden.shape[-1]}] with V >= 1, got {list(weight.shape)}"
        )
    check_same_dtype("weight", weight, "hidden", hidden)
    check_target(target, "hidden", hidden)
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, [weight.shape[0]])
        check_same_dtype("bias", bias, "hidden", hidden)
    check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the logits.

    hidden: [..., H] float; weight: [V, H] and bias: [V] of hidden's dtype; target: [...] int64
    or int32 class indices. Options as torch.nn.functional.cross_entropy. A target outside
    [0, V) that is not ignore_index fails an asynchronous assert. The loss is float32.
    chunk_rows: the rows of logits made at a time (a [chunk_rows, V] buffer in hidden's dtype);
    None: as many as CHUNK_BUFFER_BYTES hold. More rows are faster where the memory is there
    (module docstring); only dweight's accumulation, a chunk at a time in its dtype, rounds
    differently.
    """
    _check(hidden, weight, target, bias)
    check_loss_options(ignore_index, label_smoothing, reduction)
    check_chunk_rows(chunk_rows)
    rows = chunk_rows if chunk_rows is not None else rows_per_chunk(weight.shape[0], hidden.element_size())
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, target, bias, ignore_index, float(label_smoothing), reduction, rows,
        torch.is_grad_enabled(),
    )


def check_chunk_rows(chunk_rows: int | None) -> None:
    """chunk_rows is None or a positive int."""
    if chunk_rows is None:
        return
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows is {chunk_rows!r}: expected a positive number of rows, or None for "
                         f"as many as {CHUNK_BUFFER_BYTES >> 20} MiB of logits hold")


class LinearCrossEntropyLoss(LossOptions):
    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                 reduction: str = "mean", chunk_rows: int | None = None):
        super().__init__(ignore_index, label_smoothing, reduction)
        check_chunk_rows(chunk_rows)
        self.chunk_rows = chunk_rows

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear_cross_entropy(hidden [..., H], weight [V, H], target [...], bias [V]) with
        this module's options."""
        return linear_cross_entropy(
            hidden, weight, target, bias, self.ignore_index, self.label_smoothing, self.reduction,
            self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_rows={self.chunk_rows}"
