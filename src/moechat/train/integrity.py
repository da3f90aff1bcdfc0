"""What makes a checkpoint trustworthy: its files' content hashes, and only finite numbers in it.

A flipped bit in a tensor's data or an edited number in state.json still loads; only a hash recorded when
the checkpoint was written can tell. `write_manifest` records the sha256 of every file of a checkpoint
folder in `manifest.json`, written last into the unpublished folder; `manifest_problem` checks them
again before a resume reads anything. `first_nonfinite` finds a NaN/inf in a (nested) state so that a
checkpoint is never written from, nor resumed into, non-finite weights or optimizer state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

MANIFEST = "manifest.json"
CHUNK = 1 << 24  # 16 MiB reads: sha256 runs at disk / page-cache speed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative POSIX paths, sorted), the manifest itself excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the sha256 of every file under `folder` in `folder/manifest.json` (call it last)."""
    folder = Path(folder)
    hashes = {name: sha256_file(folder / name) for name in folder_files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"sha256": hashes}, indent=1))


def manifest_problem(folder: Path, wanted: Callable[[str], bool] = lambda name: True) -> Optional[str]:
    """None when every file of the manifest that `wanted` selects is present with its recorded hash; else
    what is wrong, naming the file. A rank checks the files it reads (its own RNG and optimizer shard), so a
    file damaged for one rank only is found by that rank (and train's agreement check refuses the mix)."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["sha256"]
        names = [name for name in recorded if wanted(name)]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        return f"{folder / MANIFEST} cannot be read ({type(err).__name__}: {err})"
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (listed in {MANIFEST})"
        if sha256_file(path) != recorded[name]:
            return f"{path} does not match the sha256 recorded in {MANIFEST} (the file changed after it was written)"
    return None


def named_tensors(tree: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a nested dict/list/tuple state (an optimizer state dict)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from named_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def first_nonfinite(tree: Any) -> Optional[str]:
    """The path of the first floating tensor in `tree` holding a NaN or inf, or None when all are finite.
    Integer tensors (bitsandbytes' 8-bit state, step counters) cannot be non-finite and are passed over."""
    for name, tensor in named_tensors(tree):
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in `tree`: about what a checkpoint of it takes on disk."""
    return sum(t.numel() * t.element_size() for _, t in named_tensors(tree))
