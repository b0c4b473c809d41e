"""Checkpoints in the Hugging Face format: `config.json` plus safetensors shards (one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`).

Loading builds the model on the meta device, validates every tensor name and shape against the
checkpoint names of tensor_names.py from the shard headers alone (so a wrong checkpoint fails before any
memory is allocated), then materialises the model on its device and streams the shards one
tensor at a time into `param[index]`: peak host memory is about one tensor, since the shards are
memory-mapped, never read whole.

Saving writes every file under a temporary name in the target directory, then renames them into
place and only then removes the previous save's stale shards: a save that fails or is killed
while writing (nearly all of its time) leaves no partial file under a final name and the previous
checkpoint in that directory loadable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ligerzoo.hf.atomic_files import write_files_atomically
from ligerzoo.hf.hub import CONFIG_FILE, SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE, resolve_model_dir
from ligerzoo.hf.json_file import read_json
from ligerzoo.hf.tensor_names import optional_names, tensor_map
from ligerzoo.models import ModelConfig, Transformer, build_model

SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_UNITS.update({"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40})
# safetensors' dtype tags for the floating types a checkpoint may hold.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint directory whose files are missing, unreadable, or do not match the model."""


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local directory holding the checkpoint `name_or_path` names: the directory itself, or
    a Hub repo id's snapshot (configs and weights only) in huggingface_hub's cache."""
    return resolve_model_dir(name_or_path, revision, tokenizer=False)


def from_pretrained(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    revision: str | None = None,
) -> Transformer:
    """Build the model a checkpoint describes and fill it with the checkpoint's weights.

    name_or_path: a checkpoint directory, or a Hub repo id (fetched through huggingface_hub's
        cache: only the configs and the safetensors weights; see hub.py).
    dtype: the parameters' dtype. None does what transformers' default `dtype="auto"` does: the
        config's `dtype` (or older `torch_dtype`), else the checkpoint's first floating tensor's.
    device: where the parameters live (default "cpu"); tensors are cast and copied straight there.
    revision: a branch, tag or commit hash of the Hub repo (default: its main branch).
    The model comes back in eval mode, as transformers returns it (no ligerzoo module behaves
    differently in train mode; a training loop calls `.train()`), with requires_grad=True.
    """
    directory = resolve_checkpoint_dir(name_or_path, revision)
    config_dict = read_json(directory / CONFIG_FILE, required=True, error=CheckpointError)
    try:
        config = ModelConfig.from_dict(config_dict)
    except ValueError as error:
        raise ValueError(f"{directory / CONFIG_FILE}: {error}") from error
    files = _checkpoint_files(directory)
    headers = _read_headers(files)
    dtype = _resolve_dtype(dtype, config_dict, headers)

    model = build_model(config, device="meta", dtype=dtype)
    names = tensor_map(config)
    _check_tensors(model, names, headers, directory)  # on meta: nothing allocated yet
    model.to_empty(device=device or "cpu")
    model.reset_buffers()
    _copy_tensors(model, names, files)
    return model.eval()


def _checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: `model.safetensors` if present (transformers
    prefers it too), else the shards the index lists."""
    if (directory / SINGLE_WEIGHTS_FILE).is_file():
        return [directory / SINGLE_WEIGHTS_FILE]
    index_path = directory / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, required=True, error=CheckpointError)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_path} has no 'weight_map' object")
        names = list(dict.fromkeys(index["weight_map"].values()))  # file names in first-use order
        absent = [name for name in names if not (directory / name).is_file()]
        if absent:
            raise CheckpointError(
                f"{index_path} lists shard(s) that are not in {directory}: {', '.join(absent)}; "
                "the download is incomplete: fetch the missing files again"
            )
        return [directory / name for name in names]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory} holds only PyTorch pickle weights (*.bin/*.pt); ligerzoo reads safetensors only: "
            "convert them (e.g. load in transformers and save_pretrained)"
        )
    raise CheckpointError(f"{directory} holds neither {SINGLE_WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """HF tensor name -> (file, shape, safetensors dtype tag), from the files' headers only."""
    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    duplicated = []
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in headers:
                        duplicated.append(f"{name} (in {headers[name][0].name} and {path.name})")
                    tensor = f.get_slice(name)
                    headers[name] = (path, tuple(tensor.get_shape()), tensor.get_dtype())
        except SafetensorError as error:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({error}); it is probably truncated or "
                "corrupt: download it again"
            ) from error
    if duplicated:
        raise CheckpointError(f"tensors stored in more than one shard: {', '.join(duplicated)}")
    return headers


def _resolve_dtype(dtype, config_dict: dict, headers: dict) -> torch.dtype:
    if dtype is None:
        dtype = config_dict.get("dtype") or config_dict.get("torch_dtype")
    if dtype is None:
        tags = (tag for _, _, tag in headers.values() if tag in _SAFETENSORS_DTYPES)
        dtype = _SAFETENSORS_DTYPES.get(next(tags, None))
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype is {dtype}, expected a floating-point dtype")
    return dtype


def _check_tensors(model: Transformer, names: dict, headers: dict, directory: Path) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    optional = optional_names(model.config)
    params = dict(model.named_parameters())
    _check_map_covers_parameters(model, names, params)

    missing = [name for name in names if name not in headers]
    unexpected = [name for name in headers if name not in names and name not in optional]
    misshaped = []
    for name, (path, shape, _) in headers.items():
        if name in names:
            param_name, index = names[name]
            expected = tuple(params[param_name][index].shape)
            if shape != expected:
                misshaped.append(f"{name}: {list(shape)} in {path.name}, the model expects {list(expected)}")
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {directory} does not match {type(model).__name__}:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if names:
                lines.append(f"  {title} ({len(names)}):")
                lines.extend(f"    {name}" for name in names)
        raise CheckpointError("\n".join(lines))


def _check_map_covers_parameters(model, names: dict, params: dict) -> None:
    """The map's regions must add up to every parameter: a region no checkpoint tensor maps to
    would keep uninitialised memory. Counts elements (cheap, and works on meta)."""
    filled = dict.fromkeys(params, 0)
    for param_name, index in names.values():
        filled[param_name] += params[param_name][index].numel()
    wrong = [f"{name} ({filled[name]} of {p.numel()} elements)"
             for name, p in params.items() if filled[name] != p.numel()]
    if wrong:
        raise RuntimeError(f"the tensor map of {type(model).__name__} (tensor_names.py) does not cover: "
                           f"{', '.join(wrong)}")


def _copy_tensors(model: Transformer, names: dict, files: list[Path]) -> None:
    """Stream every mapped tensor into its parameter region, cast and moved on the copy."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in names:
                        param_name, index = names[name]
                        params[param_name][index].copy_(f.get_tensor(name))


# ---------------------------------------------------------------------------------------------
# Saving


def save_pretrained(
    model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write `config.json` and the weights in Hugging Face names, sharded by `max_shard_size`
    (bytes, or a string such as "5GB", "500MB", "2GiB"), with an index when there are several
    shards. Every file is written under a temporary name and renamed into place once all are
    written; shards of a previous save that the new one does not use are removed afterwards."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    params = dict(model.named_parameters())
    regions = {name: params[param_name][index]
               for name, (param_name, index) in tensor_map(model.config).items()}

    shards = _split_into_shards({name: t.numel() * t.element_size() for name, t in regions.items()}, limit)
    if len(shards) == 1:
        filenames = [SINGLE_WEIGHTS_FILE]
    else:
        filenames = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    dtype = next(p.dtype for p in params.values() if p.is_floating_point())
    config = model.config.to_dict()
    config.pop("dtype", None)
    # The weights' dtype, in the spelling every transformers version reads (5.x maps it to `dtype`).
    config["torch_dtype"] = str(dtype).removeprefix("torch.")

    # Views into the (possibly fused) parameters; copied to the CPU one file at a time.
    tensor_files = {filename: {name: regions[name] for name in names}
                    for filename, names in zip(filenames, shards)}
    json_files = {}
    if len(shards) > 1:
        total_size = sum(t.numel() * t.element_size() for t in regions.values())
        weight_map = {name: filename for filename, names in zip(filenames, shards) for name in names}
        json_files[WEIGHTS_INDEX_FILE] = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    json_files[CONFIG_FILE] = config
    write_files_atomically(directory, tensor_files, json_files)
    _remove_stale_weights(directory, keep=set(filenames))


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10**9), "2GiB" (2**30), "500MB", "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B\s*", str(size).upper())
        if match is None:
            raise ValueError(
                f"max_shard_size {size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"max_shard_size is {size!r}, expected a positive size")
    return value


def _split_into_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy, in order, as huggingface_hub splits: a new shard when the next tensor would push
    the current one past `limit`; a tensor larger than `limit` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    """Remove weight files of an earlier save that the new one replaced: shards with another
    count, or the single file / index of the other layout (a stale `model.safetensors` would
    take precedence over a new index)."""
    other_layout = WEIGHTS_INDEX_FILE if SINGLE_WEIGHTS_FILE in keep else SINGLE_WEIGHTS_FILE
    for entry in directory.iterdir():
        stale = entry.name == other_layout or SHARD_PATTERN.fullmatch(entry.name)
        if stale and entry.name not in keep and entry.is_file():
            entry.unlink()
