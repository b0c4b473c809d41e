"""Training on several processes: the process group, and FSDP2 over the model's blocks.

FSDP is applied after blocks.py has replaced each block's forward, so that its hooks see the
final modules. Parameter names are kept, so the export maps them to Hugging Face names. The
weights of rowwise FP8 layers are all-gathered as FP8 rows, half the bytes of bf16
(models/float8_gather.py) when there are several ranks.
"""

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ligerzoo.models.float8 import Float8Linear, Float8MoE
from ligerzoo.models.float8_gather import Float8ShardedWeight, gathers_in_float8, plain_state_dict_hook

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
    Under `--train.float8 rowwise` each block's FP8 layers' weights are gathered as FP8 rows
    (`gather_in_float8`): 1 + 4/K bytes an element where bf16 takes 2.
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
        # Before fully_shard, which looks for the all-gather hooks on each parameter it shards.
        gather_in_float8(block, mesh.size())
        reshard = reshard_after_forward and index < last
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if prefetch:
        for index, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[index + 1:index + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, index - prefetch):index][::-1])


def gather_in_float8(block: nn.Module, world_size: int) -> list[str]:
    """Make the rowwise FP8 layers' weights of `block` (and its FP8 experts', rowwise under
    either recipe) all-gathered by FSDP2 as FP8 rows (models/float8_gather.py), before
    `fully_shard`; returns their names. The parameters keep their names, dtypes and values, and
    the block's state dict holds the plain tensors."""
    names = []
    for name, layer in block.named_modules():
        if isinstance(layer, Float8Linear) and layer.recipe == "rowwise":
            weights = ["weight"]
        elif isinstance(layer, Float8MoE):
            weights = ["w13", "w2"]
        else:
            continue
        gathered = [attribute for attribute in weights
                    if gathers_in_float8(getattr(layer, attribute), world_size)]
        for attribute in gathered:
            weight = getattr(layer, attribute)
            setattr(layer, attribute, nn.Parameter(Float8ShardedWeight(weight.detach()),
                                                   requires_grad=weight.requires_grad))
            names.append(f"{name}.{attribute}")
        if gathered:
            layer.register_state_dict_post_hook(plain_state_dict_hook)
    return names
