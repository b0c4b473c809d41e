"""What FSDP2 sends per decoder block, and whether a block's compute can hide it.

    torchrun --nproc_per_node 2 benchmarks/collectives.py                    # GPUs (NCCL)
    torchrun --nproc_per_node 2 benchmarks/collectives.py --shape tiny       # CPU (gloo): the plumbing

For each model shape: one block's all-gather (bf16 parameters, before its forward and again before
its backward) and reduce-scatter (float32 gradients, after its backward), timed over the ranks
with the sizes train.py's FSDP2 wrapping moves, and beside them the block's own matmul work for
one GPU's share of the step (forward; backward is twice that) at a stated matmul rate. Where a
collective takes longer than the compute it overlaps with, the step waits for the link: that is
what prefetch and reshard settings, or a float32 -> bf16 gradient reduction, would trade.
Bus bandwidth as nccl-tests reports it: bytes of the whole tensor x (ranks - 1) / ranks / time.
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/train.py's shapes
from train import SHAPES, synchronize  # noqa: E402

from ligerzoo.models import ModelConfig, build_model  # noqa: E402
from ligerzoo.training.parallel import init_distributed  # noqa: E402

# (seq, batch) per GPU of the measured runs (benchmarks/multi_gpu.sh).
RUNS = {"llama-1b": (4096, 4), "llama-8b": (8192, 1), "mixtral-2l": (4096, 2), "tiny": (64, 2)}


def block_parameters(shape: str) -> int:
    model = build_model(ModelConfig(**SHAPES[shape]), device="meta")
    return sum(p.numel() for p in model.layers[0].parameters())


def block_forward_flops(shape: str) -> float:
    """Matmul FLOPs of one block's forward over one GPU's tokens: 2 per weight per token, and the
    attention scores and weighted sum (4 x heads x head_dim x seq per token, as PaLM counts)."""
    config, (seq, batch) = ModelConfig(**SHAPES[shape]), RUNS[shape]
    per_token = 2 * block_parameters(shape) + 4 * config.num_attention_heads * config.head_dim * seq
    return per_token * seq * batch


def timed(collective, device: torch.device, repeats: int) -> float:
    """Median seconds of `collective()` over the ranks (each timing the slowest rank's)."""
    for _ in range(3):
        collective()
    times = []
    for _ in range(repeats):
        dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        collective()
        synchronize(device)
        elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=sorted(RUNS), default=["llama-1b", "llama-8b"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tflops", type=float, default=650.0, help="matmul rate for the compute column "
                        "(bf16 GEMMs in the 1B step ran at ~710 TFLOP/s on an H100, power-bound)")
    args = parser.parse_args()
    # torch 2.13 renames the tensor collectives (*_single); the GPU machine's 2.11 has only these.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    rank, world_size, device = init_distributed()
    if world_size < 2:
        sys.exit("run it with torchrun --nproc_per_node N (N >= 2): one rank sends nothing")
    if rank == 0:
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)"
        print(f"{world_size} x {where}, torch {torch.__version__}, backend {dist.get_backend()}\n")
        print("| shape | collective (one block) | MiB (whole tensor) | ms | bus GB/s | block compute it overlaps "
              f"(at {args.tflops:.0f} TFLOP/s) |")
        print("|---|---|---|---|---|---|", flush=True)
    for shape in args.shape:
        params = block_parameters(shape)
        shard = -(-params // world_size)  # FSDP2 pads each parameter to a multiple of the ranks
        forward_ms = block_forward_flops(shape) / (args.tflops * 1e12) * 1e3
        average = dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM  # gloo has no AVG
        cases = (("all-gather bf16", torch.bfloat16, f"forward {forward_ms:.2f} ms",
                  lambda whole, part: dist.all_gather_into_tensor(whole, part)),
                 ("reduce-scatter fp32", torch.float32, f"backward {2 * forward_ms:.2f} ms",
                  lambda whole, part: dist.reduce_scatter_tensor(part, whole, op=average)))
        for name, dtype, overlaps, collective in cases:
            whole = torch.empty(shard * world_size, dtype=dtype, device=device).normal_()
            part = torch.empty(shard, dtype=dtype, device=device).normal_()
            seconds = timed(lambda: collective(whole, part), device, args.repeats)
            size = whole.numel() * whole.element_size()
            bus = size * (world_size - 1) / world_size / seconds / 1e9
            if rank == 0:
                print(f"| {shape} | {name} | {size / 2**20:,.1f} | {seconds * 1e3:.2f} | {bus:,.1f} | {overlaps} |",
                      flush=True)
            del whole, part
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
