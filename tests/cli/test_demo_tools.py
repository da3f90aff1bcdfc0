"""`moechat demo` runs dvc, and the stages' `python`, from the interpreter it was started with, so it
works without the venv's bin folder on PATH (a venv used without `activate`)."""

from __future__ import annotations

import os
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


def test_demo_without_an_extra_says_so_in_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    """Without lm-eval (the `eval` extra) the demo used to fail at evaluate, two minutes in, with a traceback."""
    import importlib.util

    from moechat.cli import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert demo.main(["--workdir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "moechat demo: error: the demo runs every stage and needs the `eval` extra for the tiny preset's "
        "eval.lm_eval_tasks (a local lm-eval task): pip install -e \".[eval]\" (or the README's install line), "
        "then run it again"]
    assert not (tmp_path / "demo").exists()


def test_a_failing_stage_ends_the_demo_with_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    """`dvc repro` failing (here a `dvc` that exits 1) prints the log's tail and one `moechat demo: error:` line."""
    from moechat.cli import demo

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "dvc").write_text("#!/bin/sh\necho 'evaluate: error: something the stage explains'\nexit 1\n")
    (fake_bin / "dvc").chmod(0o755)
    monkeypatch.setattr(demo, "make_demo_repo", lambda workdir, root, preset: workdir.mkdir(parents=True) or workdir)
    monkeypatch.setattr(demo, "demo_env", lambda workdir: dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}"))
    assert demo.main(["--workdir", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"moechat demo: error: `dvc repro` failed with exit code 1; full output in "
                                    f"{tmp_path / 'demo' / 'demo.log'}")
