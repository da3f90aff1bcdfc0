"""Fixtures every floor's tests share. The expensive ones (a trained-size tiny model exported and quantized)
are built once per session; a test that changes a folder copies it first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Under pytest-xdist, each worker and every process it starts gets its share of the cores as torch's thread count
# (OMP_NUM_THREADS, read when torch is imported: before tests.support.training below). Two workers with torch's
# default of a thread per core would run twice as many threads as cores, each spin-waiting on the others: on 2
# cores the quick loop took 54 s with the default and 44 s with one thread per worker. (`-n 0` keeps torch's
# default, so the in-process tests then run on every core.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))

from tests.support.training import build_workspace  # noqa: E402

# The modules that take minutes, started first in this order, so that pytest-xdist's two workers (pyproject.toml)
# finish close together (about a minute apart here) instead of one worker starting a long module near the end.
# test_pipeline builds the session's demo run (tests/integration/conftest.py); test_dvc_remote, which reuses it,
# starts after the others.
FIRST = ("tests/integration/test_pipeline.py", "tests/serving/test_vllm.py", "tests/train/test_train.py",
         "tests/integration/test_dvc_remote.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the FIRST modules to the front (a stable sort: every other test keeps its place)."""
    rank = {module: i for i, module in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(FIRST)))


HOSTILE_CODE = "\nopen({marker!r} + '.' + __name__.rsplit('.', 1)[-1], 'w').close()\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A training workspace of the module's own: models/init (a tiny MoE + tokenizer file) and data/prepared
    (packed train/val of learnable counting rows); runs go into subfolders named by the test."""
    return build_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> dict:
    """The tiny model exported as the export stage writes it, prepared data for it, and the quantize stage's
    4-bit folder of it: built once per session (quantizing costs tens of seconds on CPU).

    The quantize stage runs on a copy of the export with a planted `modeling_moechat.py` that would write a
    marker file if imported, so `quantize_ran_folder_code` tells whether the stage's loaders ran folder code
    (the quantized folder is the same either way: the stage never copies code). Read-only for the tests."""
    from moechat.config.params import QuantizeConfig
    from moechat.data.chat_format import load_packed
    from moechat.release.quantize import quantize_stage
    from tests.support.tiny import export_tiny, write_prepared

    tmp = tmp_path_factory.mktemp("tiny_release")
    model, tok = export_tiny(tmp)
    prepared = write_prepared(tok, tmp / "prepared")
    planted, marker = tmp / "export_with_code", tmp / "ran"
    shutil.copytree(tmp / "export", planted)
    for name in ("modeling_moechat.py", "configuration_moechat.py"):
        (planted / name).write_text((planted / name).read_text() + HOSTILE_CODE.format(marker=str(marker)))
    quantize_stage(planted, prepared / "conversations_train.jsonl", load_packed(prepared, "val"),
                   QuantizeConfig(group_size=32, calib_samples=8, calib_max_tokens=64, min_expert_tokens=4),
                   seed=0, out_dir=tmp / "quantized")
    return {"tmp": tmp, "model": model, "tok": tok, "export": tmp / "export", "prepared": prepared,
            "quantized": tmp / "quantized",
            "quantize_ran_folder_code": sorted(p.name for p in tmp.glob(marker.name + ".*"))}
