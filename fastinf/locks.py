"""One writer per artifact: a lock file, held for a run, that names the process holding it.

A second `fastinf fit` or `fastinf index` into the same folder fails at once with the PID of
the first, instead of both computing for minutes and the last one silently winning. A lock
left by a process that no longer exists (killed, machine rebooted) is taken over, with a
message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "LockedError", "writer_lock"]

LOCK_NAME = ".fastinf.lock"


class LockedError(RuntimeError):
    """Another live process is writing the same artifact."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def writer_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `directory`/.fastinf.lock while the block runs (the folder is created).

    Raises:
        LockedError: a live process holds the lock; its PID is named.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _holder(path)
            if pid is not None and _alive(pid):
                raise LockedError(
                    f"{directory} is being written by process {pid} (another {what}); wait "
                    f"for it to finish or stop it. Its lock is {path}."
                ) from None
            print(
                f"fastinf: taking over the stale lock {path} (process {pid} no longer runs).",
                file=sys.stderr,
            )
            path.unlink(missing_ok=True)
    try:
        os.write(handle, f"{os.getpid()}\n".encode())
        os.close(handle)
        yield path
    finally:
        if _holder(path) == os.getpid():
            path.unlink(missing_ok=True)
