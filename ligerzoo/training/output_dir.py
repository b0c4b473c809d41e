"""A run's output directory: checked before anything is written, held by one run at a time, and
never emptied of an earlier run's work unless asked.

The lock is `<output_dir>/train.lock`, a file holding the holder's pid, host and start time, locked
with `flock` by rank 0 for the whole run. The kernel drops an flock when its process dies, however
it dies, so a lock left by a crashed run is stale by construction: the next run takes it over and
says whose it was. A second run on a busy directory stops at once, naming the holder.
"""

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "hf"
MEDUSA_DIR = "medusa"
# What a run writes; `overwrite` removes exactly these.
RUN_ARTEFACTS = (CHECKPOINTS_DIR, METRICS_FILE, EXPORT_DIR, MEDUSA_DIR)


class OutputDirError(ValueError):
    """An output directory that cannot be used: the message says why and what to do."""


class OutputDirLock:
    """The exclusive hold of one run on its output directory (rank 0 holds it); `release()` or
    the end of the process lets it go."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self._read())
            self._file.close()
            raise OutputDirError(
                f"{output_dir} is in use by another training run ({holder}); wait for it to finish, stop it, "
                f"or choose another --output_dir"
            ) from None
        self.previous = self._read()  # a holder that is gone: its run crashed or was killed
        self._file.seek(0)
        self._file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, self._file)
        self._file.flush()

    def _read(self) -> dict | None:
        self._file.seek(0)
        try:
            holder = json.loads(self._file.read() or "null")
        except json.JSONDecodeError:
            return None
        return holder if isinstance(holder, dict) else None

    def release(self) -> None:
        if not self._file.closed:
            self._file.seek(0)
            self._file.truncate()  # an empty lock file is one nobody held last
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def claim_output_dir(output_dir: str, overwrite: bool, resumable: bool) -> tuple[OutputDirLock, list[str]]:
    """Create and lock `output_dir` for this run, on rank 0, before anything else is written.

    resumable: whether it holds a checkpoint this run resumes from. Without one, an earlier run's
    metrics or export are refused unless `overwrite`; with `overwrite`, every artefact of the
    earlier run is deleted. Returns the lock and the notes to print (a stale lock taken over,
    what was deleted).
    """
    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"cannot create the output directory {output_dir!r}: {error.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputDirError(f"the output directory {output_dir!r} is not writable")
    lock = OutputDirLock(directory)
    notes = []
    if lock.previous:
        notes.append(f"took over {lock.path}, left by a run that is gone ({_describe(lock.previous)})")
    try:
        present = [name for name in RUN_ARTEFACTS if (directory / name).exists()]
        if overwrite:
            for name in present:
                path = directory / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if present:
                notes.append(f"--train.overwrite: deleted the earlier run's {', '.join(present)} in {output_dir}")
        elif present and not resumable:
            raise OutputDirError(
                f"{output_dir} holds an earlier run ({', '.join(present)}) but no checkpoint to resume from; "
                f"choose another --output_dir, or pass --train.overwrite true to delete it and start afresh"
            )
    except BaseException:
        lock.release()
        raise
    return lock, notes
