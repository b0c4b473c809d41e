"""Medusa heads on disk: safetensors next to (never inside) the base model's checkpoint.

The layout is the original Medusa project's: `config.json` (medusa_num_heads, medusa_num_layers,
base_model_name_or_path) and `medusa_lm_head.safetensors` with head k's residual block i as
`{k}.{i}.linear.weight` / `.bias` and its output projection as `{k}.{num_layers}.weight`. Shared
output projections are simply absent (ours: `shared_output` in the config).
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ligerzoo.hf.atomic_files import write_files_atomically
from ligerzoo.hf.hub import CONFIG_FILE
from ligerzoo.hf.pretrained import CheckpointError
from ligerzoo.medusa.heads import MedusaConfig, MedusaHeads

WEIGHTS_FILE = "medusa_lm_head.safetensors"  # the Medusa project's name; its config is a config.json


def save_heads(heads: MedusaHeads, path: str | os.PathLike, base_model: str | None = None) -> None:
    """Write the heads' config and weights to the directory `path` (atomically)."""
    config = {
        "medusa_num_heads": heads.config.num_heads,
        "medusa_num_layers": heads.config.num_layers,
        "shared_output": heads.config.shared_output,
        "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size,
        "base_model_name_or_path": base_model,
    }
    write_files_atomically(path, {WEIGHTS_FILE: _to_file_names(heads)}, {CONFIG_FILE: config})


def load_heads(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> MedusaHeads:
    """The heads saved in the directory `path`, in `dtype` (default: as saved) on `device`."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise CheckpointError(f"{required} does not exist: is {directory} a directory of Medusa heads?")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    missing = [key for key in ("medusa_num_heads", "medusa_num_layers", "hidden_size", "vocab_size")
               if key not in saved]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    config = MedusaConfig(num_heads=saved["medusa_num_heads"], num_layers=saved["medusa_num_layers"],
                          shared_output=saved.get("shared_output", False))
    try:
        with safe_open(weights_path, framework="pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {weights_path}: {error}") from error
    with torch.device("meta"):
        heads = MedusaHeads(config, saved["hidden_size"], saved["vocab_size"])
    expected = _to_file_names(heads)
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} has shape {list(tensors[name].shape)}, expected {list(t.shape)}"
                 for name, t in expected.items() if name in tensors and tensors[name].shape != t.shape]
    if problems:
        raise CheckpointError(f"{weights_path} does not match {config_path}: " + "; ".join(problems))
    dtype = dtype or next(iter(tensors.values())).dtype
    heads = heads.to(dtype).to_empty(device=device or "cpu")
    with torch.no_grad():
        for name, target in _to_file_names(heads).items():
            target.copy_(tensors[name])
    return heads


def _to_file_names(heads: MedusaHeads) -> dict[str, torch.Tensor]:
    """The heads' parameters under the file's names."""
    names = {}
    layers = heads.config.num_layers
    for k, block in enumerate(heads.blocks):
        for i, residual in enumerate(block):
            names[f"{k}.{i}.linear.weight"] = residual.linear.weight
            names[f"{k}.{i}.linear.bias"] = residual.linear.bias
        if heads.outputs is not None:
            names[f"{k}.{layers}.weight"] = heads.outputs[k].weight
    return names
