"""lm-evaluation-harness on the tiny model: a task defined from a local file, offline, scored like an
independent log-likelihood computation, written into metrics/eval.json and shown by `dvc metrics diff`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moechat.errors import ConfigError
from moechat.config.params import EvalConfig
from moechat.eval.harness import run_lm_eval, task_manager
from tests.support.tiny import save_model, tiny_model, tiny_params, tiny_tokenizer, write_prepared

pytest.importorskip("lm_eval")  # the `eval` extra: pip install 'moechat[eval]'

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = "tests/fixtures/lm_eval_tasks"
TASK_FILE = ROOT / TASK_DIR / "moechat_tiny_mc.jsonl"
LOCAL = EvalConfig(lm_eval_tasks=("moechat_tiny_mc",), lm_eval_limit=None, lm_eval_include_path=TASK_DIR)


def summed_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens split off the tokenized whole."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole)))


def test_local_task_scores_match_an_independent_loglikelihood_count(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the project root
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    result = run_lm_eval(model, tok, LOCAL, seed=0)
    rows = [json.loads(line) for line in TASK_FILE.read_text().splitlines()]
    correct = 0
    for row in rows:
        scores = [summed_logprob(model, tok, f"Question: {row['question']}\nAnswer:", f" {c}") for c in row["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert result["examples"] == {"moechat_tiny_mc": len(rows)}
    assert result["tasks"]["moechat_tiny_mc"]["acc"] == pytest.approx(correct / len(rows))
    assert set(result["tasks"]["moechat_tiny_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


@pytest.mark.slow  # a subprocess through the entry point users run
def test_unknown_task_and_missing_folder_are_named_before_any_work(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks names 'moechat_no_such_task'.*tests/fixtures"):
        task_manager(EvalConfig(lm_eval_tasks=("moechat_no_such_task",), lm_eval_include_path=TASK_DIR))
    with pytest.raises(ConfigError, match=r"eval.lm_eval_include_path='no/such/dir' is not a folder"):
        task_manager(EvalConfig(lm_eval_tasks=("moechat_tiny_mc",), lm_eval_include_path="no/such/dir"))
    assert task_manager(EvalConfig(lm_eval_tasks=())) is None


@pytest.mark.slow  # a subprocess through the entry point users run
def test_stage_writes_lm_eval_scores_that_dvc_metrics_diff_shows(tmp_path):
    tok = tiny_tokenizer()
    model_dir = save_model(tiny_model(tok, seed=1), tok, tmp_path / "final")
    prepared = write_prepared(tok, tmp_path / "prepared")
    params = tiny_params(tmp_path / "params.yaml", eval={"max_new_tokens": 4, "prompts": ["Hi?"]})  # tiny: local task
    repo = tmp_path / "repo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))  # this venv's dvc
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "--model", str(model_dir),
                           "--data", str(prepared), "--metrics", str(repo / "metrics" / "eval.json"),
                           "--samples", str(tmp_path / "samples.json"), "--plots", str(tmp_path / "plots"),
                           "--params", str(params), "--device", "cpu"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moechat_tiny_mc acc" in proc.stdout
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    acc = metrics["lm_eval"]["tasks"]["moechat_tiny_mc"]["acc"]
    facts = json.loads((repo / "metrics" / "run" / "eval.json").read_text())  # counts are run facts
    assert 0.0 <= acc <= 1.0 and facts["lm_eval"]["examples"] == {"moechat_tiny_mc": 16}

    # an experiment that scored differently: `dvc metrics diff` lists the task's accuracy by its key
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True, env=env).stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/eval.json\n")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    metrics["lm_eval"]["tasks"]["moechat_tiny_mc"]["acc"] = acc + 0.125
    (repo / "metrics" / "eval.json").write_text(json.dumps(metrics))
    diff = json.loads(run("dvc", "metrics", "diff", "--json"))
    change = diff["metrics/eval.json"]["lm_eval.tasks.moechat_tiny_mc.acc"]
    assert change["old"] == pytest.approx(acc) and change["new"] == pytest.approx(acc + 0.125)
