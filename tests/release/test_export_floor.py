"""The exported folder's own code loads and greedy-generates the same tokens under the oldest transformers
it supports (FLOOR, the floor README.md states) as under the pinned one.

The floor runs in its own environment (README.md, "The transformers floor"): its python comes from
$MOECHAT_FLOOR_PYTHON, by default .venv-floor/bin/python at the repository root. In CI a missing floor
environment fails the test; elsewhere it skips, saying how to create it.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pytest
import transformers

from tests.support.tiny import export_tiny

ROOT = Path(__file__).resolve().parents[2]
FLOOR = "5.15.0"
SCRIPT = ROOT / "tests" / "support" / "floor_generate.py"


@pytest.fixture(scope="module")
def floor_python() -> Path:
    python = Path(os.environ.get("MOECHAT_FLOOR_PYTHON", ROOT / ".venv-floor" / "bin" / "python"))
    if not python.exists():
        reason = (f"{python} not found: create the floor environment as README.md says (python3 -m venv "
                  f".venv-floor && .venv-floor/bin/pip install ... transformers=={FLOOR} ...), or point "
                  f"MOECHAT_FLOOR_PYTHON at one")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def test_export_generates_the_same_tokens_under_the_transformers_floor(tmp_path, floor_python):
    export_tiny(tmp_path)
    folder = tmp_path / "export"
    # Its own module cache, so the floor process imports the folder's code, never a copy left by another run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": ""}
    run = subprocess.run([str(floor_python), str(SCRIPT), str(folder)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    floor = json.loads(run.stdout.strip().splitlines()[-1])
    script = runpy.run_path(str(SCRIPT))
    pinned = script["greedy_replies"](str(folder))

    assert floor.pop("transformers") == FLOOR, "the floor environment has another transformers than FLOOR"
    assert pinned.pop("transformers") == transformers.__version__
    assert floor == pinned
    replies = pinned["sdpa"]["alone"]
    # The comparison means something: every reply runs to max_new_tokens, and the prompts differ in reply.
    assert all(len(r) == script["MAX_NEW_TOKENS"] for r in replies) and len({tuple(r) for r in replies}) == len(replies)
    assert pinned["sdpa"]["batched"] == replies  # left padding changes nothing
