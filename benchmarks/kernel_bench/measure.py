"""One peer's figures for one kernel and direction: the relative error against the float64
reference, the peak memory above the inputs, the median wall time of eager calls; and the copy and
matmul ceilings of the device."""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from .case import BF16, Case, Inputs, Peer

MiB = float(2**20)


@dataclass
class Result:
    ms: float | None = None  # wall time of eager calls (host work included)
    graph_ms: float | None = None  # GPU time: replays of the call captured in a CUDA graph
    graph_error: str | None = None  # why there is no graph_ms (not capturable, capture failed)
    peak_mib: float | None = None  # max allocated during one call, minus allocated before it
    grad_mib: float | None = None  # gradient outputs that are new storage (not written over an input)
    rel_errs: dict = field(default_factory=dict)
    first_call_s: float | None = None
    error: str | None = None

    @property
    def peak_excl_grads_mib(self):
        if self.peak_mib is None or self.grad_mib is None:
            return None
        return self.peak_mib - self.grad_mib


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cleanup(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def clone_inputs(case: Case, master: Inputs, with_grad: bool) -> Inputs:
    """A peer's own copy of the inputs (Liger writes into its inputs)."""
    t = {}
    for k, v in master.items():
        c = v.clone()
        if with_grad and k in case.grad_inputs:
            c.requires_grad_(True)
        t[k] = c
    return t


def make_step(case: Case, fn: Peer, t: Inputs, direction: str):
    """The timed call, and the leaves whose gradients it leaves behind (none for fwd)."""
    if direction == "fwd":
        return lambda: fn(t), []
    leaves = [t[k] for k in case.grad_inputs]
    ups = [t.get("grad:" + n) for n in case.out_names]

    def step():
        # fresh gradients every call (do_bench's grad_to_none does it only in its timed loop, not
        # in its warm-up); host-only work, and free once the grads are already None
        for leaf in leaves:
            leaf.grad = None
        outs = fn(t)
        torch.autograd.backward(list(outs), ups)

    return step, leaves


def bench_params(quick: bool, rep_ms: int) -> tuple[int, int]:
    """do_bench's (warmup, rep) in ms."""
    return (10, max(30, rep_ms // 3)) if quick else (25, rep_ms)


def rel_err(a, ref) -> float:
    """||a - ref|| / ||ref||, summed in float64 over 16M-element slices (no float64 copy of the whole)."""
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(a.shape)}, expected {tuple(ref.shape)}")
    a = a.detach().reshape(-1)
    r = ref.reshape(-1)
    num = den = 0.0
    step = 1 << 24
    for i in range(0, r.numel(), step):
        ai, ri = a[i : i + step].double(), r[i : i + step].double()
        num += float((ai - ri).square().sum())
        den += float(ri.square().sum())
    if math.isnan(num):
        return float("nan")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return math.sqrt(num / den)


def check(case: Case, fn: Peer, master: Inputs, ref: dict, direction: str, dev):
    """One call on fresh inputs: relative error of each output (and each gradient for fwd+bwd)."""
    t = clone_inputs(case, master, direction != "fwd")
    sync(dev)
    t0 = time.perf_counter()
    outs = fn(t)
    got = {n: o.detach().clone() for n, o in zip(case.out_names, outs)}
    if direction != "fwd":
        ups = [t.get("grad:" + n) for n in case.out_names]
        torch.autograd.backward(list(outs), ups)
        for k in case.grad_inputs:
            if t[k].grad is None:
                raise RuntimeError(f"no gradient for {k}")
            got["d" + k] = t[k].grad
    sync(dev)
    first_s = time.perf_counter() - t0
    del outs
    errs = {n: rel_err(v, ref[n]) for n, v in got.items()}
    del got, t
    return errs, first_s


def measure_memory(step, leaves, t: Inputs, dev) -> tuple[float, float]:
    """(peak MiB above what was allocated before one call, MiB of gradients that are new storage)."""
    step()  # warm: nothing compiled or autotuned is allocated inside the measured call
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    sync(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    sync(dev)
    peak = (torch.cuda.max_memory_allocated(dev) - before) / MiB
    input_storages = {v.untyped_storage().data_ptr() for v in t.values()}
    grads = {}
    for leaf in leaves:
        if leaf.grad is not None:
            s = leaf.grad.untyped_storage()
            if s.data_ptr() not in input_storages:
                grads[s.data_ptr()] = s.nbytes()
        leaf.grad = None
    return peak, sum(grads.values()) / MiB


def time_step(step, leaves, quick: bool, rep_ms: int, dev) -> float:
    """Median wall time of eager calls in ms: do_bench on the GPU, a rough host clock in a dry run."""
    if dev.type != "cuda":  # dry run: only to fill the table
        step()
        times = []
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    warmup, rep = bench_params(quick, rep_ms)
    return triton.testing.do_bench(
        step, warmup=warmup, rep=rep, grad_to_none=leaves or None, return_mode="median"
    )


def run_peer(case: Case, fn: Peer, master: Inputs, ref: dict, direction: str, quick: bool, dev) -> Result:
    """Error, memory (GPU only) and wall time of one peer in one direction, each on fresh inputs."""
    res = Result()
    res.rel_errs, res.first_call_s = check(case, fn, master, ref, direction, dev)
    cleanup(dev)
    t = clone_inputs(case, master, direction != "fwd")
    step, leaves = make_step(case, fn, t, direction)
    if dev.type == "cuda":
        res.peak_mib, res.grad_mib = measure_memory(step, leaves, t, dev)
    res.ms = time_step(step, leaves, quick, case.rep_ms, dev)
    del step, leaves, t
    return res


def measure_ceilings(dev, quick: bool) -> tuple[float, float]:
    """(GB/s of a 1 GiB device-to-device copy, bytes read + written; TFLOP/s of a bf16 8192^3 matmul)."""
    import triton.testing

    warmup, rep = (10, 50) if quick else (25, 200)
    src = torch.randn(2**29, device=dev, dtype=BF16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(partial(dst.copy_, src), warmup=warmup, rep=rep, return_mode="median")
    copy_gbs = 2 * src.nbytes / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=BF16)
    b = torch.randn(8192, 8192, device=dev, dtype=BF16)
    c = torch.empty_like(a)
    ms = triton.testing.do_bench(partial(torch.mm, a, b, out=c), warmup=warmup, rep=rep, return_mode="median")
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b, c
    cleanup(dev)
    return copy_gbs, tflops
