"""The whole-DAG run the integration tests share: `moechat demo` once per session (tiny preset, a git + DVC repo
with the results committed), reused by every worker. Read-only: a module copies it before changing anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moechat.cli.demo import demo_env
from tests.support.once import built_once

DEMO_SECONDS = 1800  # about 3 min on 2 cores with every cache cold


def run_demo(folder: Path) -> None:
    folder.mkdir(parents=True)
    moechat = Path(sys.executable).parent / "moechat"
    # a timeout, so that a hung demo fails here (and in the workers waiting for it) instead of blocking them all
    demo = subprocess.run([str(moechat), "demo", "--workdir", str(folder / "repo")], env=demo_env(folder / "repo"),
                          capture_output=True, text=True, timeout=DEMO_SECONDS, check=False)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    """The repo `moechat demo` made and committed after one `dvc repro` (its full output in demo.log). A module
    that changes it works on `shutil.copytree(demo_repo, ..., symlinks=True)`."""
    return built_once(tmp_path_factory, "demo", run_demo) / "repo"
