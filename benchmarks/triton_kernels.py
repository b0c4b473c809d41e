#!/usr/bin/env python3
"""Kernel benchmarks: ligerzoo against torch eager, torch.compile and liger-kernel, in one run.

Shapes, peers and targets come from BENCHMARKS.md. For every (kernel, peer, direction) this
measures two median times (triton.testing.do_bench): the wall time of eager calls (host work
included: Python, autograd, launches) and the GPU time (the call captured in a CUDA graph, graph
replays timed), the achieved GB/s (TFLOP/s for the fused linear cross-entropy) against the copy
and matmul ceilings from each, the peak memory above the inputs, and the relative error of the
output and gradients against a float64 reference, then prints a markdown table. See
benchmarks/README.md for the columns; each kernel's case is a module of benchmarks/kernel_bench/.

    python benchmarks/triton_kernels.py [--only rms_norm,swiglu] [--quick] [--out benchmarks/RESULTS-kernels.md]
    python benchmarks/triton_kernels.py --dry-run        # CPU, tiny shapes, no GPU timing: checks the plumbing
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys

import torch

# Run from a checkout without installing: the repository root goes on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The script's own folder is on sys.path too: its harness and cases are the kernel_bench package.
from kernel_bench import build_cases
from kernel_bench.case import PEERS
from kernel_bench.measure import measure_ceilings
from kernel_bench.report import COPY_CEILING_GBS, MATMUL_CEILING_TFLOPS, build_report
from kernel_bench.run import log, run_case


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names (see --list)")
    ap.add_argument(
        "--peers",
        default=None,
        help="comma-separated subset of " + ",".join(PEERS) + " (default: all; "
        "the dry run leaves compile out unless named here)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, rough host timing, no GPU needed"
    )
    ap.add_argument("--list", action="store_true", help="list the case names and exit")
    ap.add_argument("--seed", type=int, default=0)
    return ap, ap.parse_args(argv)


def chosen_cases(ap, args, cases):
    """The cases --only names, in table order (all without it)."""
    if not args.only:
        return cases
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in {c.name for c in cases}]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {[c.name for c in cases]}")
    return [c for c in cases if c.name in wanted]


def chosen_peers(ap, args):
    """The peers --peers names; the dry run leaves compile out unless named."""
    peers = [p.strip() for p in (args.peers or ",".join(PEERS)).split(",") if p.strip()]
    if args.dry_run and args.peers is None:
        peers = [p for p in peers if p != "compile"]
    if any(p not in PEERS for p in peers):
        ap.error(f"--peers takes a subset of {PEERS}")
    return peers


def versions():
    """(torch, triton, liger-kernel) versions, "not installed" where absent."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    try:
        liger_version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger_version = "not installed"
    return torch.__version__, triton_version, liger_version


def header(dev, quick: bool) -> str:
    """The report's first line: date, device, versions, repeats and (on the GPU) measured ceilings."""
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        log("measuring ceilings")
        copy_gbs, mm_tflops = measure_ceilings(dev, quick)
        ceil = (
            f"measured ceilings: 1 GiB D2D copy {copy_gbs:.0f} GB/s, "
            f"bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s "
            f"(the % columns use {COPY_CEILING_GBS:.0f} GB/s and {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s)"
        )
        log(ceil)
    else:
        gpu, ceil = "CPU (dry run: tiny shapes, host timing)", "ceilings not measured (dry run)"
    tv, trv, lv = versions()
    return (
        f"# Kernel benchmarks: {datetime.datetime.now().isoformat(timespec='minutes')} | {gpu} | "
        f"torch {tv} | triton {trv} | liger-kernel {lv} | bf16 | "
        f"{'quick' if quick else 'full'} repeats | {ceil}"
    )


def main(argv=None):
    ap, args = parse_args(argv)
    cases = build_cases(small=args.dry_run)
    if args.list:
        for c in cases:
            print(f"{c.name:26s} {c.label} {c.shape}")
        return 0
    cases = chosen_cases(ap, args, cases)
    peers = chosen_peers(ap, args)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device (use --dry-run to check the script on CPU)")
    dev = torch.device("cuda" if not args.dry_run else "cpu")

    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 1024

    report_header = header(dev, args.quick)
    results = {}
    graphs_usable = True  # False once a failed capture left the CUDA context unusable: no more captures
    gen = torch.Generator(device=dev)
    for case in cases:
        case_results, graphs_usable = run_case(case, peers, args.quick, args.seed, gen, dev, graphs_usable)
        results.update({(case.name, d, p): r for (d, p), r in case_results.items()})

    report = build_report(cases, results, report_header, peers)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
