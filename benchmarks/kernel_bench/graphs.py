"""GPU time of one call: the call captured in a CUDA graph, graph replays timed (no host work)."""

from __future__ import annotations

import os
import traceback

import torch

from .case import Case, Inputs, Peer
from .measure import Result, bench_params, cleanup, clone_inputs, make_step

GRAPH_WARMUP_CALLS = 3
# Frames in these files are the benchmark's own, never the site of a host sync.
BENCHMARK_DIR = os.path.dirname(os.path.abspath(__file__))


class NotCapturable(Exception):
    pass


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def sync_site(exc: BaseException) -> str | None:
    """file:line of the innermost frame outside torch and this benchmark (where a host sync was made)."""
    site = None
    for fr in traceback.extract_tb(exc.__traceback__):
        f = fr.filename.replace(os.sep, "/")
        if "/torch/" in f or os.path.dirname(os.path.abspath(fr.filename)) == BENCHMARK_DIR:
            continue
        site = "/".join(f.split("/")[-2:]) + f":{fr.lineno}"
    return site


def warm_up_without_sync(step) -> None:
    """The first call under sync debug mode "error": a host sync (.item(), a blocking copy), which
    capture forbids, raises NotCapturable before any capture starts."""
    old_mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        site = sync_site(e)
        raise NotCapturable(
            "host sync in the call" + (f" at {site}" if site else "") + f" ({first_line(e)})"
        ) from None
    finally:
        torch.cuda.set_sync_debug_mode(old_mode)


def graph_time(case: Case, fn: Peer, master: Inputs, direction: str, quick: bool, dev) -> float:
    """Median ms of a CUDA-graph replay of one call.

    Fresh input clones; warm-up on a side stream (PyTorch's recipe). fwd+bwd captures forward and
    backward together, the input gradients None before capture so the backward allocates them from
    the graph's pool; replays overwrite them in place. Raises NotCapturable (with the reason) or
    any other error.
    """
    import triton.testing

    t = clone_inputs(case, master, direction != "fwd")
    step, leaves = make_step(case, fn, t, direction)
    prev_stream = torch.cuda.current_stream(dev)
    g = inner = None  # inner: the error raised inside the capture, which a failing capture_end masks
    try:
        s = torch.cuda.Stream(dev)
        s.wait_stream(prev_stream)
        with torch.cuda.stream(s):
            warm_up_without_sync(step)
            for _ in range(GRAPH_WARMUP_CALLS - 1):
                step()
        prev_stream.wait_stream(s)
        for leaf in leaves:
            leaf.grad = None
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                try:
                    step()
                except Exception as e:
                    inner = e
                    raise
        except Exception as e:
            raise NotCapturable(f"capture failed: {first_line(inner or e)}") from None
        warmup, rep = bench_params(quick, case.rep_ms)
        return triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
    finally:
        # torch.cuda.graph leaves its capture stream current when capture_end raises
        torch.cuda.set_stream(prev_stream)
        for leaf in leaves:
            leaf.grad = None
        del step, leaves, t, g, inner


def run_graph(case: Case, fn: Peer, master: Inputs, direction: str, quick: bool, dev, r: Result) -> bool:
    """Fills r.graph_ms or r.graph_error; returns False if the CUDA context looks unusable after it."""
    try:
        r.graph_ms = graph_time(case, fn, master, direction, quick, dev)
    except NotCapturable as e:
        r.graph_error = f"n/c: {e}"
    except Exception as e:
        traceback.print_exc()
        r.graph_error = f"graph timing failed: {first_line(e)}"
    try:
        cleanup(dev)
        torch.zeros(1, device=dev).add_(1).item()
        return True
    except Exception as e:
        r.graph_error = (r.graph_error or "") + f"; CUDA context unusable after it: {first_line(e)}"
        return False
