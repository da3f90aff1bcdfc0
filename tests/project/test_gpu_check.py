"""`bash bench/gpu.sh --dry`: the GPU check's code runs end to end on CPU, says what it skipped, writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess through the entry point users run
def test_gpu_check_dry_run_on_cpu():
    watched = [ROOT / "docs" / "performance.md", ROOT / "metrics" / "bench_gpu.json"]
    before = [p.read_bytes() if p.exists() else None for p in watched]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "dry run on CPU" in out and "on **cpu (dry run)**" in out and "attention `auto` -> `sdpa`" in out
    assert "| sdpa |" in out and "| dense_ffn |" in out and "| capacity_bmm |" in out
    assert "Skipped: flex_attention: params.yaml: train.attn_implementation=flex_attention cannot train on cpu" in out
    assert "Skipped: max_memory_allocated / max_memory_reserved, host syncs per step (CUDA only)" in out
    assert [p.read_bytes() if p.exists() else None for p in watched] == before  # nothing written in the repo
