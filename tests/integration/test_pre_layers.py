"""Folders written by moechat before the package was split into floors keep working: an exported folder loads
and computes the same logits and greedy tokens, and a training checkpoint resumes to the same final weights.

tests/fixtures/pre_layers/ was written by the flat-layout code (see the `made_by` fields): `dvc repro` of the
tiny preset shrunk to 4 steps (params.yaml beside it), checkpoints at steps 2 and 4; step 2 is kept."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.support.training import stage_env

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/pre_layers"


def test_an_export_from_before_the_move_loads_and_generates_the_same():
    from moechat.model.folder import load_model, load_tokenizer

    expected = json.loads((FIXTURE / "export_greedy.json").read_text())
    model = load_model(FIXTURE / "export", torch.device("cpu"), torch.float32)
    tok = load_tokenizer(FIXTURE / "export")
    for sample in expected["samples"]:
        ids = tok.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        assert ids == sample["prompt_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            out = model.generate(torch.tensor([ids]), max_new_tokens=len(sample["greedy_ids"]), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(logits, torch.tensor(sample["last_logits"]), atol=2e-5, rtol=0)
        assert out[0, len(ids):].tolist() == sample["greedy_ids"]


def weights_sha256(path: Path) -> str:
    from safetensors.torch import load_file

    tensors, h = load_file(path), hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow  # runs the train stage script
def test_a_checkpoint_from_before_the_move_resumes_to_the_same_final_weights(tmp_path):
    work = tmp_path / "run"
    shutil.copytree(FIXTURE / "resume", work)
    expected = json.loads((work / "expected.json").read_text())
    # the keys train gained since, as an upgraded checkout's params.yaml has them (their defaults)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"].update(attn_implementation="auto", max_consecutive_skips=20)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/train.py"), "--params", "params.yaml", "--data", "prepared",
         "--init", "init", "--checkpoints", "checkpoints", "--out", "final", "--live", "live",
         "--metrics", "train.json", "--run-facts", "run/train.json"],
        # the recording's torch thread count: float sums are split by thread, so the final bits depend on it
        cwd=work, env={**stage_env(), "OMP_NUM_THREADS": str(expected["torch_threads"])}, capture_output=True,
        text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step_2 = next((work / "checkpoints").glob("*/step_00000002")).relative_to(work)
    assert f"from {step_2} (step 2/4)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert weights_sha256(work / "final/model.safetensors") == expected["final_weights_sha256"]
    assert json.loads((work / "train.json").read_text())["lm_loss"] == expected["lm_loss"]
    assert json.loads((work / "run/train.json").read_text())["resumed_from_step"] == 2
