"""Build something expensive once per test session, even when pytest-xdist runs the session on several workers.

Each xdist worker has its own session fixtures, so a session fixture alone would build the whole-DAG demo once
per worker. `built_once` keeps the result in the folder all workers share (the parent of each worker's
basetemp) and builds it under an exclusive `flock`: the first worker builds, the others wait for it and reuse
the result, or its failure, which they report instead of building again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary folder that every worker sees (the basetemp itself without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`<shared root>/<name>`, made by `build(folder)` in the first worker that asks; read-only for callers.

    The build writes into a folder of its own, renamed to `<name>` when it succeeds: a worker killed mid-build
    (its lock released, its children perhaps still writing) leaves only that folder behind, and the next worker
    starts afresh in another."""
    root = shared_root(tmp_path_factory)
    folder, failed = root / name, root / f"{name}.failed"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this worker dies
        if not folder.exists() and not failed.exists():
            partial = root / f"{name}.building-{os.getpid()}"
            try:
                build(partial)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
            partial.rename(folder)
    if failed.exists():
        pytest.fail(f"building {name} failed in another worker:\n{failed.read_text()[-6000:]}")
    return folder
