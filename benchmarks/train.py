"""One training step, end to end, against Hugging Face transformers with and without liger-kernel.

    python benchmarks/train.py --shape llama-1b --checkpointing full off
    python benchmarks/train.py --shape mixtral-2l --batch 2 --checkpointing full --peers ligerzoo hf
    python benchmarks/train.py --gpus 1 2 --checkpointing full --peers ligerzoo-bf16-master hf-liger
    python benchmarks/train.py --device cpu --shape tiny --gpus 1 2 --steps 6   # the plumbing, not speed

Every (peer, checkpointing) pair runs in a fresh process on one GPU (with `--gpus N ...`, a torchrun
of N ranks, one GPU each, every peer sharded with FSDP2, figures per GPU), from random init in bf16, on
random tokens (one document per row: plain causal attention for everyone), with AdamW and
gradient clipping: the Hugging Face peers torch's fused AdamW and `clip_grad_norm_`, ligerzoo its
own AdamW kernel with the clipping folded into it, as train.py's (ligerzoo/training/adamw.py,
clipping.py). ligerzoo is prepared as train.py prepares it (ligerzoo/training/blocks.py:
activation checkpointing, each block compiled) with float32 master weights (FSDP2 over the one GPU casts them
to bf16 for compute), and again with bfloat16 ones (`--train.master_dtype bfloat16`, no FSDP on
one GPU unless `--gpus` asks for the same wrapping everywhere), which is what the Hugging Face runs keep: bf16 parameters and AdamW state;
and with the blocks' products in FP8 (`--train.float8 rowwise` / `tensorwise`: the ligerzoo-fp8-* peers,
with either master dtype; their MFU counts the same FLOPs against the same bf16 peak). Prints a
markdown table: median tokens/s over the timed steps, MFU against the spec peak, and peak memory
(torch.cuda.max_memory_allocated from the model's construction on).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from device_timeline import (  # beside this script
    describe,
    describe_gaps,
    describe_kernels,
    device_timeline,
    idle_gaps,
    kernel_breakdown,
)

from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models.float8_weight_rows import keep_weight_rows_through_steps
from ligerzoo.models.presets import LLAMA_3_1_8B, LLAMA_3_2_1B, MIXTRAL_8X7B_2_LAYERS, TINY_LLAMA
from ligerzoo.training.adamw import AdamW
from ligerzoo.training.blocks import CHECKPOINTING_MODES, prepare_blocks
from ligerzoo.training.clipping import clip_grad_norm
from ligerzoo.training.metrics import flops_per_token, peak_flops
from ligerzoo.training.parallel import MULTICAST_OFF, apply_fsdp, init_distributed, shard_blocks
from ligerzoo.training.tied_embedding import tied_lookup_gradient_as_rows

# The shapes' names on the command line (multi_gpu.sh and RESULTS.md use them), from the presets.
SHAPES = {"llama-1b": LLAMA_3_2_1B, "llama-8b": LLAMA_3_1_8B, "mixtral-2l": MIXTRAL_8X7B_2_LAYERS, "tiny": TINY_LLAMA}
PEERS = ("ligerzoo", "ligerzoo-bf16-master", "ligerzoo-fp8-rowwise", "ligerzoo-fp8-tensorwise",
         "ligerzoo-fp8-rowwise-bf16-master", "ligerzoo-fp8-tensorwise-bf16-master", "hf", "hf-compiled", "hf-liger")
UNTIMED_STEPS = 4
PROFILED_STEPS = 2


class GpuSampler:
    """nvidia-smi's reading of the GPU's SM clock and power draw every 100 ms, from construction
    to `stop()`: a step that keeps the GPU busier may draw more power and run at a lower clock,
    which slows every kernel in it alike."""

    def __init__(self, device: torch.device):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = visible.split(",")[index] if visible else str(index)
        command = ["nvidia-smi", f"--id={gpu}", "--query-gpu=clocks.sm,power.draw",
                   "--format=csv,noheader,nounits", "--loop-ms=100"]
        try:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: the columns say n/a
            self.process = None

    def stop(self) -> tuple[float | None, float | None]:
        """(median SM clock in MHz, median power in W) over the readings, or Nones."""
        if self.process is None:
            return None, None
        self.process.terminate()
        output, _ = self.process.communicate()
        readings = []
        for line in output.splitlines():
            try:
                clock, power = (float(field) for field in line.split(","))
            except ValueError:  # "[N/A]" or a line cut short by the termination
                continue
            readings.append((clock, power))
        if not readings:
            return None, None
        return statistics.median(r[0] for r in readings), statistics.median(r[1] for r in readings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING_MODES, default=["full", "off"])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--steps", type=int, default=12, help=f"steps per run; the first {UNTIMED_STEPS} are not timed")
    parser.add_argument("--profile", metavar="DIR", help="also profile 2 steps of each run: the top CUDA "
                        "kernels, the matmuls by shape, the device's idle and exposed-NCCL time, its "
                        "kernels by kind, each launch counted once, and its idle gaps by length, to "
                        "DIR/<peer>-<checkpointing>[-rank<N>].txt")
    parser.add_argument("--memory", metavar="DIR", help="also record 2 steps' allocations of each run: what "
                        "is live at the peak, by where it was allocated, to DIR/<peer>-<checkpointing>-memory.txt")
    parser.add_argument("--gpus", nargs="+", type=int, help="GPU counts to run each peer on, each run a "
                        "torchrun of that many ranks with every peer sharded by FSDP2, the Hugging Face ones as "
                        "ligerzoo's blocks are (each layer, then the root), on 1 GPU too, so scaling compares "
                        "like with like; tokens/s and peak memory are per GPU. Without it: one plain process, "
                        "FSDP only where train.py would use it (ligerzoo's float32 master weights)")
    parser.add_argument("--fsdp-prefetch", type=int, default=0, metavar="N", help="with --gpus: each block "
                        "starts the next N blocks' all-gathers (0: FSDP2's own order), for every peer")
    parser.add_argument("--fsdp-keep-gathered", action="store_true", help="with --gpus: keep each block's "
                        "gathered parameters from its forward to its backward (no resharding), for every peer")
    parser.add_argument("--loss-chunk-rows", type=int, metavar="ROWS", help="ligerzoo's fused loss makes "
                        "this many rows of logits at a time (--train.loss_chunk_rows; default: as many as "
                        "126 MiB hold)")
    parser.add_argument("--float8-keep-weight-rows", action="store_true", help="the ligerzoo-fp8-rowwise "
                        "peers cast their weights' FP8 rows once a step and keep them "
                        "(--train.float8_keep_weight_rows)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu (with --shape tiny, "
                        "gloo ranks, the kernels' PyTorch path): checks the plumbing, not speed")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one JSON-encoded run
    args = parser.parse_args()
    if args.one:
        result = run_one(**json.loads(args.one))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if args.steps <= UNTIMED_STEPS:
        parser.error(f"--steps {args.steps}: the first {UNTIMED_STEPS} are not timed, so at least "
                     f"{UNTIMED_STEPS + 1} are needed")
    if args.fsdp_prefetch < 0:
        parser.error(f"--fsdp-prefetch {args.fsdp_prefetch}: blocks to gather ahead, 0 or more")
    if args.gpus is None and (args.fsdp_prefetch or args.fsdp_keep_gathered):
        parser.error("--fsdp-prefetch and --fsdp-keep-gathered set FSDP2's wrapping: they need --gpus")
    if args.loss_chunk_rows is not None and args.loss_chunk_rows < 1:
        parser.error(f"--loss-chunk-rows {args.loss_chunk_rows}: a positive number of rows")
    if args.device == "cpu" and args.memory:
        parser.error("--memory replays the CUDA allocator's trace: it needs --device cuda")

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    wrapping = ""
    if args.gpus:
        ahead = "in FSDP2's own order"
        if args.fsdp_prefetch:
            ahead = f"{args.fsdp_prefetch} block{'s' if args.fsdp_prefetch > 1 else ''} ahead"
        wrapping = (f", all-gathers {ahead}, blocks {'kept gathered' if args.fsdp_keep_gathered else 'resharded'} "
                    f"after the forward")
    chunks = f", ligerzoo's loss in chunks of {args.loss_chunk_rows} rows" if args.loss_chunk_rows else ""
    if args.float8_keep_weight_rows:
        chunks += ", rowwise FP8 weight rows kept from step to step"
    print(f"{where}, torch {torch.__version__}, shape {args.shape}, seq {args.seq} x batch {args.batch}, "
          f"{args.steps} steps ({UNTIMED_STEPS} untimed){wrapping}{chunks}\n", flush=True)
    print("| run | checkpointing | GPUs | tokens/s per GPU | MFU | peak memory per GPU (GiB) | "
          "loss at the last step | scaling efficiency | SM clock, power (rank 0, medians) |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    failed = 0
    for checkpointing in args.checkpointing:
        for peer in args.peers:
            if peer.startswith("hf") and checkpointing not in ("off", "full"):
                continue  # transformers checkpoints whole layers only
            per_gpu_at_fewest = None
            for gpus in args.gpus or [1]:
                run = dict(peer=peer, shape=args.shape, seq=args.seq, batch=args.batch,
                           checkpointing=checkpointing, steps=args.steps, profile=args.profile, memory=args.memory,
                           loss_chunk_rows=args.loss_chunk_rows,
                           float8_keep_weight_rows=args.float8_keep_weight_rows,
                           shard=args.gpus is not None,
                           fsdp=dict(prefetch=args.fsdp_prefetch, reshard_after_forward=not args.fsdp_keep_gathered))
                result = _in_child(run, args.device, gpus if args.gpus else None)
                if "error" in result:
                    print(f"| {peer} | {checkpointing} | {gpus} | failed: {result['error']} | | | | | |", flush=True)
                    failed += 1
                    continue
                per_gpu = result["tokens_per_s"]
                per_gpu_at_fewest = per_gpu_at_fewest or (gpus, per_gpu)
                # Per-GPU throughput against the smallest run's: 1.0 is perfect scaling.
                efficiency = "" if gpus == per_gpu_at_fewest[0] else f"{per_gpu / per_gpu_at_fewest[1]:.2f}"
                clocks = "n/a"
                if result["clock_mhz"] is not None:
                    clocks = f"{result['clock_mhz']:.0f} MHz, {result['power_w']:.0f} W"
                mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
                peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
                print(f"| {peer} | {checkpointing} | {gpus} | {per_gpu:,.0f} | {mfu} "
                      f"| {peak} | {result['loss']:.3f} | {efficiency} | {clocks} |", flush=True)
    if failed:
        sys.exit(f"{failed} run(s) failed; their errors are above")


def _in_child(run: dict, device: str, gpus: int | None = None) -> dict:
    """The run in a fresh process, or in a torchrun of `gpus` ranks."""
    command = [sys.executable, __file__, "--one", json.dumps(run)]
    if gpus is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                   *command[1:]]
    environment = {**MULTICAST_OFF, **os.environ}
    if device == "cpu":
        # Ranks on the CPU even where there are GPUs; the kernels on their PyTorch path, since
        # Triton's interpreter does not run inside compiled blocks.
        environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    # torchrun prints its own summary after the ranks' tracebacks, which it prefixes "[rankN]:".
    lines = done.stderr.strip().splitlines() or ["no output"]
    ranks = [line for line in lines if line.startswith("[rank")]
    print("\n".join((ranks or lines)[-40:]), file=sys.stderr)
    # The exception's own line, not a warning printed after it (NCCL's about the process group).
    raised = [line for line in ranks or lines if "Error:" in line or "Exception:" in line]
    return {"error": (raised or ranks or lines)[-1][:200]}


def run_one(peer: str, shape: str, seq: int, batch: int, checkpointing: str, steps: int, shard: bool, fsdp: dict,
            profile: str | None = None, memory: str | None = None,
            loss_chunk_rows: int | None = None, float8_keep_weight_rows: bool = False) -> dict:
    rank, world_size, device = init_distributed()
    torch.manual_seed(rank)  # each rank its own tokens, as a data-parallel run has
    if peer.startswith("ligerzoo"):
        float8 = peer.removeprefix("ligerzoo-fp8-").removesuffix("-bf16-master") if "-fp8-" in peer else "off"
        model = ligerzoo_model(shape, checkpointing, device, bf16_master=peer.endswith("bf16-master"),
                                always_shard=shard, fsdp=fsdp, float8=float8)
        model.loss_chunk_rows = loss_chunk_rows
    else:
        model = _hf_model(shape, checkpointing, device, liger=peer == "hf-liger", compiled=peer == "hf-compiled")
        if shard:  # wrapped exactly as ligerzoo's model: each decoder layer, then the root
            shard_blocks(model, model.model.layers, device, torch.bfloat16, **fsdp)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # from here: the weights and what training adds
    if peer.startswith("ligerzoo"):  # as train.py makes it
        optimizer = AdamW(model.parameters(), lr=1e-4)
    else:  # as Hugging Face's Trainer makes it with `optim="adamw_torch_fused"`
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
    # As train.py does, on one rank (several gather FP8 rows already).
    if float8_keep_weight_rows and peer.startswith("ligerzoo-fp8-rowwise") and world_size == 1:
        keep_weight_rows_through_steps(model, optimizer, torch.bfloat16 if on_gpu else torch.float32)
    vocab = SHAPES[shape]["vocab_size"]
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> torch.Tensor:
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        if peer.startswith("ligerzoo"):  # clipped in the AdamW step, as train.py does
            clip_grad_norm(optimizer, list(model.parameters()), 1.0)
        else:  # as Hugging Face's Trainer does
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = [], []
    sampler = None
    for index in range(steps):
        if index == UNTIMED_STEPS and on_gpu:
            sampler = GpuSampler(device)
        synchronize(device)
        started = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - started)
    clock_mhz, power_w = sampler.stop() if sampler else (None, None)
    # Every rank runs the extra steps (their collectives must match); each writes its own file.
    name = f"{peer}-{checkpointing}" + (f"-rank{rank}" if world_size > 1 else "")
    if profile:
        profile_steps(step, os.path.join(profile, f"{name}.txt"), device)
    if memory:
        _memory_at_peak(step, os.path.join(memory, f"{name}-memory.txt"))
    # Per GPU: each rank's batch over the step time (the slowest rank's, all ranks being in step
    # after the gradient reduction), and the largest rank's peak memory.
    tokens_per_s = batch * seq / statistics.median(times[UNTIMED_STEPS:])
    peak = torch.tensor(torch.cuda.max_memory_allocated() if on_gpu else 0, dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    loss = losses[-1].float()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    # One count for every peer: the same architecture, counted on a ligerzoo model without memory.
    flops = flops_per_token(build_model(ModelConfig(**SHAPES[shape]), device="meta"), seq)
    peak_flops_per_s = peak_flops(device)
    result = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak_flops_per_s if peak_flops_per_s else None,
              "peak_gib": peak.item() / 2**30 if on_gpu else None, "loss": loss.item(),
              "clock_mhz": clock_mhz, "power_w": power_w}
    dist.destroy_process_group()
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, path: str, device: torch.device) -> None:
    """The kernels of 2 steps (CUDA's; the CPU's ops with --device cpu), by total time, to `path`,
    then the device's timeline: how long it was idle, and how much of NCCL's time no other kernel
    overlapped; then the device kernels by kind and by name, in ms a step, and its idle gaps by length
    with the longest's causes (device_timeline.py)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(PROFILED_STEPS):  # each step waited for, as the timed steps are
            step()
            synchronize(device)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    with open(path, "w") as file:
        file.write(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90))
        # The matmuls by operand shapes: where two peers' GEMM totals differ, which products differ.
        # Self time: an eager mm(out=) nests one aten::mm in another, and totals count its kernel twice.
        matmuls = [event for event in prof.key_averages(group_by_input_shape=True)
                   if event.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm",
                                    "aten::_scaled_mm", "aten::_scaled_grouped_mm")
                   and getattr(event, sort_by) > 0]
        file.write(f"\nmatmuls by operand shapes ({'device' if on_gpu else 'CPU'} self time of 2 steps, calls):\n")
        for event in sorted(matmuls, key=lambda event: -getattr(event, sort_by)):
            file.write(f"{getattr(event, sort_by) / 1e3:9.2f} ms {event.count:5d}  {event.key} "
                       f"{event.input_shapes}\n")
        with tempfile.TemporaryDirectory() as scratch:  # the trace itself is too large to keep
            trace = os.path.join(scratch, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace) as chrome:
                events = json.load(chrome)["traceEvents"]
            file.write("\n" + describe(device_timeline(events)))
            file.write("\n" + describe_kernels(kernel_breakdown(events, steps=PROFILED_STEPS)))
            file.write("\n" + describe_gaps(idle_gaps(events, steps=PROFILED_STEPS)))


def _memory_at_peak(step, path: str) -> None:
    """Replays the allocator's trace of 2 steps to the moment the most memory was allocated and
    writes what was live then, summed by the innermost frames that allocated it."""
    torch.cuda.synchronize()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    except (RuntimeError, SystemError) as error:
        # Seen with compiled blocks (torch 2.11): AOT autograd's compiled functions fail while
        # the allocator records Python stacks. The run's own figures are already measured.
        with open(path, "w") as file:
            file.write(f"recording failed: {type(error).__name__}: {error}\n")
        return
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    # What was allocated before recording started is in the segments' blocks, without a trace.
    live = {block["address"]: (block["size"], ["(allocated before recording)"])
            for segment in snapshot["segments"] for block in segment["blocks"] if block["state"] == "active_allocated"}
    events = snapshot["device_traces"][torch.cuda.current_device()]
    for event in reversed(events):  # undo the recorded events, newest first: the state at the start
        if event["action"] == "alloc":
            live.pop(event["addr"], None)
        elif event["action"] == "free_completed":
            live[event["addr"]] = (event["size"], ["(allocated before recording)"])
    total = peak = sum(size for size, _ in live.values())
    at_peak = dict(live)
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _where(event))
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    by_site: dict[str, list[int]] = {}  # site -> [bytes, allocations]
    for size, where in at_peak.values():
        totals = by_site.setdefault(" <- ".join(where), [0, 0])
        totals[0] += size
        totals[1] += 1
    with open(path, "w") as file:
        file.write(f"peak of 2 recorded steps: {peak / 2**30:.3f} GiB allocated; live then, by allocation site:\n")
        for site, (size, count) in sorted(by_site.items(), key=lambda item: -item[1][0]):
            if size >= 2**20:
                file.write(f"{size / 2**20:10.1f} MiB {count:5d}  {site}\n")


def _where(event) -> list[str]:
    """The innermost Python frames of an allocation that are not torch's own plumbing."""
    frames = [f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}" for frame in event.get("frames", [])
              if frame["filename"].endswith(".py") and "/torch/" not in frame["filename"]]
    return frames[:3] or ["(no Python frame)"]


def ligerzoo_model(shape: str, checkpointing: str, device: torch.device, bf16_master: bool, always_shard: bool,
                    fsdp: dict, float8: str = "off"):
    """Built and prepared as train.py does; float8 as --train.float8."""
    model = build_model(ModelConfig(**SHAPES[shape]), device=device, dtype=torch.bfloat16 if bf16_master else torch.float32)
    prepare_blocks(model, checkpointing, compile=True, float8=float8)
    master_dtype = torch.bfloat16 if bf16_master else torch.float32
    if always_shard:  # the same wrapping on one GPU as on several, for a scaling measurement
        model.to(master_dtype if device.type == "cuda" else torch.float32)
        shard_blocks(model, model.layers, device, torch.bfloat16, **fsdp)
    else:
        apply_fsdp(model, device, torch.bfloat16, master_dtype, **fsdp)
    tied_lookup_gradient_as_rows(model)
    model.train()
    return model


def _hf_model(shape: str, checkpointing: str, device: torch.device, liger: bool, compiled: bool):
    import transformers

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    if liger:
        import liger_kernel.transformers as liger_kernel

        getattr(liger_kernel, f"apply_liger_kernel_to_{model_type}")()
    config_class = {"llama": transformers.LlamaConfig, "mixtral": transformers.MixtralConfig}[model_type]
    model_class = {"llama": transformers.LlamaForCausalLM, "mixtral": transformers.MixtralForCausalLM}[model_type]
    config = config_class(**values, attn_implementation="sdpa", use_cache=False)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly
    with device:
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    if model_type == "mixtral":
        model.set_experts_implementation("grouped_mm")  # transformers' fastest experts
    if checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    model.train()
    return model


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
