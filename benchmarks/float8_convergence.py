"""FP8 convergence: the same model trained from scratch on the same real text in bf16 and in FP8,
loss curves plotted together, final losses compared (issue 23's "within 1.5% of bf16").

    python benchmarks/float8_convergence.py corpus runs/fp8/corpus.jsonl      # the installed Python's text
    python benchmarks/float8_convergence.py train off runs/fp8/off --data runs/fp8/corpus.jsonl --time-limit 540
    python benchmarks/float8_convergence.py train rowwise runs/fp8/rowwise --data runs/fp8/corpus.jsonl --time-limit 540
    python benchmarks/float8_convergence.py compare runs/fp8/off runs/fp8/rowwise --out curves.svg

corpus: every .py, .md, .rst and .txt file under the roots (default: this Python's site-packages
and standard library), one {"text": ...} line per file, in path order, up to --max-mb of text.

train: `torchrun train.py` from scratch on one GPU per rank (all visible ones), the shape of
benchmarks/train.py's presets, the byte tokenizer, compiled blocks with full activation
checkpointing, and for every recipe the same seed (so the same initial weights and row order).
It checkpoints every --checkpoint-every steps (100); the same command again resumes from the
last checkpoint. With --time-limit it stops the run before the limit (at once after a checkpoint when
the next one would not be reached in time), so that the calls of a machine with a per-command
limit each add their share. Exit status 0: finished; 3: stopped for time, run it again.

compare: both runs' metrics.jsonl as an SVG of the loss against the step (raw per-step losses
thin, their moving average thick) and a markdown table of the final losses and tokens/s.

The byte tokenizer's loss is in nats per byte, and the 1B shape keeps its 128,256-entry vocabulary
(258 ids used), so that a step computes what the speed benchmarks time. Of the preset only what
the configuration's [model] section holds is passed: RoPE keeps train.py's defaults (theta 1e4, no
Llama 3 scaling) and the norm eps 1e-6, alike in both recipes.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import xml.sax.saxutils
from pathlib import Path

import torch

from ligerzoo.training.checkpoints import complete_checkpoints
from ligerzoo.training.config import ModelSection
from ligerzoo.training.metrics import read_metrics
from ligerzoo.training.output_dir import CHECKPOINTS_DIR, EXPORT_DIR
from train import SHAPES  # benchmarks/train.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 2 << 20  # larger "text" files are generated tables and data, not prose or code
# The training recipe, the same for bf16 and FP8. Peak lr 3e-4 is Pythia-1B's (GPT-3 1.3B: 2e-4),
# safe without tuning at this size; a tenth of the run as warmup (100 steps of 1,000) keeps the
# first large updates of a fresh model small; then cosine to a tenth. AdamW (0.9, 0.95), weight
# decay 0.1 and clipping at 1.0 are train.py's defaults.
LR = 3e-4
WARMUP_FRACTION = 0.1
SEED = 0
STOP_MARGIN_S = 30  # a stop is sent this long before the limit; the ranks get 15 s to exit
PROGRESS_EVERY = 50  # train.py prints a line a step; every 50th is passed on
EXIT_STOPPED = 3
FINAL_STEPS = 100  # the final loss: the mean over this many last steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus", help="write a text corpus of installed files as jsonl")
    corpus.add_argument("out", metavar="OUT.jsonl")
    corpus.add_argument("--max-mb", type=float, default=400, help="stop once this much text (MB of UTF-8) is in")
    corpus.add_argument("--root", action="append", dest="roots", metavar="DIR",
                        help="a directory to take files from (repeat for more); default: site-packages and stdlib")
    train = commands.add_parser("train", help="train one recipe from scratch (or resume it)")
    train.add_argument("recipe", choices=("off", "rowwise", "tensorwise"), help="--train.float8 of train.py")
    train.add_argument("run_dir", metavar="RUN_DIR")
    train.add_argument("--data", required=True, help="the corpus: .jsonl (or a .tokens file of `ligerzoo prepare`)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--shape", choices=[name for name, shape in SHAPES.items() if shape["model_type"] == "llama"],
                       default="llama-1b")
    train.add_argument("--seq", type=int, default=4096)
    train.add_argument("--batch", type=int, default=4, help="rows per GPU a step")
    train.add_argument("--gpus", type=int, help="ranks (default: every visible GPU; 1 on the CPU)")
    train.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS", help="steps between "
                       "checkpoints (the 1B's is 15 GB: float32 weights and AdamW state)")
    train.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop the run before this many "
                       "seconds have passed (a checkpoint is kept; the same command resumes)")
    train.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu (with --shape tiny, a gloo "
                       "rank, the kernels' PyTorch path): checks the plumbing")
    train.add_argument("--keep-checkpoint", action="store_true", help="keep the final checkpoint; by default a "
                       "finished run keeps its metrics and export only")
    compare = commands.add_parser("compare", help="plot two runs' losses and compare their final losses")
    compare.add_argument("runs", nargs=2, metavar="RUN_DIR", help="the reference (bf16) run, then the other")
    compare.add_argument("--out", default="curves.svg", help="the SVG to write")
    compare.add_argument("--last", type=int, default=FINAL_STEPS, help="final loss: the mean of the last N steps")
    compare.add_argument("--labels", nargs=2, help="the runs' names (default: their directories' names)")
    args = parser.parse_args()
    if args.command == "corpus":
        write_corpus(args.out, args.max_mb, args.roots or default_roots())
    elif args.command == "train":
        sys.exit(train_recipe(args))
    else:
        print(compare_runs(args.runs, args.labels or [Path(run).name for run in args.runs], args.out, args.last))


# corpus

def default_roots() -> list[str]:
    """This Python's site-packages and standard library (the first may lie inside the second)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(paths[name] for name in ("purelib", "platlib", "stdlib")))


def write_corpus(out: str, max_mb: float, roots: list[str]) -> None:
    """Every text file of SUFFIXES under `roots`, root by root in path order, each file once, one
    {"text": ...} line each, until max_mb of text; says what it took."""
    limit, seen = max_mb * 1e6, set()
    taken = {root: [0, 0] for root in roots}  # files, bytes
    skipped = {"not UTF-8 text": 0, "empty": 0, f"over {MAX_FILE_BYTES >> 20} MiB": 0}
    total_bytes = total_chars = 0
    staging = Path(f"{out}.tmp")
    staging.parent.mkdir(parents=True, exist_ok=True)
    with open(staging, "w", encoding="utf-8") as file:
        for root in roots:
            if not Path(root).is_dir():
                raise SystemExit(f"--root {root}: not a directory")
            for path in sorted(text_files(root)):
                if total_bytes >= limit:
                    break
                if path in seen:  # site-packages inside the stdlib's directory
                    continue
                seen.add(path)
                if os.path.getsize(path) > MAX_FILE_BYTES:
                    skipped[f"over {MAX_FILE_BYTES >> 20} MiB"] += 1
                    continue
                data = Path(path).read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if text is None or "\0" in text:
                    skipped["not UTF-8 text"] += 1
                    continue
                if not text.strip():
                    skipped["empty"] += 1
                    continue
                file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                taken[root][0] += 1
                taken[root][1] += len(data)
                total_bytes += len(data)
                total_chars += len(text)
    if total_bytes == 0:
        raise SystemExit(f"no {', '.join(SUFFIXES)} files under {', '.join(roots)}")
    staging.replace(out)
    files = sum(count for count, _ in taken.values())
    print(f"{out}: {files:,} files, {total_bytes / 1e6:,.1f} MB, {total_chars:,} characters"
          f"{' (stopped at --max-mb)' if total_bytes >= limit else ''}")
    for root, (count, size) in taken.items():
        print(f"  {root}: {count:,} files, {size / 1e6:,.1f} MB")
    print("  skipped: " + ", ".join(f"{count:,} {why}" for why, count in skipped.items()))


def text_files(root: str):
    """The real paths of the files of SUFFIXES under root (links to directories not followed)."""
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(SUFFIXES) and os.path.isfile(path):
                yield os.path.realpath(path)


# train

def train_recipe(args) -> int:
    """Run (or resume) one recipe under torchrun; the exit status (0: finished, EXIT_STOPPED)."""
    started = time.monotonic()
    run_dir = Path(args.run_dir)
    if last_step(run_dir) >= args.steps:
        print(f"{run_dir}: already trained {args.steps} steps")
        return summarize(run_dir, args.steps)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks(args)}",
               str(ROOT / "train.py"), *train_flags(args)]
    if run_dir.is_dir() and not complete_checkpoints(run_dir):
        # Stopped before its first checkpoint: train.py refuses a directory with metrics and no
        # checkpoint; there is nothing to resume, so it starts afresh.
        command += ["--train.overwrite", "true"]
    environment = dict(os.environ)
    if args.device == "cpu":  # gloo on the CPU even where there are GPUs, kernels on their PyTorch path
        environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="0")
    print(" ".join(command[1:]), flush=True)
    child = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # a group of its own: stopped with its ranks
    stopping = threading.Event()  # once set, the child's output (torchrun's shutdown traceback) is dropped
    pump = threading.Thread(target=pass_output, args=(child.stdout, stopping), daemon=True)
    pump.start()
    # Stopped ourselves (a device command's timeout, ^C): the ranks go too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stopped = None
        if args.time_limit is not None:
            stopped = watch(child, run_dir, started + args.time_limit - STOP_MARGIN_S, stopping)
        code = child.wait()
    except KeyboardInterrupt:
        stop(child, stopping)
        raise
    pump.join(timeout=5)
    if stopped:
        print(f"stopped: {stopped}", flush=True)
    elif code != 0:
        print(f"train.py failed (exit status {code}); its output is above", flush=True)
        return code
    status = summarize(run_dir, args.steps)
    if status == 0 and not args.keep_checkpoint and (run_dir / EXPORT_DIR).is_dir():
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        print(f"removed {run_dir / CHECKPOINTS_DIR} (--keep-checkpoint keeps it)", flush=True)
    return status


def ranks(args) -> int:
    """torchrun's ranks: --gpus, else one per visible GPU (one on the CPU)."""
    if args.gpus is not None:
        return args.gpus
    if args.device == "cpu":
        return 1
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: pass --device cpu (with --shape tiny) to check the plumbing")
    return torch.cuda.device_count()


def train_flags(args) -> list[str]:
    """train.py's flags: the run, the recipe, the data, the shape."""
    shape = SHAPES[args.shape]
    if shape.get("head_dim") not in (None, shape["hidden_size"] // shape["num_attention_heads"]):
        raise SystemExit(f"--shape {args.shape}: head_dim {shape['head_dim']} is not hidden_size / heads, the only "
                         "one train.py builds")
    flags = ["--output_dir", args.run_dir, "--max_steps", str(args.steps),
             "--checkpoint_every", str(args.checkpoint_every),
             "--train.keep_checkpoints", "1",  # the 1B's checkpoint is 15 GB: one at a time
             "--train.float8", args.recipe, "--train.compile", "true", "--train.activation_checkpointing", "full",
             "--train.seed", str(SEED), "--train.lr", str(LR),
             "--train.warmup_steps", str(max(1, round(WARMUP_FRACTION * args.steps))),
             "--data.path", args.data, "--data.tokenizer", "bytes",
             "--data.seq_len", str(args.seq), "--data.batch_size", str(args.batch)]
    for field in dataclasses.fields(ModelSection):
        if field.name != "name":
            flags += [f"--model.{field.name}", str(shape[field.name])]
    return flags


def pass_output(stream, stopping: threading.Event) -> None:
    """The child's output until it is being stopped, but of its per-step lines only the first 3
    and every PROGRESS_EVERY-th."""
    for line in stream:
        if stopping.is_set():
            continue
        words = line.split(maxsplit=2)
        if len(words) > 1 and words[0] == "step" and "/" in words[1]:
            step = int(words[1].split("/")[0])
            if step > 3 and step % PROGRESS_EVERY:
                continue
        print(line, end="", flush=True)


def watch(child: subprocess.Popen, run_dir: Path, stop_at: float, stopping: threading.Event) -> str | None:
    """Stop the child at `stop_at`, or as soon as a checkpoint lands if the next one would come
    after it (the steps between would be lost anyway). Returns why it stopped it, or None."""
    newest, since = newest_checkpoint(run_dir), time.monotonic()
    while child.poll() is None:
        time.sleep(1)
        now = time.monotonic()
        step = newest_checkpoint(run_dir)
        if step != newest:
            # The first interval includes start-up and compilation: an overestimate, so cautious.
            interval, newest, since = now - since, step, now
            if now + interval > stop_at:
                stop(child, stopping)
                return f"a checkpoint at step {step}, and the next would land {interval:.0f} s later, past the limit"
        if now >= stop_at:
            stop(child, stopping)
            return f"{STOP_MARGIN_S} s before the time limit"
    return None


def stop(child: subprocess.Popen, stopping: threading.Event) -> None:
    """SIGTERM to torchrun, which passes it to its ranks; 15 s later, SIGKILL to what is left of
    its group. A checkpoint is written under a temporary name and renamed once whole, so a stop
    mid-write leaves the one before."""
    stopping.set()
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:  # ranks that torchrun had not yet taken charge of, compile workers
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def newest_checkpoint(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint, 0 if none."""
    checkpoints = complete_checkpoints(run_dir)
    return int(checkpoints[0].name.removeprefix("step_")) if checkpoints else 0


def last_step(run_dir: Path) -> int:
    """The last step in the run's metrics.jsonl, 0 if none."""
    try:
        return read_metrics(run_dir)[-1]["step"]
    except (FileNotFoundError, ValueError):
        return 0


def summarize(run_dir: Path, steps: int) -> int:
    """Say how far the run is; 0 if it reached `steps`, else EXIT_STOPPED."""
    done, checkpoint = last_step(run_dir), newest_checkpoint(run_dir)
    if done >= steps:
        records = read_metrics(run_dir)
        last = [record["loss"] for record in records[-FINAL_STEPS:]]
        print(f"{run_dir}: {done} steps, loss {records[-1]['loss']:.4f} (mean of the last {len(last)}: "
              f"{statistics.fmean(last):.4f}), median {statistics.median(r['tokens_per_s'] for r in records):,.0f} "
              f"tokens/s", flush=True)
        return 0
    print(f"{run_dir}: {done} of {steps} steps logged, the last checkpoint at step {checkpoint}; run the same "
          f"command again to go on from there", flush=True)
    return EXIT_STOPPED


# compare

COLORS = ("#1f5fbf", "#d0451b")  # the reference blue, the other vermilion
DASHES = ("none", "7 4")  # the second dashed: where the runs agree, the first shows through it
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 520, 70, 20, 40, 55
EMA_DECAY = 0.95  # the thick curve: an exponential moving average over ~20 steps


def compare_runs(runs: list[str], labels: list[str], out: str, last: int) -> str:
    """Write the SVG of both runs' losses to `out`; return the markdown table."""
    records = [read_metrics(run) for run in runs]
    common = min(rs[-1]["step"] for rs in records)
    Path(out).write_text(loss_svg([[(r["step"], r["loss"]) for r in rs] for rs in records], labels))
    finals, speeds = [], []
    for rs in records:
        tail = [r["loss"] for r in rs if r["step"] <= common][-last:]
        finals.append(statistics.fmean(tail))
        speeds.append(statistics.median(r["tokens_per_s"] for r in rs))
    ratio = finals[1] / finals[0]
    lines = [f"{out}: the loss of {labels[0]} and {labels[1]} against the step", "",
             f"| run | steps | final loss (mean of the last {last} steps to {common}) | tokens/s (median) |",
             "|---|---|---|---|"]
    for label, rs, final, speed in zip(labels, records, finals, speeds):
        lines.append(f"| {label} | {rs[-1]['step']} | {final:.4f} | {speed:,.0f} |")
    within = "yes" if abs(ratio - 1) <= 0.015 else "no"
    lines.append(f"| {labels[1]} / {labels[0]} | | {ratio:.4f} ({100 * (ratio - 1):+.2f}%; within 1.5%: {within}) "
                 f"| {speeds[1] / speeds[0]:.2f}x |")
    if len({rs[-1]["step"] for rs in records}) > 1:
        lines.append(f"\nThe runs end at different steps: final losses are over the steps both have, to {common}.")
    return "\n".join(lines)


def loss_svg(curves: list[list[tuple[int, float]]], labels: list[str]) -> str:
    """An SVG of (step, loss) curves, the loss on a log axis: each run a thin line of its raw
    losses and a thick one of their moving average, in its colour, with a legend."""
    steps = [step for curve in curves for step, _ in curve]
    losses = [loss for curve in curves for _, loss in curve if loss > 0]
    x_lo, x_hi = 0, max(steps)
    y_lo, y_hi = math.log(min(losses)), math.log(max(losses))
    margin = max(y_hi - y_lo, 1e-3) * 0.03  # the extremes off the frame
    y_lo, y_hi = y_lo - margin, y_hi + margin
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step):
        return LEFT + plot_w * (step - x_lo) / max(1, x_hi - x_lo)

    def y(loss):
        return TOP + plot_h * (y_hi - math.log(max(loss, 1e-12))) / (y_hi - y_lo)

    def path(points, style):
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(points))
        return f'<path d="{d}" fill="none" stroke-linejoin="round" {style}/>'

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
              f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">'),
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    # Axes, ticks and grid.
    parts.append(f'<g stroke="#333"><line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>'
                 f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/></g>')
    for tick in nice_ticks(x_lo, x_hi):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{TOP}" x2="{x(tick):.1f}" y2="{TOP + plot_h + 5}" '
                     f'stroke="#ddd"/><text x="{x(tick):.1f}" y="{TOP + plot_h + 18}" '
                     f'text-anchor="middle">{tick:g}</text>')
    for tick in log_ticks(math.exp(y_lo), math.exp(y_hi)):
        parts.append(f'<line x1="{LEFT - 5}" y1="{y(tick):.1f}" x2="{LEFT + plot_w}" y2="{y(tick):.1f}" '
                     f'stroke="#ddd"/><text x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">step</text>'
                 f'<text transform="translate(16,{TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'training loss (log scale)</text>')
    # The curves, then a legend.
    for index, (curve, label, color, dashes) in enumerate(zip(curves, labels, COLORS, DASHES), start=1):
        name = xml.sax.saxutils.escape(label)
        thin = f'stroke="{color}" stroke-width="0.8" stroke-opacity="0.35"'
        thick = f'stroke="{color}" stroke-width="2.2" stroke-dasharray="{dashes}"'
        parts.append(f'<g id="run-{index}"><title>{name}</title>{path(curve, thin)}'
                     f'{path(moving_average(curve), thick)}</g>')
        legend_y = TOP + 8 + 18 * index
        parts.append(f'<line x1="{LEFT + plot_w - 200}" y1="{legend_y}" x2="{LEFT + plot_w - 170}" y2="{legend_y}" '
                     f'{thick}/><text x="{LEFT + plot_w - 162}" y="{legend_y + 4}">{name}</text>')
    parts.append(f'<text x="{LEFT}" y="{TOP - 14}" font-size="14">loss per step (thin) and its moving average '
                 f'(thick, decay {EMA_DECAY})</text></svg>')
    return "\n".join(parts) + "\n"


def moving_average(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The exponential moving average of the losses, from the first one."""
    averaged, value = [], curve[0][1]
    for step, loss in curve:
        value = EMA_DECAY * value + (1 - EMA_DECAY) * loss
        averaged.append((step, value))
    return averaged


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round numbers (1, 2 or 5 times a power of ten apart) from lo to hi, about `count` of them."""
    raw = max(hi - lo, 1e-12) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2 and 5 times powers of ten from lo to hi; round linear steps where those are too few."""
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    return ticks if len(ticks) >= 4 else nice_ticks(lo, hi, 5)


if __name__ == "__main__":
    main()
