"""Per-step metrics: one JSON object per line in <output_dir>/metrics.jsonl and a progress line,
both on rank 0 only."""

import json
import math
import sys
from pathlib import Path

import torch

from ligerzoo.training.output_dir import METRICS_FILE

# Dense bf16 peak FLOP/s by GPU name (the spec sheets' figures without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def flops_per_token(model, seq_len: int) -> float:
    """6 FLOPs per parameter per token (forward and backward), embedding lookup excluded, plus the
    attention scores and weighted sum: 12 * layers * heads * head_dim * seq_len (as PaLM counts).
    Of a mixture of experts' weights only the top-k experts a token goes to count."""
    config = model.config
    params = 0
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight":
            continue
        is_expert = name.endswith(("feed_forward.w13", "feed_forward.w2")) and p.dim() == 3
        params += p.numel() * config.num_experts_per_tok // config.num_local_experts if is_expert else p.numel()
    if model.lm_head is None:  # tied: the embedding is also the head, a matmul per token
        params += model.embed_tokens.weight.numel()
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * params + attention


def peak_flops(device: torch.device) -> float | None:
    """The GPU's peak FLOP/s, or None where unknown (CPU, an unlisted GPU): MFU is then null."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class MetricsLog:
    """Appends to metrics.jsonl; on resuming from `resume_step`, first drops the lines a killed run
    wrote after that checkpoint, so the file holds each step once."""

    def __init__(self, output_dir: str, max_steps: int, resume_step: int, enabled: bool):
        self.path, self.max_steps, self.enabled = Path(output_dir) / METRICS_FILE, max_steps, enabled
        self.live = sys.stderr.isatty()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                record = _parse(line)
                if record is None:
                    if line.strip():  # a line cut short by a crash mid-write
                        print(f"warning: dropped line {number} of {self.path}, not a whole record: {line[:60]!r}",
                              file=sys.stderr, flush=True)
                elif record["step"] <= resume_step:
                    kept.append(line)
        staging = self.path.with_suffix(".tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(self.path)
        self.file = open(self.path, "a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        line = (f"step {record['step']}/{self.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s")
        if record.get("val_loss") is not None:
            line += f"  val_loss {record['val_loss']:.4f}"
        if record.get("mfu") is not None:
            line += f"  mfu {100 * record['mfu']:.1f}%"
        if record.get("peak_memory_gib") is not None:
            line += f"  mem {record['peak_memory_gib']:.1f} GiB"
        print(("\r" + line + "\033[K") if self.live else line, end="" if self.live else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.live:
                print(file=sys.stderr)


def _parse(line: str) -> dict | None:
    """The record on one line of metrics.jsonl, or None if the line is not a whole one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(directory: str | Path) -> list[dict]:
    """The records of <directory>/metrics.jsonl sorted by step, the last one for a step written more
    than once (a resumed run). Raises ValueError or FileNotFoundError naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    path = directory / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {directory} a training run's output_dir?")
    by_step = {}
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n") and _parse(lines[-1]) is None:
        lines.pop()  # being written (or cut short by a crash): not a record yet
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        for key in ("step", "loss", "tokens_per_s"):
            if key not in record:
                raise ValueError(f"{path}, line {number}: {key!r} is missing")
            value = record[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{path}, line {number}: {key!r} is {json.dumps(value)}, not a number")
        if not isinstance(record["step"], int) and not (math.isfinite(record["step"])
                                                         and record["step"] == int(record["step"])):
            raise ValueError(f"{path}, line {number}: 'step' is {record['step']!r}, not an integer")
        by_step[int(record["step"])] = record  # a later line for the same step wins
    if not by_step:
        raise ValueError(f"{path} holds no metrics yet")
    return [{**by_step[step], "step": step} for step in sorted(by_step)]
