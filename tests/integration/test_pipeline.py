"""The whole DAG end to end with the tiny preset, exactly as `moechat demo` and a user run it.

The session's `moechat demo` run (tests/integration/conftest.py), copied for this module: `dvc repro` built
everything, a second `dvc repro` does nothing, `dvc exp run -S model.num_experts=8` reruns init onwards only
and an evaluation setting reruns evaluate only, a `dvc repro` killed with SIGKILL after the first checkpoint
resumes bit-exactly (the preset trains with the reference's 8-bit AdamW), after two experiments `dvc metrics
diff` holds no run facts and the README's `dvc exp show` line fits 160 columns, and `dvc plots show` writes
the HTML. (Top-1 routing, the README's second experiment, is quantized in tests/release/test_quantize.py.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moechat.cli.demo import demo_env

pytestmark = pytest.mark.slow  # the whole DAG in a scratch repo: minutes

STAGES = ("download", "prepare", "init", "train", "evaluate", "export", "quantize")


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    env = {**demo_env(repo), **(env or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, demo_repo) -> Path:
    return shutil.copytree(demo_repo, tmp_path_factory.mktemp("pipeline") / "repo", symlinks=True)


def test_the_demo_ran_every_stage_through_dvc_repro(repo):
    log = (repo / "demo.log").read_text()
    assert ran(log) == set(STAGES), log[-3000:]
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout  # the demo committed its results


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


def test_killed_repro_resumes_bit_exactly_with_the_8bit_optimizer(repo):
    """`dvc repro` killed (the whole process group, as Ctrl-C or an OOM killer would) after the train stage's
    first checkpoint; the next `dvc repro` resumes and logs the same curves as the uninterrupted first run."""
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    reference = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["train"]
    assert train["optimizer"] == "adamw_8bit", train  # the reference's optimizer and checkpointing choice
    assert train["gradient_checkpointing"] == reference["gradient_checkpointing"], train
    curves = repo / "metrics/train/plots"  # DVCLive's metrics/ and the per-layer expert_shares/
    expected = {p.relative_to(curves).as_posix(): p.read_text() for p in sorted(curves.rglob("*.tsv"))
                if "tokens_per_s" not in p.name}  # timing is the one curve that is not deterministic
    assert {"metrics/train/loss.tsv", "metrics/val/lm_loss.tsv", "expert_shares/layer1.tsv"} <= set(expected)
    shutil.rmtree(repo / "models/checkpoints")  # DVC never deletes it (no out): without this the rerun resumes at the end

    env = demo_env(repo)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # train's inputs did not change, so DVC would not rerun it: force it (DVC then removes its outs first)
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "train"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list((repo / "models/checkpoints").glob("*/step_00000010/state.json")):
        assert proc.poll() is None, f"dvc repro ended before the first checkpoint:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint within 600 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((repo / "models/checkpoints").glob(f"*/step_{30:08d}")), "train finished before the kill"

    again = dvc(repo, "repro")
    assert "train" in ran(again), again
    facts = json.loads((repo / "metrics/run/train.json").read_text())
    assert facts["resumed_from_step"] in (10, 20) and facts["optimizer"] == "adamw_8bit", facts
    got = {p.relative_to(curves).as_posix(): p.read_text() for p in sorted(curves.rglob("*.tsv"))
           if "tokens_per_s" not in p.name}
    assert got == expected  # every step's losses, lr, grad norms and expert shares, bit for bit


def readme_command(prefix: str) -> list[str]:
    """The README's own command line that starts with `prefix`, so the test runs what the README shows."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith(prefix))
    return shlex.split(line, comments=True)[1:]  # without the leading `dvc`


RUN_FACT_WORDS = ("seconds", "fingerprint", "sha256", "revision", "device", "resumed")


def test_two_experiments_rerun_only_what_changed_and_compare_readably(repo):
    dvc(repo, "commit", "-f")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=demo_env(repo), check=True, capture_output=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "baseline"], cwd=repo, env=demo_env(repo),
                   check=True, capture_output=True)

    exp = dvc(repo, "exp", "run", "-n", "e8", "-S", "model.num_experts=8")
    assert ran(exp) == {"init", "train", "evaluate", "export", "quantize"}, exp
    facts = json.loads((repo / "metrics/run/train.json").read_text())
    assert len(facts["fingerprint"]) == 12 and facts["train_seconds"] > 0  # run facts still recorded
    short = dvc(repo, "exp", "run", "-n", "short", "-S", "eval.max_new_tokens=8")  # on top of e8's results
    assert ran(short) == {"evaluate"}, short

    diff = dvc(repo, "metrics", "diff", "--all")
    for key in ("perplexity", "accuracy", "val_lm_loss", "router.mean_cv", "perplexity_ratio", "params.total"):
        assert key in diff, diff
    assert not [word for word in RUN_FACT_WORDS if word in diff], diff
    assert "parameters." not in diff  # parameter counts once, in metrics/model.json

    table = dvc(repo, *readme_command("dvc exp show"), env={"COLUMNS": "160"})
    header = next(line for line in table.splitlines() if "Experiment" in line)
    for column in ("model.num_experts", "val_lm_loss", "loss", "perplexity", "router.mean_cv"):
        assert column in header, table
    assert max(map(len, table.splitlines())) <= 160 and "…" not in table, table
    assert table.count("[e8]") == 1 and table.count("[short]") == 1, table


def test_plots_show_writes_html(repo):
    dvc(repo, "plots", "show")
    index = repo / "dvc_plots" / "index.html"
    assert index.exists()
    assert "loss" in index.read_text()
