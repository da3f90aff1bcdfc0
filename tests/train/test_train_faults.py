"""Faults injected from outside the training code, through the train stage (or the `train` function it calls):
non-finite gradients are skipped and counted, and stop the run after train.max_consecutive_skips in a row;
nothing non-finite is ever written under the run's folders; damaged checkpoints (flipped bit, edited step,
malformed state.json, a DeepSpeed class without DeepSpeed) fall back with one line; a full disk is one line
and leaves the previous checkpoint; one trainer per checkpoint folder; an orphaned trainer stops."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_post_hook

from moechat.train import checkpoint as ckpt
from moechat.train import integrity
from moechat.config.params import load_params
from moechat.train.folder_lock import FolderLockedError
from moechat.train.loop import train
from moechat.train.step import NonFiniteStateError
from moechat.train.engine import single_process_env
from tests.support.training import PAD, SEQ, build_workspace

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = dict(seq_len=SEQ, micro_batch_size=4, grad_accum=1, epochs=1, max_steps=12, lr=3e-3, min_lr=3e-4,
                  warmup_steps=2, warmup_ratio=None, optimizer="adamw", precision="fp32", gradient_checkpointing=False,
                  eval_every=4, eval_batches=2, save_every=4, keep_checkpoints=3, max_consecutive_skips=20,
                  deepspeed=None, compile=False)

# Runs stages/train.py as `python <this> STEPS[@RANK] stages/train.py ARGS...`, making the token embedding's
# gradient NaN at the optimizer steps STEPS (comma-separated; grad_accum=1, so the n-th training forward is step n
# of a fresh run), on process RANK only when given (as its launcher numbers it). Only torch's global module hook
# is used: the loss stays finite, as after a bf16 overflow in backward.
INJECT_NAN = '''
import os, runpy, sys
import torch

spec, _, rank = sys.argv[1].partition("@")
steps = {int(s) for s in spec.split(",")} if rank in ("", os.environ.get("RANK", "0")) else set()
stage = sys.argv[2]
sys.argv = sys.argv[2:]
calls = {"n": 0, "hooked": set()}


def poison(grad):
    return grad * float("nan") if calls["n"] in steps else grad


def count_forwards(module, args, output):
    if type(module).__name__ == "MoeChatForCausalLM" and module.training:
        calls["n"] += 1
        if id(module) not in calls["hooked"]:
            calls["hooked"].add(id(module))
            module.transformer.wte.weight.register_hook(poison)


torch.nn.modules.module.register_module_forward_hook(count_forwards)
runpy.run_path(stage, run_name="__main__")
'''

# Starts its argv as a child with stderr to the file in argv[1], prints the child's pid, then waits: the
# `dvc repro` a user kills -9.
PARENT = '''
import subprocess, sys
with open(sys.argv[1], "w") as err:
    child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err)
print(child.pid, flush=True)
child.wait()
'''


def make_blocks(n_rows: int, seed: int) -> Dataset:
    """Packed rows counting upward mod PAD from random starts (learnable), a pad tail with labels -100."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for _ in range(n_rows):
        n = SEQ - 4
        start = int(torch.randint(0, PAD, (1,), generator=g))
        doc = [(start + i) % PAD for i in range(n)]
        rows["input_ids"].append(doc + [PAD] * 4)
        rows["labels"].append([-100] + doc[1:] + [-100] * 4)
        rows["position_ids"].append(list(range(SEQ)))
    return Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """models/init (a tiny MoE) and data/prepared (packed train/val), as the init and prepare stages leave them."""
    root = build_workspace(tmp_path_factory.mktemp("faults"), blocks=make_blocks)
    (root / "inject_nan.py").write_text(INJECT_NAN)
    (root / "parent.py").write_text(PARENT)
    return root


def cfg(**overrides):
    return dataclasses.replace(load_params(ROOT / "params.yaml").train, **{**TINY_TRAIN, **overrides})


def run_train(ws: Path, run: str, **overrides) -> dict:
    out = ws / run
    return train(cfg(**overrides), 7, ws / "data/prepared", ws / "models/init", out / "checkpoints", out / "final",
                 out / "live")


def write_params(ws: Path, name: str, **overrides) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({**TINY_TRAIN, **overrides})
    raw["seed"] = 7
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_args(ws: Path, run: str, params: Path) -> list[str]:
    out = ws / run
    return [str(ROOT / "stages/train.py"), "--params", str(params), "--data", str(ws / "data/prepared"),
            "--init", str(ws / "models/init"), "--checkpoints", str(out / "checkpoints"), "--out", str(out / "final"),
            "--live", str(out / "live"), "--metrics", str(out / "train.json")]


def stage_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def nonfinite_tensors(folder: Path) -> list[str]:
    """'file:tensor' for every floating tensor holding NaN/inf in any safetensors file under `folder`."""
    bad = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad.append(f"{path.relative_to(folder)}:{name}")
    return bad


def tsv(live: Path, name: str) -> dict[int, float]:
    lines = (live / "plots/metrics/train" / f"{name}.tsv").read_text().splitlines()[1:]
    return {int(line.split("\t")[0]): float(line.split("\t")[-1]) for line in lines}


def weights(step_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    with safe_open(str(step_dir / name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------------
# Non-finite gradients and state


@pytest.mark.slow  # a subprocess through the entry point users run
def test_nan_gradients_at_an_ordinary_and_at_a_save_step_are_skipped_counted_and_never_saved(ws):
    """NaN gradients (finite loss) at step 3 (ordinary) and step 8 (a save step): both skipped, weights and
    optimizer state as after the step before, the LR schedule held, the run finishes and counts 2 skips."""
    params = write_params(ws, "nan-two", save_every=1, keep_checkpoints=20)
    done = subprocess.run([sys.executable, str(ws / "inject_nan.py"), "3,8", *stage_args(ws, "nan-two", params)],
                          cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert nonfinite_tensors(ws / "nan-two") == []  # checkpoints (weights, optimizer) and the final model
    assert json.loads((ws / "nan-two/train.json").read_text())["skipped_steps"] == 2
    (fp,) = [p for p in (ws / "nan-two/checkpoints").iterdir() if p.is_dir()]
    for skipped in (3, 8):
        before, after = fp / ckpt.step_dir_name(skipped - 1), fp / ckpt.step_dir_name(skipped)
        for name in ("model.safetensors", "optimizer.safetensors"):
            a, b = weights(before, name), weights(after, name)
            assert all(torch.equal(a[k], b[k]) for k in a), f"step {skipped} changed {name}"
        assert not all(torch.equal(a, b) for a, b in zip(weights(after).values(),
                                                         weights(fp / ckpt.step_dir_name(skipped + 1)).values()))
    live = ws / "nan-two/live"
    assert tsv(live, "skipped_steps")[2] == 0 and tsv(live, "skipped_steps")[3] == 1 \
        and tsv(live, "skipped_steps")[12] == 2
    lr = tsv(live, "lr")
    assert lr[4] == lr[3] and lr[9] == lr[8] and lr[3] != lr[2]  # a skipped step does not advance the schedule
    assert sorted(tsv(live, "grad_norm")) == [s for s in range(1, 13) if s not in (3, 8)]


@pytest.mark.slow  # a second stage process
def test_consecutive_nan_gradients_stop_in_one_line_naming_the_last_good_checkpoint(ws):
    params = write_params(ws, "nan-run", max_consecutive_skips=3)
    done = subprocess.run([sys.executable, str(ws / "inject_nan.py"), "5,6,7,8,9,10,11,12",
                           *stage_args(ws, "nan-run", params)],
                          cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=600)
    (good,) = (ws / "nan-run/checkpoints").glob("*/step_00000004")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"train: error: step 7: non-finite gradients in 3 consecutive steps (5-7, train.max_consecutive_skips=3); "
        f"none of them was applied; stopped without saving. Last good checkpoint: {good}. Lower train.lr, or use "
        f"train.precision: bf16/fp32 if this was fp16")
    assert not (ws / "nan-run/final").exists() and nonfinite_tensors(ws / "nan-run") == []
    assert [p.name for p in good.parent.iterdir()] == ["step_00000004"]


def test_non_finite_optimizer_state_is_never_checkpointed(ws):
    """Adam's second moment poisoned after step 6 (a global optimizer hook, outside the training code): the
    save at step 8 refuses, names the last good checkpoint, and nothing non-finite is on disk."""
    def poison(optimizer, args, kwargs):
        poison.steps += 1
        if poison.steps == 6:
            next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))

    poison.steps = 0
    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(NonFiniteStateError) as err:
            run_train(ws, "inf-state")
    finally:
        handle.remove()
    (good,) = (ws / "inf-state/checkpoints").glob("*/step_00000004")
    assert str(err.value).startswith("step 8: the weights or optimizer state are not finite (state.0.exp_avg_sq) "
                                     "although every applied gradient was; stopped without saving. Last good "
                                     f"checkpoint: {good}. ")
    assert nonfinite_tensors(ws / "inf-state") == [] and not (ws / "inf-state/final").exists()


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints fall back to the previous intact one


@pytest.fixture(scope="module")
def reference(ws) -> dict:
    """12 steps, checkpoints at 4, 8 and 12."""
    return run_train(ws, "reference")


def flip_a_bit(path: Path) -> None:
    """One bit of the first tensor's data (past the 8-byte length and the JSON header): still loads."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[data_start + 5] ^= 0x01
    path.write_bytes(bytes(raw))


def edit_state(edit, rehash: bool):
    """Edit state.json; with `rehash`, record the edited file's hash too (a checkpoint written before manifests,
    or a careful hand edit), so that the check under test is the one behind the manifest."""
    def apply(step_dir: Path) -> None:
        path = step_dir / "state.json"
        path.write_text(edit(path.read_text()))
        if rehash:
            integrity.write_manifest(step_dir)
    return apply


def deepspeed_scaler(step_dir: Path) -> None:
    """The optimizer file names DeepSpeed's loss scaler (as a ZeRO checkpoint does), hashes recorded."""
    path = step_dir / "optimizer.safetensors"
    tensors, tree = ckpt.read_safetensors(path, ckpt.TREE_KEY)
    tree["loss_scaler"] = {"__object__": "deepspeed.runtime.fp16.loss_scaler:LossScaler", "state": {"cur_scale": 1}}
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={ckpt.TREE_KEY: json.dumps(tree)})
    integrity.write_manifest(step_dir)


def nan_weight(step_dir: Path) -> None:
    from safetensors.torch import save_file
    w = weights(step_dir)
    w["lm_head.weight"] = w["lm_head.weight"].clone()
    w["lm_head.weight"][0, 0] = float("nan")
    save_file(w, str(step_dir / "model.safetensors"))
    integrity.write_manifest(step_dir)


DAMAGES = {
    "flipped bit in a weight": (lambda d: flip_a_bit(d / "model.safetensors"),
                                "model.safetensors does not match the sha256 recorded in manifest.json"),
    "step edited": (edit_state(lambda s: s.replace('"step": 12', '"step": 10'), rehash=False),
                    "state.json does not match the sha256 recorded in manifest.json"),
    "step edited, hash too": (edit_state(lambda s: s.replace('"step": 12', '"step": 10'), rehash=True),
                              "state.json cannot be read (ValueError: step 10 is not the folder's step)"),
    "step not a number": (edit_state(lambda s: s.replace('"step": 12', '"step": "abc"'), rehash=True),
                          "state.json cannot be read (ValueError: step='abc' is not a count (an int >= 0))"),
    "200,000-deep array": (edit_state(lambda s: "[" * 200_000 + "]" * 200_000, rehash=True),
                           "state.json cannot be read (RecursionError: maximum recursion depth exceeded"),
    "non-finite weight": (nan_weight, "model.safetensors holds non-finite values (first: lm_head.weight)"),
    "DeepSpeed class without DeepSpeed": (deepspeed_scaler, "optimizer.safetensors: checkpoint names "
                                          "deepspeed.runtime.fp16.loss_scaler:LossScaler, but deepspeed.runtime."
                                          "fp16.loss_scaler cannot be imported here"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_with_one_line(ws, reference, damage, monkeypatch, capsys):
    spoil, why = DAMAGES[damage]
    run = f"damaged-{list(DAMAGES).index(damage)}"
    shutil.copytree(ws / "reference/checkpoints", ws / run / "checkpoints")
    newest = ws / run / "checkpoints" / reference["fingerprint"] / "step_00000012"
    spoil(newest)
    for name in ["deepspeed", *(m for m in sys.modules if m.startswith("deepspeed."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing deepspeed fails, as where it is not installed
    capsys.readouterr()
    resumed = run_train(ws, run)
    lines = [line for line in capsys.readouterr().out.splitlines() if "step_00000012 is damaged" in line]
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint step_00000012 is damaged, skipping it: {newest}/")
    assert why in lines[0]
    assert resumed["resumed_from_step"] == 8
    for key in ("loss", "lm_loss", "val_lm_loss"):
        assert resumed[key] == reference[key], key
    ckpt.read_checkpoint(newest)  # step 12 was written again, whole


# ----------------------------------------------------------------------------------------------------
# Disk full, one trainer per folder, orphaned trainer


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(ws, reference):
    one = sum(p.stat().st_size for p in next((ws / "reference/checkpoints").glob("*/step_00000012")).rglob("*")
              if p.is_file())
    mount = ws / "full/checkpoints"
    mount.mkdir(parents=True)
    size = (one * 3 // 2 // 4096 + 1) * 4096  # one checkpoint fits, the second (written before pruning) does not
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {tried.stderr.decode().strip()}")
    try:
        with pytest.raises(ckpt.CheckpointError) as err:
            run_train(ws, "full", keep_checkpoints=1)
        folder = mount / reference["fingerprint"]
        message = str(err.value)
        step_4 = sum(p.stat().st_size for p in (folder / "step_00000004").rglob("*") if p.is_file())
        assert message.startswith(f"no space left on the device of {folder} while writing checkpoint step_00000008: "
                                  f"it needs about {step_4:,} bytes and ")  # the last checkpoint's size
        assert message.endswith(f"removed the unfinished .tmp-step_00000008 (last checkpoint {folder / 'step_00000004'}"
                                f" is intact). Free space there, or lower train.keep_checkpoints (a new checkpoint "
                                f"is written before old ones are pruned), and rerun `dvc repro` to resume")
        assert sorted(p.name for p in folder.iterdir()) == ["step_00000004"]
        ckpt.read_checkpoint(folder / "step_00000004")
        assert not (ws / "full/final").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_second_trainer_on_the_same_checkpoint_folder_is_refused_naming_the_holder(ws):
    folder = ws / "locked/checkpoints"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError) as err:
            run_train(ws, "locked")
        assert str(err.value) == (f"{folder} is in use by another trainer (pid {holder.pid}, lock {folder / '.lock'}); "
                                  f"wait for it to finish or stop it (kill {holder.pid}), then rerun")
    finally:
        holder.kill()
        holder.wait()
    assert run_train(ws, "locked", max_steps=2, warmup_steps=1)["steps"] == 2  # the kernel dropped the lock with its holder
    with open(folder / ".lock") as f:  # and ours is released after the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def process_ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow  # two stage processes
def test_an_orphaned_trainer_stops_and_a_second_one_is_refused_meanwhile(ws):
    """kill -9 of the trainer's parent (what `dvc repro` is to it) while it trains: a second trainer on the same
    folder is refused naming the first's pid before that; after the kill the first stops at a step boundary,
    writes no final model, and its newest checkpoint is intact."""
    params = write_params(ws, "orphan", epochs=500, max_steps=4000, eval_every=1000, save_every=4)
    parent = subprocess.Popen([sys.executable, str(ws / "parent.py"), str(ws / "orphan.stderr"), sys.executable,
                               *stage_args(ws, "orphan", params)], cwd=ws, env=stage_env(), stdout=subprocess.PIPE,
                              text=True)
    trainer = int(parent.stdout.readline())
    try:
        deadline = time.time() + 180
        while not list((ws / "orphan/checkpoints").glob("*/step_*/manifest.json")):
            assert parent.poll() is None, (ws / "orphan.stderr").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, *stage_args(ws, "orphan", params)], cwd=ws, env=stage_env(),
                                capture_output=True, text=True, timeout=300)
        folder = ws / "orphan/checkpoints"
        assert second.returncode == 1 and second.stderr.strip().splitlines()[-1] == (
            f"train: error: {folder} is in use by another trainer (pid {trainer}, lock {folder / '.lock'}); wait for "
            f"it to finish or stop it (kill {trainer}), then rerun")
        assert not process_ended(trainer), "the first trainer ended before the kill; the test proved nothing"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60
        while not process_ended(trainer):
            assert time.time() < deadline, "the orphaned trainer still runs 60 s after its parent was killed"
            time.sleep(0.1)
    finally:
        if not process_ended(trainer):
            os.kill(trainer, signal.SIGKILL)
    last = (ws / "orphan.stderr").read_text().strip().splitlines()[-1]
    newest = ckpt.latest_checkpoint(folder, next(p.name for p in folder.iterdir() if p.is_dir()))
    step = int(newest.name.split("_")[1])
    assert last.startswith(f"train: error: the process that started this trainer (pid {parent.pid}, e.g. `dvc "
                           f"repro`) is gone; stopped at step ")
    assert last.endswith(f"/4000 without writing the final model; `dvc repro` resumes from step {step} "
                         f"(checkpoint {newest})")
    assert not (ws / "orphan/final").exists()
    ckpt.read_checkpoint(newest)


@pytest.mark.slow  # DeepSpeed starts a process group and compiles its C++ ops on first use (minutes)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
@pytest.mark.parametrize("engine", ["zero2", "zero2_offload"])
def test_deepspeed_skips_nan_gradients_too(ws, engine):
    """DeepSpeed steps inside `backward`: its own overflow check (kept on) must skip, and the run count it."""
    params = write_params(ws, f"nan-{engine}", deepspeed=engine, max_steps=8)
    env = {k: v for k, v in stage_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(ws / "inject_nan.py"), "3,4", *stage_args(ws, f"nan-{engine}", params)],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((ws / f"nan-{engine}/train.json").read_text())["skipped_steps"] == 2
    assert nonfinite_tensors(ws / f"nan-{engine}") == []


@pytest.mark.slow  # two torchrun processes
def test_ddp_ranks_agree_to_skip_a_nan_on_one_rank(ws):
    """NaN gradients on rank 1 only, at step 3: DDP's all-reduce carries the NaN to rank 0, whose own gradients
    were finite, and rank 0 (which writes metrics and checkpoints) counts the skip: both skipped together."""
    params = write_params(ws, "nan-ddp", micro_batch_size=2, max_steps=6, save_every=3)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                single_process_env({})["MASTER_PORT"]]
    done = subprocess.run([*launcher, str(ws / "inject_nan.py"), "3@1", *stage_args(ws, "nan-ddp", params)],
                          cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((ws / "nan-ddp/train.json").read_text())["skipped_steps"] == 1
    assert nonfinite_tensors(ws / "nan-ddp") == []


def test_a_deepspeed_json_that_turns_off_the_overflow_check_is_refused(tmp_path):
    from moechat.errors import ConfigError
    from moechat.train.engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True,
                                                                           "check_grad_overflow": False}}))
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg(deepspeed=str(path)), "bf16")
    assert str(err.value) == (f"{path}: bf16.check_grad_overflow=false would let DeepSpeed apply non-finite "
                              f"gradients to the weights; remove it (moechat skips such steps, docs/pipeline.md)")
    assert deepspeed_config(cfg(deepspeed="zero2"), "bf16")["bf16"]["check_grad_overflow"] is True


@pytest.mark.parametrize("value", [0, -3])
def test_max_consecutive_skips_must_be_at_least_one(ws, value):
    from moechat.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_params(write_params(ws, f"skips{value}", max_consecutive_skips=value))
    assert f"train.max_consecutive_skips={value} must be >= 1" in str(err.value)
    assert "\n" not in str(err.value)
