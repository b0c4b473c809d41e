"""One kernel end to end: its inputs and float64 reference, every peer's eager figures in both
directions, then every peer's GPU time (CUDA graphs, GPU only)."""

from __future__ import annotations

import sys
import time
import traceback

import torch

from .case import Case
from .graphs import run_graph
from .measure import Result, cleanup, run_peer
from .report import fmt_err, fmt_ms, worst_err

# CUDA-graph capture order within a kernel: peers whose capture is likelier to fail last, so a
# failed capture that left the context unusable would cost the fewest GPU times.
GRAPH_ORDER = ("ligerzoo", "eager", "compile", "liger")

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def build_peers(case: Case, peers) -> dict:
    """peer -> its call, or the exception that says why it cannot run."""
    fns = {}
    for p in peers:
        try:
            fns[p] = case.peers[p]()
        except Exception as e:
            fns[p] = e
    return fns


def run_case(case: Case, peers, quick: bool, seed: int, gen, dev, graphs_usable: bool):
    """Every (direction, peer) Result of one kernel, and whether CUDA-graph captures may go on."""
    torch._dynamo.reset()
    cleanup(dev)
    gen.manual_seed(seed)
    log(f"{case.name} {case.shape}: inputs and float64 reference")
    try:
        master = case.make(dev, gen)
        ref = case.reference(master)
    except Exception as e:
        traceback.print_exc()
        msg = f"inputs/reference failed: {type(e).__name__}: {e}"
        cleanup(dev)
        return {(d, p): Result(error=msg) for d in case.directions for p in peers}, graphs_usable
    cleanup(dev)

    fns = build_peers(case, peers)
    results = {}
    for d in case.directions:
        for p, fn in fns.items():
            if isinstance(fn, Exception):
                results[(d, p)] = Result(error=str(fn))
                continue
            try:
                r = run_peer(case, fn, master, ref, d, quick, dev)
                n, e = worst_err(r.rel_errs)
                log(f"{case.name} {d} {p}: {fmt_ms(r.ms)}, peak {r.peak_mib and round(r.peak_mib)} MiB, "
                    f"worst rel err {n} {fmt_err(e)}")  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [""])[0]
                r = Result(error=f"{type(e).__name__}: {first_line}")
                log(f"{case.name} {d} {p}: ERROR {r.error}")
            results[(d, p)] = r
            cleanup(dev)

    # GPU times, after every eager time of this kernel is in (a failed capture cannot spoil those)
    if dev.type == "cuda":
        for p in sorted(peers, key=GRAPH_ORDER.index):
            for d in case.directions:
                r = results[(d, p)]
                if r.error is not None:
                    continue
                if not graphs_usable:
                    r.graph_error = "graph timing skipped: a failed capture broke the CUDA context"
                    continue
                graphs_usable = run_graph(case, fns[p], master, d, quick, dev, r)
                log(f"{case.name} {d} {p}: GPU (graph) "
                    f"{fmt_ms(r.graph_ms) if r.graph_error is None else r.graph_error}")  # fmt: skip
    del master, ref, fns
    cleanup(dev)
    return results, graphs_usable
