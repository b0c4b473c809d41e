"""How each decoder block is prepared for training: FP8 linear layers, activation checkpointing,
then torch.compile.

Each keeps the block's parameters (and their names): FP8 swaps the linear layers (under rowwise
the blocks too) for ones that hold the same parameters, checkpointing and compile replace the
block's forward. So FSDP2 (parallel.py), applied afterwards, the checkpoints and the export see the
same parameters.
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ligerzoo.models.float8 import convert_to_float8


@functools.cache
def _attention_ops() -> frozenset:
    """The attention kernels a block may call (SDPA's backends, flex_attention)."""
    aten = torch.ops.aten
    names = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward"]
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    return frozenset(ops | {torch.ops.higher_order.flex_attention})


@functools.cache
def _matmul_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


# One function a mode, not closures of one function: torch.compile tells the policies apart by
# their code, so two closures of the same code would share one compiled block.
def _recompute_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_RECOMPUTE


def _keep_attention(ctx, op, *args, **kwargs):
    """Attention's output (and its log-sum-exp) kept, everything else recomputed: the backward of
    block i runs once the blocks after it hold gradients instead of checkpoints, so what it keeps
    adds to the peak only where it outweighs them (benchmarks/train.py measures it)."""
    return CheckpointPolicy.MUST_SAVE if op in _attention_ops() else CheckpointPolicy.MUST_RECOMPUTE


def _keep_matmuls_and_attention(ctx, op, *args, **kwargs):
    """The matmuls (FP8 ones too) and attention kept, expensive to recompute; everything else a
    block does (norms, RoPE, SwiGLU, residual adds, FP8 casts: elementwise work) is cheap to redo
    and costly to keep."""
    if op in _matmul_ops() or op in _attention_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_POLICIES = {"full": _recompute_everything, "keep-attention": _keep_attention,
             "selective": _keep_matmuls_and_attention}
CHECKPOINTING_MODES = ("off", *_POLICIES)


def prepare_blocks(model, activation_checkpointing: str = "off", compile: bool = False,
                   float8: str = "off") -> None:
    """FP8, activation checkpointing and torch.compile, block by block.

    activation_checkpointing: "off"; "full", recompute each block's activations in the backward
    instead of keeping them; "keep-attention", the same but keeping attention's output, so its
    forward runs once; "selective", recompute only the cheap elementwise ones, keeping matmul and
    attention outputs. compile: compile each block on its own (the blocks are
    identical, so one graph serves them all). float8: "off", or the recipe ("rowwise",
    "tensorwise") of the FP8 products of the blocks' linear layers (models/float8.py).

    Compiled, the checkpoint is traced with a policy for every op, so Inductor's partitioner
    builds the backward with the recomputation in it: full activation checkpointing recomputes
    only what the backward reads, and skips the block's last matmul (the down projection, whose output only
    feeds the residual stream): a quarter of a Llama block's forward GEMM work, 5% of the
    Llama-3.2-1B step on an H100. Eager, the whole block runs again.
    """
    if activation_checkpointing not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing is {activation_checkpointing!r}: expected one of "
                         f"{', '.join(CHECKPOINTING_MODES)}")
    if float8 != "off":
        convert_to_float8(model, float8)
    options = {"use_reentrant": False}
    # Eager, full checkpointing is the plain checkpoint: the whole block runs again.
    if activation_checkpointing != "off" and (compile or activation_checkpointing != "full"):
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                 _POLICIES[activation_checkpointing])
    for block in model.layers:
        forward = block.forward
        if activation_checkpointing != "off":
            forward = _recomputed(forward, options)
        if compile:
            forward = torch.compile(forward, fullgraph=True)
        block.forward = forward


def _recomputed(forward, options: dict):
    # A function of our own around the call, not functools.partial(checkpoint, ...): torch.compile
    # must trace into a frame that calls `checkpoint` to turn it into its activation-checkpoint
    # operator; a partial of `checkpoint` itself is skipped, and the block silently runs eagerly.
    def forward_with_recompute(x, residual, *args, **kwargs):
        # A block takes the previous block's output and the residual stream apart (its first
        # norm adds them); checkpointed, it would keep both. Adding them here keeps one tensor a
        # block (1 GiB less at the Llama-3.2-1B shape, seq 4096 x 4) for one more elementwise
        # read; the sum is the same bf16 rounding the fused kernel makes.
        if residual is not None:
            x = x + residual
        return checkpoint(forward, x, None, *args, **options, **kwargs)
    return forward_with_recompute
