"""Checkpoints with torch.distributed.checkpoint, written atomically and verified on load, and
the final export.

A checkpoint is `<output_dir>/checkpoints/step_<N>`: the sharded model and optimizer (DCP), one
small file per rank with the data position and RNG states, the run record (`run.json`: the
configuration, model config and tokenizer it was saved with) and a manifest of every file's size
and CRC-32. Every rank writes into `step_<N>.tmp`; once all have finished, rank 0 writes the
manifest and renames the folder, so a folder without `.tmp` was complete, and a crash at any
moment leaves the previous checkpoint as it was. Values that are not finite are never saved.

Resuming takes the newest checkpoint whose files match its manifest and whose tensors are finite;
a damaged one (a truncated or deleted file, a flipped byte, a NaN) is reported and the one before
it used instead.

A checkpoint resumes on any number of ranks: DCP saves each tensor by name with its shards' places
in the whole, and loads whatever slice the new ranks hold (FSDP2 shards, or whole tensors on one
process that is not sharded), model and optimizer alike. The data position is the global number
of rows consumed, so with the same global batch (world size x batch size x grad_accum) the steps
read the rows an uninterrupted run at the new size reads.
"""

import json
import random
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ligerzoo.hf.hub import GENERATION_CONFIG_FILE, TOKENIZER_FILES
from ligerzoo.models import build_model
from ligerzoo.training.output_dir import CHECKPOINTS_DIR, EXPORT_DIR

MANIFEST_FILE = "manifest.json"  # every other file of the checkpoint: its size and CRC-32
RUN_FILE = "run.json"  # the configuration and tokenizer the run was saved with
_STEP_NAME = re.compile(r"step_(\d+)")
_CHECKSUM_CHUNK = 1 << 24


class CheckpointCorrupt(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong with it."""


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The checkpoints whose writing finished (renamed from .tmp), newest first; they are verified
    when loaded."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [(int(match.group(1)), path) for path in root.glob("step_*")
             if (match := _STEP_NAME.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(output_dir: str, step: int, model, optimizer, data, run: dict,
                    keep: int = 0) -> Path:
    """Write step `step`'s checkpoint (every rank calls this), refusing to save values that are
    not finite; then delete all but the newest `keep` checkpoints (0: keep all)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    bad = _non_finite({"model": model_state, "optimizer": optimizer_state})
    if bad:
        raise FloatingPointError(
            f"step {step} left non-finite values in {', '.join(bad[:4])}; not saving this checkpoint, so the "
            f"last one stays usable. Lower train.lr and resume from it"
        )
    final = Path(output_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"
    staging = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    torch.save({"step": step, "data": data.state_dict(), "rng": _rng_state()}, staging / f"rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        (staging / RUN_FILE).write_text(json.dumps({**run, "step": step}, indent=1))
    dist.barrier()
    files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
    sums = _shared_work(lambda name: _size_and_checksum(staging / name), files)
    if dist.get_rank() == 0:
        (staging / MANIFEST_FILE).write_text(json.dumps({"files": sums}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in complete_checkpoints(output_dir)[keep:] if keep else ():
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointCorrupt unless every file the manifest lists is there with its size and
    checksum (every rank calls this; each checks a share of the files)."""
    try:
        listed = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path} has no {MANIFEST_FILE}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointCorrupt(f"{path}/{MANIFEST_FILE} is unreadable") from None

    def problem(name: str) -> str | None:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size, checksum = _size_and_checksum(file)
        if size != listed[name][0]:
            return f"{name} has {size:,} bytes, {listed[name][0]:,} when saved"
        if checksum != listed[name][1]:
            return f"{name} does not have the checksum it was saved with"
        return None

    problems = [p for p in _shared_work(problem, sorted(listed)).values() if p]
    if problems:
        raise CheckpointCorrupt(f"{path}: {'; '.join(problems[:4])}")


def load_checkpoint(path: Path, model, optimizer, data) -> dict:
    """Restore everything saved in `path`, checking that it is finite; returns its step."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as error:  # DCP reports a damaged file as any of several errors
        raise CheckpointCorrupt(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})") from None
    bad = _non_finite(state)
    if bad:
        raise CheckpointCorrupt(f"{path} holds non-finite values in {', '.join(bad[:4])}")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    same_world_size = len(list(path.glob("rank*.pt"))) == dist.get_world_size()
    # The data state is the same on every rank; the RNG states are not.
    extra = torch.load(path / f"rank{dist.get_rank() if same_world_size else 0}.pt", weights_only=False)
    data.load_state_dict(extra["data"])
    # RNG streams belong to ranks: on another world size no rank takes one over, so every rank
    # keeps the states it was seeded with, and each such resume starts from the same ones.
    if same_world_size:
        _set_rng_state(extra["rng"])
    return extra["step"]


def saved_run(path: Path) -> dict | None:
    """The run record saved with a checkpoint (None for one saved before records were kept)."""
    try:
        return json.loads((path / RUN_FILE).read_text())
    except FileNotFoundError:
        return None


def resume_latest(output_dir: str, model, optimizer, data,
                  check_run: Callable[[Path, dict | None], None]) -> tuple[int, list[str]]:
    """Load the newest checkpoint that verifies and loads, falling back past damaged ones; before
    loading, `check_run(path, its run record)` may refuse it by raising. Returns the step resumed
    (0: there was no checkpoint) and a warning for each checkpoint skipped. Raises
    CheckpointCorrupt if there are checkpoints but none can be used."""
    candidates, skipped = complete_checkpoints(output_dir), []
    for path in candidates:
        try:
            if (path / MANIFEST_FILE).exists() or not (path / ".metadata").exists():
                verify_checkpoint(path)
            else:
                skipped.append(f"{path} was saved without a manifest (by an earlier ligerzoo): not verified")
            check_run(path, saved_run(path))
            return load_checkpoint(path, model, optimizer, data), skipped
        except CheckpointCorrupt as error:
            skipped.append(f"{error}: falling back to the previous checkpoint")
    if candidates:
        raise CheckpointCorrupt(
            f"no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} can be resumed from:\n  " + "\n  ".join(skipped)
            + "\nMove them away, or pass --train.overwrite true to delete them and start afresh"
        )
    return 0, skipped


def _non_finite(state: dict) -> list[str]:
    """The names of the floating-point tensors in `state` (nested dicts) holding NaN or Inf on any
    rank; the same list on every rank."""
    return _everyone(_non_finite_here(state, ""))


def _non_finite_here(state: dict, prefix: str) -> list[str]:
    bad = []
    for name, value in state.items():
        if isinstance(value, dict):
            bad += _non_finite_here(value, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            local = value.to_local() if hasattr(value, "to_local") else value
            if not bool(torch.isfinite(local).all()):
                bad.append(f"{prefix}{name}")
    return bad


def _everyone(names: list[str]) -> list[str]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({name for names in gathered for name in names})


def _shared_work(function, names: list[str]) -> dict:
    """{name: function(name)} for every name, each rank doing its share, gathered on every rank."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = {name: function(name) for name in names[rank::world_size]}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return {name: result for part in gathered for name, result in part.items()}


def _size_and_checksum(path: Path) -> tuple[int, int]:
    checksum, size = 0, 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHECKSUM_CHUNK):
            checksum, size = zlib.crc32(chunk, checksum), size + len(chunk)
    return size, checksum


def export_hf(model, output_dir: str, tokenizer, model_dir: Path | None) -> Path:
    """Gather the full weights onto rank 0 and write them in the Hub format to <output_dir>/hf,
    self-contained: with the files of the tokenizer the run trained with (the byte tokenizer's
    included) and the generation config of the model fine-tuned from (`model_dir`), if any."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = Path(output_dir) / EXPORT_DIR
    if dist.get_rank() == 0:
        plain = build_model(model.config, device="meta", dtype=torch.float32)
        plain.to_empty(device="cpu")
        plain.reset_buffers()
        plain.load_state_dict(full)
        plain.save_pretrained(target)
        if tokenizer.model_dir is None:  # made in memory: the byte tokenizer of a model from scratch
            tokenizer.save(target)
        else:
            _copy_files(tokenizer.model_dir, target, TOKENIZER_FILES)
        if model_dir is not None:
            _copy_files(model_dir, target, [GENERATION_CONFIG_FILE])
    dist.barrier()
    return target


def _copy_files(source: Path, target: Path, names) -> None:
    for name in names:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)


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

