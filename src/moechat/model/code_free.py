"""A view of a model folder that no loader can run code from: its data files, and config.json without
`auto_map`.

GPTQModel imports the module named by `auto_map` even under `trust_remote_code=False` (its remote-code
compatibility shims) and copies a folder's `*.py` files into the transformers module cache, so the quantized
branch of the loader and the quantize stage hand it this view instead of the folder."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def code_free_view(folder: Path) -> Iterator[Path]:
    """A temporary folder with links to `folder`'s files except its Python files and subfolders (such as
    `custom_generate/`), and its config.json without `auto_map`: a loader handed this view cannot find,
    import or cache the folder's code."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="moechat-model-") as scratch:
        view = Path(scratch) / folder.name
        view.mkdir()
        for item in folder.iterdir():
            if item.suffix == ".py" or item.is_dir() or item.name == "config.json":
                continue
            (view / item.name).symlink_to(item)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config.pop("auto_map", None)
        (view / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        yield view


