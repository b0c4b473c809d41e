"""Writing a set of files so that a crash leaves either all the old ones or all the new ones.

Each file is written under a hidden temporary name in the target directory and fsynced; only
when every file is written are they renamed into place, and the directory is fsynced so that the
renames survive a power loss. Hugging Face exports and Medusa heads are
saved this way; token files use `fsync_directory`.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_files_atomically(directory: str | os.PathLike, tensor_files: dict[str, dict[str, torch.Tensor]],
                           json_files: dict[str, dict]) -> None:
    """Write safetensors files ({filename: {name: tensor}}) and JSON files ({filename: content})
    into `directory`: each under a hidden temporary name, fsynced, then all renamed into place, so
    a crash leaves either the old files or the new ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for filename, tensors in tensor_files.items():
            staged.append((_temporary_path(directory, filename), directory / filename))
            # Copies, so that a file never holds views into a larger (fused) parameter; one file's
            # worth at a time, so a save of a large model needs no second copy of it in memory.
            copies = {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                      for name, t in tensors.items()}
            save_file(copies, staged[-1][0], metadata={"format": "pt"})
            _fsync(staged[-1][0])
            del copies
        for filename, content in json_files.items():
            staged.append(_stage_json(directory, filename, content))
        for temporary, final in staged:
            os.replace(temporary, final)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def _temporary_path(directory: Path, filename: str) -> Path:
    # Hidden and suffixed, so no loader mistakes it for a checkpoint file.
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _stage_json(directory: Path, filename: str, content: dict) -> tuple[Path, Path]:
    temporary = _temporary_path(directory, filename)
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
    _fsync(temporary)
    return temporary, directory / filename


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    if os.name == "posix":  # makes the renames durable; Windows cannot open a directory
        _fsync(directory)
