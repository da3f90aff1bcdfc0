"""The whole DAG end to end with the tiny preset, exactly as `moechat demo` and a user run it.

One scratch git + DVC repo per module: `dvc repro` builds everything, a second `dvc repro` does nothing,
`dvc exp run -S model.num_experts=...` reruns init onwards only, `dvc metrics diff` lists the eval and
quantize metrics side by side, and `dvc plots show` writes the HTML.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.demo import demo_env, make_demo_repo

pytestmark = pytest.mark.slow  # the whole DAG in a scratch repo: minutes

STAGES = ("download", "prepare", "init", "train", "evaluate", "export", "quantize")


def dvc(repo: Path, *args: str) -> str:
    env = demo_env(repo)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_demo_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    first = dvc(repo, "repro")
    assert ran(first) == set(STAGES), first
    return repo


def test_repro_builds_every_artifact(repo):
    for path in ("data/raw", "data/prepared/train", "data/tokenizer/tokenizer_config.json",
                 "models/init/config.json", "models/final/model.safetensors", "models/export/config.json",
                 "models/quantized/config.json"):
        assert (repo / path).exists(), path
    curve = (repo / "metrics/train/plots/metrics/train/loss.tsv").read_text().split()[3::2]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    quantize = json.loads((repo / "metrics/quantize.json").read_text())
    assert float(curve[-1]) < 0.75 * float(curve[0]), curve  # the tiny model learns the fixture
    assert evaluation["perplexity"] > 1 and 0.5 < quantize["perplexity_ratio"] < 2, (evaluation, quantize)


def test_second_repro_does_nothing(repo):
    again = dvc(repo, "repro")
    assert ran(again) == set(), again
    assert "up to date" in again


def test_experiment_reruns_init_onwards_and_metrics_diff_compares(repo):
    dvc(repo, "commit", "-f")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=demo_env(repo), check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, env=demo_env(repo), check=True, capture_output=True)

    exp = dvc(repo, "exp", "run", "-S", "model.num_experts=2")
    assert ran(exp) == {"init", "train", "evaluate", "export", "quantize"}, exp

    diff = dvc(repo, "metrics", "diff", "--all")
    for key in ("perplexity", "accuracy", "perplexity_ratio", "weight_bytes_quantized"):
        assert key in diff, diff
    assert "metrics/eval.json" in diff and "metrics/quantize.json" in diff


def test_plots_show_writes_html(repo):
    dvc(repo, "plots", "show")
    index = repo / "dvc_plots" / "index.html"
    assert index.exists()
    assert "loss" in index.read_text()
