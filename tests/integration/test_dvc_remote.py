"""Nothing lost between machines: the DVC remote round trip of docs/remote.md, on the tiny preset.

The session's `moechat demo` run (tests/integration/conftest.py), copied, is pushed to a folder remote (DVC) and
a bare git repo (`origin`); a `git clone` elsewhere pulls it. The tests run in file order on that shared state:
the clone is clean and `dvc repro` reruns nothing, the 4-bit model answers, checkpoints never reach the remote,
export and quantize rerun from the same inputs give the same hashes, an experiment travels with `dvc exp push` /
`dvc exp pull`, a pull killed with SIGKILL completes when rerun, and a damaged cache object is reported, not used.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from moechat.cli.demo import demo_env

pytestmark = pytest.mark.slow  # one whole demo DAG, then DVC round trips: minutes

STAGES = ("download", "prepare", "init", "train", "evaluate", "export", "quantize")
EXPERIMENT = "short-samples"  # eval.max_new_tokens only: evaluate reruns, export and quantize do not


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = demo_env(cwd)  # offline, a git identity, this interpreter's dvc / python / moechat first on PATH
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return result


def dvc(cwd: Path, *args: str) -> str:
    result = sh(cwd, "dvc", *args)
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def lock_outs(repo: Path) -> dict[str, str]:
    """{out path: md5} of every out in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_object(repo: Path, digest: str) -> Path:
    """Where DVC 3 keeps a file of this md5 in a cache or a folder remote."""
    return repo / "files" / "md5" / digest[:2] / digest[2:]


@pytest.fixture(scope="module")
def machines(tmp_path_factory, demo_repo) -> dict[str, Path]:
    """The session's `moechat demo` run (copied) on the "training machine", pushed to a folder remote and a bare
    git origin, then cloned and pulled on the "laptop"."""
    tmp = tmp_path_factory.mktemp("remote")
    work, origin, store, clone = tmp / "work", tmp / "origin.git", tmp / "store", tmp / "clone"
    shutil.copytree(demo_repo, work, symlinks=True)
    sh(tmp, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(work, "dvc", "remote", "add", "-d", "store", str(store))
    sh(work, "git", "commit", "-q", "-am", "DVC remote: a local folder")
    sh(work, "git", "remote", "add", "origin", str(origin))
    sh(work, "git", "push", "-q", "origin", "main")
    dvc(work, "push")
    sh(tmp, "git", "clone", "-q", str(origin), str(clone))
    dvc(clone, "pull")
    return {"tmp": tmp, "work": work, "origin": origin, "store": store, "clone": clone}


def test_clone_is_clean_and_repro_reruns_nothing(machines):
    clone, work = machines["clone"], machines["work"]
    assert "Data and pipelines are up to date." in dvc(clone, "status")
    again = dvc(clone, "repro")
    assert ran(again) == set(), again
    assert not sh(clone, "git", "status", "--porcelain").stdout  # nothing rewritten either
    for path in ("models/quantized/model.safetensors", "models/export/model.safetensors", "data/prepared/train"):
        assert (clone / path).exists(), path
    assert md5(clone / "models/quantized/model.safetensors") == md5(work / "models/quantized/model.safetensors")


def test_checkpoints_stay_on_the_machine_that_trained(machines):
    """models/checkpoints is no DVC out: not in the clone, and no checkpoint-only file in the remote."""
    work, clone, store = machines["work"], machines["clone"], machines["store"]
    checkpoint_files = [p for p in (work / "models/checkpoints").rglob("*") if p.is_file()]
    assert any(p.name.startswith("optimizer") for p in checkpoint_files), checkpoint_files
    assert not (clone / "models/checkpoints").exists()
    out_digests = {md5(p) for out in ("models", "data") for p in (work / out).rglob("*")
                   if p.is_file() and "checkpoints" not in p.parts}
    pushed = [p for p in checkpoint_files if cache_object(store, md5(p)).exists() and md5(p) not in out_digests]
    assert not pushed, pushed


def test_the_pulled_4bit_model_answers(machines):
    result = sh(machines["clone"], "moechat", "chat", "models/quantized", "--prompt", "Hello!",
                "--max-new-tokens", "8", "--temperature", "0")
    assert result.stdout.strip(), result.stderr[-2000:]


def test_export_and_quantize_rerun_give_the_same_hashes(machines):
    """Forced reruns of export and quantize in the clone (another folder, same inputs): every out keeps its
    md5 in dvc.lock except the run facts under metrics/run/ (seconds, GPTQModel's log)."""
    clone = machines["clone"]
    before = lock_outs(clone)
    for stage in ("export", "quantize"):
        assert ran(dvc(clone, "repro", "--force", "--single-item", stage)) == {stage}
    after = lock_outs(clone)
    changed = sorted(path for path in before if before[path] != after[path])
    assert all(path.startswith("metrics/run/") for path in changed), changed
    assert before["models/export"] == after["models/export"] and before["models/quantized"] == after["models/quantized"]
    assert "metrics/run/quantize_gptq" in changed  # the timings did move: the check can see a change
    sh(clone, "git", "reset", "-q", "--hard")  # back to the pulled commit's run facts (autostage staged them)
    assert "Data and pipelines are up to date." in dvc(clone, "status")


def test_an_experiment_travels_with_exp_push_and_exp_pull(machines):
    work, clone = machines["work"], machines["clone"]
    out = dvc(work, "exp", "run", "-n", EXPERIMENT, "-S", "eval.max_new_tokens=8")
    assert ran(out) == {"evaluate"}, out
    dvc(work, "exp", "push", "origin", EXPERIMENT)
    dvc(clone, "exp", "pull", "origin", EXPERIMENT)
    table = sh(clone, "dvc", "exp", "show", "--csv").stdout
    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(table))}
    assert rows[EXPERIMENT]["eval.max_new_tokens"] == "8", table
    dvc(clone, "exp", "apply", EXPERIMENT)
    samples = json.loads((clone / "metrics/samples.json").read_text())
    assert samples == json.loads((work / "metrics/samples.json").read_text())
    assert "Data and pipelines are up to date." in dvc(clone, "status")  # its outs came from the remote


def test_a_pull_killed_halfway_completes_when_rerun(machines):
    tmp, work = machines["tmp"], machines["work"]
    laptop = tmp / "laptop"
    sh(tmp, "git", "clone", "-q", str(machines["origin"]), str(laptop))
    cache = laptop / ".dvc" / "cache" / "files"
    pull = subprocess.Popen(["dvc", "pull", "--jobs", "1"], cwd=laptop, env=demo_env(laptop),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while pull.poll() is None and time.monotonic() < deadline:
        if cache.exists() and any(p.is_file() for p in cache.rglob("*")):  # the first object is in
            break
        time.sleep(0.002)
    assert pull.poll() is None, "the pull finished before it could be killed"
    os.killpg(pull.pid, signal.SIGKILL)
    pull.wait()
    assert not (laptop / "models/quantized/model.safetensors").exists()  # killed before the checkout
    dvc(laptop, "pull")
    assert "Data and pipelines are up to date." in dvc(laptop, "status")
    assert md5(laptop / "models/quantized/model.safetensors") == md5(work / "models/quantized/model.safetensors")


def test_a_damaged_cache_object_is_reported_and_pulled_again(machines):
    """A write into a cache object (a crash mid-copy, a stray edit) changes its mtime: `dvc status` rehashes it,
    reports `not in cache`, and `dvc pull` fetches a good copy. A change that keeps size and mtime (bit rot)
    goes unseen: DVC trusts its hash database (docs/remote.md says how to check)."""
    laptop = machines["tmp"] / "laptop"
    digest = md5(laptop / "models/quantized/model.safetensors")
    obj = cache_object(laptop / ".dvc" / "cache", digest)
    obj.chmod(0o644)
    with obj.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    status = dvc(laptop, "status")
    assert "not in cache:" in status and "models/quantized" in status, status
    assert "1 file fetched" in dvc(laptop, "pull")
    assert md5(obj) == digest
    assert "Data and pipelines are up to date." in dvc(laptop, "status")

    stat = obj.stat()
    obj.chmod(0o644)
    with obj.open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x00\x00\x00")
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "Data and pipelines are up to date." in dvc(laptop, "status")  # the documented limit
    assert md5(obj) != digest
