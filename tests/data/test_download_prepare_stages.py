"""End to end: `dvc repro download prepare` in a temporary git + DVC repo with the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moechat.config.params import load_params
from moechat.cli.demo import demo_env, make_demo_repo

pytestmark = pytest.mark.slow  # dvc repro of download + prepare, three times



def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture()
def repo(tmp_path) -> tuple[Path, dict]:
    """The same scratch repo `moechat demo` builds: the project, params.yaml merged with the tiny preset."""
    path = make_demo_repo(tmp_path / "repo")
    assert load_params(path / "params.yaml").data.source == "tests/fixtures/oasst1_fixture.jsonl"
    env = {**demo_env(path), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return path, env


def test_repro_download_prepare_then_nothing_then_only_prepare(repo):
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["repro", "download", "prepare"], path, env)
    download = json.loads((path / "metrics" / "download.json").read_text())
    prepare = json.loads((path / "metrics" / "prepare.json").read_text())
    facts = json.loads((path / "metrics" / "run" / "download.json").read_text())  # the hash is a run fact
    assert download["rows"] > 0 and len(facts["sha256"]) == 64
    assert facts["files"] == ["tests/fixtures/oasst1_fixture.jsonl"] and facts["skipped"] == []
    assert prepare["messages"] == download["rows"]
    assert prepare["train"]["blocks"] > 0 and prepare["val"]["blocks"] > 0
    assert (path / "data" / "tokenizer" / "tokenizer_config.json").exists()
    for split in ("train", "val"):
        assert (path / "data" / "prepared" / split / "dataset_info.json").exists()
        assert (path / "data" / "prepared" / f"conversations_{split}.jsonl").stat().st_size > 0

    out = _run(dvc + ["repro", "download", "prepare"], path, env)
    assert "didn't change" in out and "Running stage" not in out, out

    params = yaml.safe_load((path / "params.yaml").read_text())
    was = params["data"]["thread_policy"]  # the reference's `all`: every path; `best`: one thread per tree
    params["data"]["thread_policy"] = "best" if was == "all" else "all"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro", "download", "prepare"], path, env)
    assert "Running stage 'prepare'" in out and "Running stage 'download'" not in out, out
    threads = json.loads((path / "metrics" / "prepare.json").read_text())["threads"]
    assert (threads < prepare["threads"]) if was == "all" else (threads > prepare["threads"])
