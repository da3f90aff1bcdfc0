"""End to end: `dvc repro download prepare` in a temporary git + DVC repo with the tiny preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moechat.config import load_params

ROOT = Path(__file__).resolve().parent.parent
COPY = ["dvc.yaml", ".dvcignore", "stages/download.py", "stages/prepare.py", "src/moechat/__init__.py",
        "src/moechat/config.py", "src/moechat/data", "tests/fixtures/oasst1_fixture.jsonl"]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture()
def repo(tmp_path) -> tuple[Path, dict]:
    for rel in COPY:
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    tiny = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    params = load_params(ROOT / "params.yaml", overrides=tiny)  # validates the merged file
    merged = yaml.safe_load((ROOT / "params.yaml").read_text())
    from moechat.config import merge
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(merged, tiny), sort_keys=False))
    assert params.data.source == "tests/fixtures/oasst1_fixture.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(tmp_path / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "DVC_NO_ANALYTICS": "1"}
    _run(["git", "init", "-q"], tmp_path, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path, env)
    _run(["git", "add", "-A"], tmp_path, env)
    _run(["git", "commit", "-q", "-m", "init"], tmp_path, env)
    return tmp_path, env


def test_repro_download_prepare_then_nothing_then_only_prepare(repo):
    path, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["repro", "download", "prepare"], path, env)
    download = json.loads((path / "metrics" / "download.json").read_text())
    prepare = json.loads((path / "metrics" / "prepare.json").read_text())
    assert download["rows"] > 0 and len(download["sha256"]) == 64
    assert prepare["messages"] == download["rows"]
    assert prepare["train"]["blocks"] > 0 and prepare["val"]["blocks"] > 0
    assert (path / "data" / "tokenizer" / "tokenizer_config.json").exists()
    for split in ("train", "val"):
        assert (path / "data" / "prepared" / split / "dataset_info.json").exists()
        assert (path / "data" / "prepared" / f"conversations_{split}.jsonl").stat().st_size > 0

    out = _run(dvc + ["repro", "download", "prepare"], path, env)
    assert "didn't change" in out and "Running stage" not in out, out

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["data"]["thread_policy"] = "all"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro", "download", "prepare"], path, env)
    assert "Running stage 'prepare'" in out and "Running stage 'download'" not in out, out
    assert json.loads((path / "metrics" / "prepare.json").read_text())["threads"] > prepare["threads"]
