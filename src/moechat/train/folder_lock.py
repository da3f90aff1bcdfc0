"""One trainer per checkpoint folder: an exclusive `flock` on `<folder>/.lock`, naming the holder's pid.

Two trainers writing the same checkpoints (a `dvc repro` started while an orphaned trainer of a killed one
still runs) corrupt each other's folders. The kernel drops a flock when its holder exits, kill -9 included,
so a stale lock file never blocks anyone; the pid written into it only names the holder in the message.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moechat.errors import MoechatError

LOCK_NAME = ".lock"


class FolderLockedError(MoechatError, RuntimeError):
    """Another process holds the folder's lock; the message names its pid."""


@contextmanager
def exclusive_folder(folder: Path, what: str = "trainer") -> Iterator[None]:
    """Hold the lock of `folder` (created if needed) for the block, or raise FolderLockedError at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderLockedError(f"{folder} is in use by another {what} (pid {holder}, lock {path}); wait for it "
                                    f"to finish or stop it (kill {holder}), then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
