"""One writer per run folder: an exclusive OS file lock on ``RUN/.lock``.

``fcntl.flock`` locks belong to the open file, so the kernel drops the lock when the
process exits for any reason (kill -9 included): there is no stale lock to clean up.
The holder writes its PID into the file so a second writer can say who holds it.
Within one process the lock is shared (a second Trainer on the same folder, as
tests and sweeps do one after another, is not another writer).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # resolved folder -> [file object, holders in this process]

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer is then the user's responsibility
    fcntl = None


class RunLockError(ConfigError):
    """Another process is writing to the run folder."""


def acquire_run_lock(run_dir: Path) -> str:
    """Lock ``run_dir`` for this process; returns the key to pass to :func:`release_run_lock`."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        _held[key][1] += 1
        return key
    path = Path(key) / LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLockError(f"run folder {run_dir} is in use by process {holder} (lock {path}); wait for it "
                               f"to finish or stop it, or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _held[key] = [fh, 1]
    return key


def release_run_lock(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        entry[0].close()  # closing the file releases the flock
