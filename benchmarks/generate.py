#!/usr/bin/env python3
"""Generation benchmark: a bf16 Llama-3.2-1B-shaped checkpoint with random weights, its load time
and peak host memory, and greedy decode throughput of ligerzoo's `generate` (static KV cache,
CUDA-graph decode step) against transformers' `generate` with its default (dynamic) cache and with
`cache_implementation="static"`, all in one run on one GPU.

    python benchmarks/generate.py [--out FILE] [--profile] [--batches 1,16] [--peers ligerzoo,hf,hf-static]
    python benchmarks/generate.py --dry-run     # CPU, a tiny model: checks the plumbing, not speed

How it measures:
- load: `from_pretrained` to CUDA in bf16, in a fresh Python process per loader (so the host
  memory of building and saving the checkpoint is not counted), after that process has imported
  its libraries and initialised CUDA. Time: wall clock until the weights are on the GPU
  (torch.cuda.synchronize). Host memory: resource.getrusage ru_maxrss, the process's peak resident
  set, which also counts the pages of memory-mapped safetensors files while they are mapped;
  "load's share" is that peak minus the resident set just before loading. The files were just
  written, so they are read from the page cache (a warm load).
- decode: prompts of 128 random tokens, 256 new tokens, greedy, no stop tokens (so every row
  generates all 256). Decode time = median time of generate(256 new tokens) minus median time of
  generate(1 new token): the second is the prefill and the first token alone, so the difference is
  the 255 decode steps, sampling and host work included. tokens/s = batch * 255 / that time. Each
  peer is warmed up first at both lengths (CUDA-graph capture, torch.compile of transformers'
  static-cache step), so no compilation is timed.
- floor: one read of the weights per step at 3000 GB/s (BENCHMARKS.md's H100 copy ceiling).
- --profile: ligerzoo's captured decode step alone (graph replays timed with CUDA events), the
  same step run eagerly (kernel by kernel from Python), and torch.profiler tables of both: where
  the time of one decode step goes.

transformers is imported only here (a benchmark peer), never by the package.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from ligerzoo.hf.pretrained import from_pretrained  # noqa: E402
from ligerzoo.inference import generate  # noqa: E402
from ligerzoo.inference.generation import KEPT_DECODERS  # noqa: E402  (--profile reads the kept decoder)
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models.presets import LLAMA_3_2_1B, TINY_LLAMA  # noqa: E402

COPY_CEILING_GBS = 3000.0  # H100 device-to-device copy (BENCHMARKS.md)
PEERS = ("ligerzoo", "hf", "hf-static")
REPEATS = {"ligerzoo": 5, "hf": 2, "hf-static": 3}  # timed calls per length
WARMUPS = {"ligerzoo": 1, "hf": 1, "hf-static": 2}  # the static cache compiles on its first calls
PEER_NAMES = {"ligerzoo": "ligerzoo (static cache, CUDA graph)", "hf": "transformers (default cache)",
              "hf-static": 'transformers (cache_implementation="static")'}

TINY = TINY_LLAMA

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# The checkpoint and its load


def make_checkpoint(config: ModelConfig, directory: str, device) -> float:
    """Random bf16 weights (transformers' init, on the device), saved with our save_pretrained.
    Returns the checkpoint's weight bytes."""
    model = build_model(config, device=device, dtype=torch.bfloat16)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    gc.collect()
    return n_bytes


LOAD_SCRIPT = r"""
import importlib.util, json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
directory, loader, device = sys.argv[2], sys.argv[3], torch.device(sys.argv[4])
how = "from_pretrained(dtype=bf16, device=...)"
if loader == "ligerzoo":
    from ligerzoo.hf.pretrained import from_pretrained
    load = lambda: from_pretrained(directory, dtype=torch.bfloat16, device=device)
elif importlib.util.find_spec("accelerate") is not None:  # transformers needs it for device_map
    from transformers import AutoModelForCausalLM
    how = "from_pretrained(dtype=bf16, device_map=...)"
    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=device)
else:
    from transformers import AutoModelForCausalLM
    how = "from_pretrained(dtype=bf16) to the CPU, then .to(device) (no accelerate for device_map)"
    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
if device.type == "cuda":
    torch.zeros(1, device=device)  # the CUDA context's host memory belongs to the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = load()
if device.type == "cuda":
    torch.cuda.synchronize(device)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "before_kib": before, "peak_kib": peak, "how": how}))
"""


def measure_load(directory: str, loader: str, device) -> dict:
    """Load time and ru_maxrss (KiB on Linux) of one loader, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, ROOT, directory, loader, str(device)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The peers' generate calls


def ligerzoo_runner(model):
    def run(input_ids, new_tokens):
        out = generate(model, input_ids, max_new_tokens=new_tokens)
        return [len(row) for row in out]

    run.model = model  # for --profile
    return run


def hf_runner(hf_model, static: bool):
    extra = {"cache_implementation": "static"} if static else {}

    def run(input_ids, new_tokens):
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **extra)
        return [out.shape[1] - input_ids.shape[1]] * out.shape[0]

    return run


def time_calls(run, input_ids, new_tokens, repeats, device) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        lengths = run(input_ids, new_tokens)
        sync(device)
        times.append(time.perf_counter() - start)
        if lengths != [new_tokens] * input_ids.shape[0]:
            raise RuntimeError(f"generated {lengths} tokens per row, expected {new_tokens} each")
    return times


def measure_decode(run, input_ids, new_tokens, warmups, repeats, device) -> dict:
    """Median seconds of generate(new_tokens) and of generate(1) after warm-ups of both; the
    decode steps' time is their difference."""
    for _ in range(warmups):
        time_calls(run, input_ids, new_tokens, 1, device)
    time_calls(run, input_ids, 1, 1, device)
    full = statistics.median(time_calls(run, input_ids, new_tokens, repeats, device))
    prefill = statistics.median(time_calls(run, input_ids, 1, repeats, device))
    steps = new_tokens - 1
    decode = full - prefill
    return {"full_s": full, "prefill_s": prefill, "step_ms": decode / steps * 1e3,
            "tokens_per_s": input_ids.shape[0] * steps / decode if decode > 0 else float("nan")}


# --------------------------------------------------------------------------------------------
# Where the time of one ligerzoo decode step goes


def profile_decode_step(model, batch: int, prompt_len: int, device) -> str:
    """Time and profile the decode step that `generate` captured and kept for this model (the last
    call's batch size): graph replays, and the same forward run eagerly."""
    from torch.profiler import ProfilerActivity, profile

    decoder = KEPT_DECODERS.get(model)  # the kept cache and captured step
    if decoder is None or decoder.graph is None:
        return "no captured decode step to profile (run on a GPU, with max_new_tokens > 1)\n"
    graph_step = decoder.graph.replay
    eager_step = lambda: decoder.forward(model)  # noqa: E731
    lines = [f"### One decode step at batch {batch} (ligerzoo, cache slot {prompt_len} onwards)\n"]
    n_steps = 50
    steps = (("CUDA graph replay", graph_step), ("eager, kernel by kernel from Python", eager_step))
    for name, step in steps:
        decoder.cache.position.fill_(prompt_len)  # each step moves it on by one; stay inside the cache
        step()
        decoder.cache.position.fill_(prompt_len)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n_steps):
            step()
        end.record()
        sync(device)
        lines.append(f"- {name}: {start.elapsed_time(end) / n_steps:.3f} ms per step (mean of {n_steps})")
    lines.append("")
    for name, step in (("CUDA graph replay", graph_step), ("eager", eager_step)):
        decoder.cache.position.fill_(prompt_len)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            sync(device)
        averages = prof.key_averages()
        lines += [f"#### torch.profiler, 5 steps, {name}", "", kernel_breakdown(averages, 5), "", "```",
                  table(averages), "```", ""]
    decoder.cache.position.fill_(prompt_len)
    return "\n".join(lines)


def _device_time_us(event) -> float:
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attribute):
            return getattr(event, attribute)
    return 0.0


def table(averages) -> str:
    for sort_by in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=sort_by, row_limit=25, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=25)


KERNEL_GROUPS = (  # (group, substrings of kernel names), first match wins
    ("matmul (cuBLAS)", ("gemv", "gemm", "nvjet", "xmma", "cutlass", "splitk", "sm90")),
    ("attention (SDPA)", ("fmha", "attention", "flash", "efficient")),
    ("norm / rope / swiglu (Triton)", ("_rms_norm", "_rope", "_swiglu", "_sum_partials")),
    ("KV cache write (index_copy)", ("index_copy", "indexcopy")),
    ("argmax / reductions", ("reduce", "argmax")),
)


def kernel_breakdown(averages, n_steps: int) -> str:
    """GPU time per step by kernel group, from the profiler's kernel events."""
    totals, count = {}, 0
    for event in averages:
        if str(getattr(event, "device_type", "")).endswith("CUDA") and _device_time_us(event) > 0:
            name = event.key.lower()
            group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
            totals[group] = totals.get(group, 0.0) + _device_time_us(event) / n_steps
            count += event.count
    if not totals:
        return "(no kernel events recorded)"
    rows = [f"| {group} | {us / 1e3:.3f} |" for group, us in sorted(totals.items(), key=lambda kv: -kv[1])]
    total_ms = sum(totals.values()) / 1e3
    return "\n".join(["| kernel group | GPU ms per step |", "|---|---|", *rows,
                      f"| all kernels ({count // n_steps} launches per step) | {total_ms:.3f} |"])


# --------------------------------------------------------------------------------------------
# The report


def load_table(directory: str, device, errors: list[str]) -> list[str]:
    lines = ["## Load (a fresh process per loader, files in the page cache, bf16 onto the device)", "",
             "| loader | load time s | peak host RSS MiB (ru_maxrss) | RSS before load MiB | "
             "load's share MiB | call |", "|---|---|---|---|---|---|"]
    for loader in ("ligerzoo", "transformers"):
        log(f"load: {loader}")
        try:
            m = measure_load(directory, loader, device)
        except Exception as error:  # noqa: BLE001 - a failed peer is reported, the rest still runs
            lines.append(f"| {loader} | ERR | | | | |")
            errors.append(f"load {loader}: {error}")
            continue
        before, peak = m["before_kib"] / 1024, m["peak_kib"] / 1024
        lines.append(f"| {loader} | {m['seconds']:.2f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} | "
                     f"`{m['how']}` |")
    return lines + [""]


def decode_table(results: dict, peers: list[str], batches: list[int], floor_ms: float, args) -> list[str]:
    new = args.new_tokens
    lines = ["## Decode", "",
             f"| peer | batch | generate(1) ms | generate({new}) ms | decode ms/step | decode tokens/s | "
             "floor / step time | vs transformers static |", "|---|---|---|---|---|---|---|---|"]
    for batch in batches:
        static = results.get(("hf-static", batch))
        for peer in peers:
            r = results.get((peer, batch))
            if r is None:
                lines.append(f"| {PEER_NAMES[peer]} | {batch} | ERR | | | | | |")
                continue
            speedup = f"{r['tokens_per_s'] / static['tokens_per_s']:.2f}x" if static else "n/a"
            lines.append(f"| {PEER_NAMES[peer]} | {batch} | {r['prefill_s'] * 1e3:.1f} | "
                         f"{r['full_s'] * 1e3:.1f} | {r['step_ms']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{floor_ms / r['step_ms']:.2f} | {speedup} |")
    counts = ", ".join(f"{peer} {REPEATS[peer]}" for peer in peers)
    note = (f"generate({new}) - generate(1) = the {new - 1} decode steps; medians of {counts} calls after "
            "warm-ups. \"floor / step time\": the weight-read floor over the measured step (1.00: at the "
            "floor).")
    return lines + ["", note, ""]


def load_peers(directory: str, peers: list[str], device) -> dict:
    """peer -> run(input_ids, new_tokens), each on its own copy of the checkpoint on the device."""
    runners = {}
    if "ligerzoo" in peers:
        runners["ligerzoo"] = ligerzoo_runner(from_pretrained(directory, dtype=torch.bfloat16, device=device))
    if {"hf", "hf-static"} & set(peers):
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                        attn_implementation="sdpa")
        hf_model.to(device).eval()
        hf_model.generation_config.eos_token_id = None  # no stop token: every row runs to the end
        for peer in ("hf", "hf-static"):
            if peer in peers:
                runners[peer] = hf_runner(hf_model, static=peer == "hf-static")
    return runners


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--profile", action="store_true", help="profile a ligerzoo decode step")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model: checks the plumbing")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p not in PEERS for p in peers):
        parser.error(f"--peers takes a subset of {PEERS}")
    peers = [p for p in PEERS if p in peers]
    batches = [int(b) for b in args.batches.split(",")]
    if args.dry_run:
        device, config = torch.device("cpu"), ModelConfig(**TINY)
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 8)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device (use --dry-run to check the script on CPU)")
        device, config = torch.device("cuda"), ModelConfig(**LLAMA_3_2_1B)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny model)"
    report = [f"# Generation benchmark: {datetime.datetime.now().isoformat(timespec='minutes')} | {gpu} | "
              f"torch {torch.__version__} | triton {version('triton')} | "
              f"transformers {version('transformers')} | bf16 | prompt {args.prompt_len} random tokens, "
              f"{args.new_tokens} new tokens, greedy", ""]
    errors, results, profiles = [], {}, []
    with tempfile.TemporaryDirectory(prefix="ligerzoo-bench-") as directory:
        log(f"building and saving a random bf16 checkpoint in {directory}")
        start = time.perf_counter()
        weight_bytes = make_checkpoint(config, directory, device)
        floor_ms = weight_bytes / (COPY_CEILING_GBS * 1e9) * 1e3
        report.append(f"Checkpoint: {weight_bytes / 1e9:.2f} GB of bf16 weights, written in "
                      f"{time.perf_counter() - start:.1f} s. Floor per decode step: one read of the weights "
                      f"at {COPY_CEILING_GBS:.0f} GB/s = {floor_ms:.3f} ms ({1e3 / floor_ms:.0f} steps/s).\n")
        report += load_table(directory, device, errors)
        runners = load_peers(directory, peers, device)

    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        input_ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=generator)
        for peer, run in runners.items():
            log(f"decode: {peer}, batch {batch}")
            try:
                results[peer, batch] = measure_decode(run, input_ids.to(device), args.new_tokens,
                                                      WARMUPS[peer], REPEATS[peer], device)
                log(f"  {results[peer, batch]['tokens_per_s']:.0f} tokens/s")
            except Exception as error:  # noqa: BLE001
                errors.append(f"decode {peer} batch {batch}: {type(error).__name__}: {error}")
                traceback.print_exc()
            if peer == "ligerzoo" and args.profile and device.type == "cuda":
                log(f"profile: ligerzoo, batch {batch}")
                profiles.append(profile_decode_step(run.model, batch, args.prompt_len, device))

    report += decode_table(results, list(runners), batches, floor_ms, args) + profiles
    if errors:
        report += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
