"""Checkpoints with torch.distributed.checkpoint, written atomically, and the final export.

A checkpoint is `<output_dir>/checkpoints/step_<N>`: the sharded model and optimizer (DCP), plus
one small file per rank with the scheduler, data position and RNG states. Every rank writes into
`step_<N>.tmp`; once all have finished, rank 0 renames it, so a directory without `.tmp` is
always complete, and a crash at any moment leaves the previous checkpoint as it was.

A checkpoint resumes on any number of ranks: DCP saves each tensor by name with its shards' places
in the whole, and loads whatever slice the new ranks hold (FSDP2 shards, or whole tensors on one
process that is not sharded), model and optimizer alike. The data position is the global number
of rows consumed, so with the same global batch (world size x batch size x grad_accum) the steps
read the rows an uninterrupted run at the new size reads.
"""

import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from ligerzoo.models import build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "original/tokenizer.model")


def latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir) / "checkpoints"
    steps = [p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / ".metadata").exists()]
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, data) -> Path:
    final = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
                "rng": _rng_state()}, staging / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, data) -> int:
    """Restore everything saved in `path`; returns its step."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    same_world_size = len(list(path.glob("rank*.pt"))) == dist.get_world_size()
    # The scheduler and data states are the same on every rank; the RNG states are not.
    extra = torch.load(path / f"rank{dist.get_rank() if same_world_size else 0}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    data.load_state_dict(extra["data"])
    # RNG streams belong to ranks: on another world size no rank takes one over, so every rank
    # keeps the states it was seeded with, and each such resume starts from the same ones.
    if same_world_size:
        _set_rng_state(extra["rng"])
    return extra["step"]


def export_hf(model, output_dir: str, tokenizer_dir: Path | None) -> None:
    """Gather the full weights onto rank 0 and write them in the Hub format to <output_dir>/hf,
    with the tokenizer files of the model fine-tuned from, if any."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        plain = build_model(model.config, device="meta", dtype=torch.float32)
        plain.to_empty(device="cpu")
        plain.reset_buffers()
        plain.load_state_dict(full)
        target = Path(output_dir) / "hf"
        plain.save_pretrained(target)
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (tokenizer_dir / name).exists():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tokenizer_dir / name, target / name)
    dist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

