"""`moechat demo` runs dvc, and the stages' `python`, from the interpreter it was started with, so it
works without the venv's bin folder on PATH (a venv used without `activate`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from moechat.cli.demo import demo_env, make_demo_repo


def test_demo_repo_is_made_without_the_venv_on_path(monkeypatch, tmp_path):
    git = shutil.which("git")
    assert git is not None
    monkeypatch.setenv("PATH", str(Path(git).parent))  # git only: no dvc, no venv python
    workdir = make_demo_repo(tmp_path / "demo")  # git init, dvc init, git commit
    assert (workdir / ".dvc" / "config").exists()
    env = demo_env(workdir)
    assert Path(shutil.which("dvc", path=env["PATH"])).parent == Path(sys.executable).parent
    assert Path(shutil.which("python", path=env["PATH"])).parent == Path(sys.executable).parent
