"""How a model is prepared for training: activation checkpointing and compile, then FSDP2.

Checkpointing and compile replace each block's forward; FSDP comes last, so that its hooks see
the final modules. Each step keeps the parameter names, so the export maps them to Hugging Face
names.
"""

import functools
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


# No NVLink multicast (NVLS) in NCCL, symmetric memory or NVSHMEM: multicast objects can take a
# host's shared GPUs out of service, and nothing here needs them. Every process that may start
# NCCL gets these (init_distributed, and any launcher's environment); a value set outside is kept.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a plain `python train.py` becomes
    a one-rank group, so every run takes the same path. NCCL on GPUs, gloo on CPU."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for name, value in MULTICAST_OFF.items():  # read when each library starts: set them first
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as probe:  # a free port for the one-rank group
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _saved_by_selective_checkpointing() -> set:
    """The ops whose outputs selective checkpointing keeps: the matmuls and attention, which are
    expensive to recompute. Everything else a block does (norms, RoPE, SwiGLU, residual adds:
    the kernels' elementwise work) is cheap to redo and costly to keep."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward"]
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    ops.add(torch.ops.higher_order.flex_attention)
    return ops


def _selective_policy(saved_ops):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _recompute_everything(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_RECOMPUTE


def prepare_blocks(model, checkpointing: str = "off", compile: bool = False) -> None:
    """Activation checkpointing and torch.compile, block by block.

    checkpointing: "off"; "full", recompute each block's activations in the backward instead of
    keeping them; "selective", recompute only the cheap elementwise ones, keeping matmul and
    attention outputs. compile: compile each block on its own (the blocks are identical, so one
    graph serves them all).

    Compiled, the checkpoint is traced with a policy for every op, so Inductor's partitioner
    builds the backward with the recomputation in it: full checkpointing recomputes only what the
    backward reads, and skips the block's last matmul (the down projection, whose output only
    feeds the residual stream): a quarter of a Llama block's forward GEMM work, 5% of the
    Llama-3.2-1B step on an H100. Eager, the whole block runs again.
    """
    options = {"use_reentrant": False}
    if checkpointing == "selective":
        policy = _selective_policy(_saved_by_selective_checkpointing())
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    elif checkpointing == "full" and compile:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _recompute_everything)
    for block in model.layers:
        forward = block.forward
        if checkpointing != "off":
            forward = _checkpointed(forward, options)
        if compile:
            forward = torch.compile(forward, fullgraph=True)
        block.forward = forward


def _checkpointed(forward, options: dict):
    # A function of our own around the call, not functools.partial(checkpoint, ...): torch.compile
    # must trace into a frame that calls `checkpoint` to turn it into its activation-checkpoint
    # operator; a partial of `checkpoint` itself is skipped, and the block silently runs eagerly.
    def forward_with_checkpointing(x, residual, *args, **kwargs):
        # A block takes the previous block's output and the residual stream apart (its first
        # norm adds them); checkpointed, it would keep both. Adding them here keeps one tensor a
        # block (1 GiB less at the Llama-3.2-1B shape, seq 4096 x 4) for one more elementwise
        # read; the sum is the same bf16 rounding the fused kernel makes.
        if residual is not None:
            x = x + residual
        return checkpoint(forward, x, None, *args, **options, **kwargs)
    return forward_with_checkpointing


def apply_fsdp(model, device: torch.device, param_dtype: torch.dtype,
               master_dtype: torch.dtype = torch.float32, prefetch: int = 0, reshard_after_forward: bool = True) -> bool:
    """Shard every block, then the root (embedding, final norm, head), and say whether it did.

    On the GPU parameters are gathered and computed in `param_dtype`, gradients reduce in float32,
    and the sharded weights AdamW updates (with its state) are `master_dtype`; on the CPU
    everything is float32. One process whose weights are already in the compute dtype is left
    unsharded: FSDP would have nothing to shard or cast, only copies to make (all-gathers into
    and out of its buffers, float32 copies of each block's gradients): 9% of a Llama-3.2-1B step
    and 10 GiB at Mixtral's layer shapes, measured on an H100. prefetch and
    reshard_after_forward: see `shard_blocks`.
    """
    on_gpu = device.type == "cuda"
    model.to(master_dtype if on_gpu else torch.float32)
    if dist.get_world_size() == 1 and master_dtype == (param_dtype if on_gpu else torch.float32):
        model.to(device)
        return False
    shard_blocks(model, model.layers, device, param_dtype, prefetch, reshard_after_forward)
    return True


def shard_blocks(model, blocks, device: torch.device, param_dtype: torch.dtype, prefetch: int = 0,
          reshard_after_forward: bool = True) -> None:
    """FSDP2 over each of `blocks` (a model's decoder layers), then over `model`, the root.

    prefetch: 0 leaves the order of all-gathers to FSDP2 (a block's backward starts the next
    one's; the forward gathers each block as the host reaches it, which is early enough while the
    host runs ahead of the GPU); N starts the next N blocks' all-gathers when a block starts, in
    the forward and the backward, for links too slow to hide one block's gather behind one
    block's compute, at the cost of N blocks' gathered parameters held at once.
    reshard_after_forward: False keeps every block's gathered parameters from its forward to its
    backward: no second all-gather, a quarter of the bytes a block moves (two bf16 all-gathers and
    a float32 reduce-scatter), for the memory of every block's gathered parameters.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch is {prefetch}: the number of blocks to gather ahead, 0 or more")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Blocks return views (the halves of fused projections); the model never writes to a block's
    # output in place, which is what this warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # The backward starts where the forward ends: the root's parameters (embedding, final norm,
    # output head) and the last block's are kept gathered after the forward rather than gathered
    # again at once, with nothing yet to overlap the all-gather with.
    blocks = list(blocks)
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        reshard = reshard_after_forward and index < last
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if prefetch:
        for index, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[index + 1:index + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, index - prefetch):index][::-1])
