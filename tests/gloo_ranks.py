"""A function run on several CPU ranks (gloo), each a spawned process: how the tests exercise
FSDP2 and its collectives without GPUs. Rank 0 hands its result back through a file."""

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_gloo_ranks(world_size, worker, tmp_path, *args):
    """worker(*args) on `world_size` gloo ranks; rank 0's return value. worker must be a
    module-level function (spawned processes import it). The kernels take their PyTorch path:
    Triton's interpreter in every rank would be slow for nothing the tests here look at."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = tmp_path / "result.pt"
    mp.start_processes(_rank_main, args=(world_size, port, result, worker, args), nprocs=world_size,
                       start_method="spawn")
    return torch.load(result, weights_only=False)


def _rank_main(rank, world_size, port, result, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    out = worker(*args)
    if rank == 0:
        torch.save(out, result)
    # Every rank leaves together, once the collectives' work objects that FSDP's reference cycles
    # keep are gone (a gloo rank torn down under another aborts it: training/loop.py).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
