"""Checkpoints: pickle-free optimizer state round trips exactly (torch and bnb 8-bit AdamW), RNG restore,
atomic folders (temp folders ignored), pruning per fingerprint, fingerprint sensitivity."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moechat.train import checkpoint as ckpt
from moechat.train import integrity
from moechat.train import loop as train_module
from moechat.train.engine import single_process_env
from moechat.config.params import load_params
from tests.support.training import logged, run_inprocess, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # two weights above bnb's 4096-element threshold (64x96, 96x64), so they get real 8-bit (uint8 + absmax)
    # state and share bnb's quantisation maps, which safetensors refuses unless they are stored once
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8))


def step(net: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
    lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
], ids=["adamw", "adamw_8bit"])
def test_optimizer_state_round_trips_exactly_through_safetensors_and_json(tmp_path, make_opt):
    net = tiny_net()
    opt = make_opt(net.parameters())
    for s in range(3):
        step(net, opt, s)
    ckpt.save_tree(opt.state_dict(), tmp_path / "optimizer.safetensors")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    resumed_net = tiny_net(seed=1)
    resumed_net.load_state_dict(net.state_dict())
    resumed = make_opt(resumed_net.parameters())
    resumed.load_state_dict(ckpt.load_tree(tmp_path / "optimizer.safetensors"))
    if isinstance(opt, bnb.optim.AdamW8bit):
        _, skeleton = ckpt.read_safetensors(tmp_path / "optimizer.safetensors", ckpt.TREE_KEY)
        assert "__bnb_optimizer_quant_state__" in json.dumps(skeleton)  # the 8-bit state travels too
        first, second = (resumed.state[p] for p in (resumed_net[0].weight, resumed_net[2].weight))
        assert first["qmap1"] is second["qmap1"]  # shared once more, as in the optimizer that was saved
        assert torch.equal(first["qmap1"], opt.state[net[0].weight]["qmap1"])
    for s in range(3, 6):
        step(net, opt, s)
        step(resumed_net, resumed, s)
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)


def test_tree_encoding_keeps_types():
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, 2)}, 7: {}},
            "groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "fused": None, "params": [0, 7]}]}
    tensors: dict[str, torch.Tensor] = {}
    back = ckpt.decode_tree(json.loads(json.dumps(ckpt.encode_tree(tree, tensors))), tensors)
    assert set(back["state"]) == {0, 7} and back["groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back["state"][0]["m"], torch.ones(2, 2)) and back["groups"][0]["params"] == [0, 7]
    with pytest.raises(ckpt.CheckpointError, match="cannot store object .builtins:object. at state path .x."):
        ckpt.encode_tree({"x": object()}, {})


def test_shared_tensors_are_stored_once_and_views_copied(tmp_path):
    qmap, flat = torch.linspace(-1, 1, 8), torch.arange(6.0)
    tree = {"a": {"qmap": qmap, "w": flat[:3]}, "b": {"qmap": qmap, "w": flat[3:]}, "c": flat[:3]}
    ckpt.save_tree(tree, tmp_path / "shared.safetensors")  # safetensors refuses shared memory: this raised before
    back = ckpt.load_tree(tmp_path / "shared.safetensors")
    assert back["a"]["qmap"] is back["b"]["qmap"] and torch.equal(back["a"]["qmap"], qmap)
    assert back["c"] is back["a"]["w"]  # the same view twice: one tensor
    assert torch.equal(back["a"]["w"], flat[:3]) and torch.equal(back["b"]["w"], flat[3:])


def test_rng_states_restore_every_generator():
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    tensors, plain = ckpt.capture_rng()
    plain = json.loads(json.dumps(plain))
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.restore_rng(tensors, plain)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def save(root: Path, fp: str, step_no: int, keep: int, net: torch.nn.Module) -> Path:
    opt = torch.optim.AdamW(net.parameters())
    state = ckpt.TrainState(step=step_no, cursor=ckpt.Cursor(0, step_no * 4), tokens_seen=step_no, fingerprint=fp)
    return ckpt.save_checkpoint(root, state, net, opt.state_dict(), {"last_epoch": step_no}, keep)


def test_checkpoints_are_atomic_pruned_and_per_fingerprint(tmp_path):
    net = tiny_net()
    other = save(tmp_path, "otherexperim", 1, keep=1, net=net)
    for s in (2, 4, 6, 8):
        save(tmp_path, "abc123abc123", s, keep=2, net=net)
    folder = tmp_path / "abc123abc123"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000006", "step_00000008"]
    assert other.exists()  # pruning never touches another fingerprint
    # a crash mid-write leaves only a temp folder: never picked, and the next save replaces it
    partial = folder / ".tmp-step_00000010"
    partial.mkdir()
    save_file({"w": torch.zeros(1)}, str(partial / "model.safetensors"))
    (folder / "step_00000012").mkdir()  # no state.json: not a complete checkpoint either
    latest = ckpt.latest_checkpoint(tmp_path, "abc123abc123")
    assert latest.name == "step_00000008"
    fresh = tiny_net(seed=3)
    loaded = ckpt.load_checkpoint(latest, fresh)
    assert loaded.state.step == 8 and loaded.state.cursor == ckpt.Cursor(0, 32)
    assert loaded.scheduler_state == {"last_epoch": 8}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    save(tmp_path, "abc123abc123", 10, keep=2, net=net)
    assert not partial.exists() and ckpt.latest_checkpoint(tmp_path, "abc123abc123").name == "step_00000010"


def test_fingerprint_tracks_trajectory_params_and_init_weights(tmp_path):
    init, data = tmp_path / "init", tmp_path / "data"
    init.mkdir(), (data / "train").mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(init / "model.safetensors"))
    (data / "train/state.json").write_text('{"_fingerprint": "aaa"}')
    cfg = dataclasses.asdict(load_params(ROOT / "params.yaml").train)
    base = ckpt.fingerprint(cfg, 1, init, data, 1)
    assert ckpt.fingerprint({**cfg, "save_every": 7, "eval_every": 3}, 1, init, data, 1) == base
    assert ckpt.fingerprint({**cfg, "lr": 1e-3}, 1, init, data, 1) != base
    assert ckpt.fingerprint(cfg, 2, init, data, 1) != base
    assert ckpt.fingerprint(cfg, 1, init, data, 2) != base
    (data / "train/state.json").write_text('{"_fingerprint": "bbb"}')
    assert ckpt.fingerprint(cfg, 1, init, data, 1) != base
    (data / "train/state.json").write_text('{"_fingerprint": "aaa"}')
    save_file({"w": torch.full((3,), 2.0)}, str(init / "model.safetensors"))
    assert ckpt.fingerprint(cfg, 1, init, data, 1) != base


def test_fingerprint_covers_the_init_config_not_only_its_weights(tmp_path):
    """Two inits that differ only in top_k have identical weights; they must not share checkpoints."""
    from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train/state.json").write_text('{"_fingerprint": "aaa"}')
    inits = []
    for top_k in (1, 2):
        torch.manual_seed(0)
        model = MoeChatForCausalLM(MoeChatConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                                 n_inner=16, num_experts=2, num_experts_per_tok=top_k, moe_every=2))
        model.save_pretrained(tmp_path / f"init_k{top_k}")
        inits.append(tmp_path / f"init_k{top_k}")
    weights = [(p / "model.safetensors").read_bytes() for p in inits]
    assert weights[0] == weights[1]  # same shapes, same seed: only config.json tells them apart
    cfg = dataclasses.asdict(load_params(ROOT / "params.yaml").train)
    fps = [ckpt.fingerprint(cfg, 1, p, data, 1) for p in inits]
    assert fps[0] != fps[1]
    # the transformers version stamp alone does not restart a run
    config = json.loads((inits[0] / "config.json").read_text())
    (inits[0] / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}))
    assert ckpt.fingerprint(cfg, 1, inits[0], data, 1) == fps[0]


def test_crafted_checkpoint_cannot_call_arbitrary_code(tmp_path):
    exploit = {"__enum__": "deepspeed.utils:os.system", "value": "echo PWNED"}
    with pytest.raises(ckpt.CheckpointError, match="not one of the classes a checkpoint may hold"):
        ckpt.decode_tree(exploit, {})
    for tree in ({"__object__": "deepspeed.utils:os.system", "state": {}},
                 {"__object__": "deepspeed.utils.tensor_fragment:tensor_fragment", "state": {}},  # not listed
                 {"__enum__": "deepspeed.runtime.fp16.loss_scaler:LossScaler", "value": 1},  # not an enum
                 {"__dtype__": "manual_seed"}):
        with pytest.raises(ckpt.CheckpointError):
            ckpt.decode_tree(tree, {})
    # read from a checkpoint, the refusal names the file
    net = tiny_net()
    path = ckpt.save_checkpoint(tmp_path, ckpt.TrainState(step=1, fingerprint="abc123abc123"), net,
                                torch.optim.SGD(net.parameters(), lr=0.1).state_dict(), {}, keep=1)
    _edit_tree(path / "optimizer.safetensors", lambda tree: {"state": exploit})
    integrity.write_manifest(path)  # a crafted checkpoint can carry matching hashes: the allow-list still holds
    with pytest.raises(ckpt.CheckpointError,
                       match=r"optimizer\.safetensors: checkpoint names 'deepspeed\.utils:os\.system'"):
        ckpt.read_checkpoint(path)


def test_deepspeed_state_objects_round_trip():
    """The objects ZeRO-2's optimizer state_dict really holds (fp16 loss scaler, stage enum, slice address)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    tree = {"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}]}
    tensors: dict[str, torch.Tensor] = {}
    back = ckpt.decode_tree(json.loads(json.dumps(ckpt.encode_tree(tree, tensors))), tensors)
    assert type(back["loss_scaler"]) is DynamicLossScaler and vars(back["loss_scaler"]) == vars(scaler)
    assert back["loss_scaler"].dtype is torch.half
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert back["param_slice_mappings"] == [{"w": fragment_address(numel=6, start=2)}]


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """fp16 resume: the loss scale and growth tracker come back, not the initial 2**16."""
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=5)
    x = torch.randn(4, 64)
    scaler.scale(net(x).sum() * float("inf")).backward()  # overflow: step skipped, scale halved
    scaler.step(opt), scaler.update(), opt.zero_grad()
    scaler.scale(net(x).pow(2).mean()).backward()  # a good step: growth tracker 1
    scaler.step(opt), scaler.update()
    assert scaler.get_scale() == 2.0**15
    state = ckpt.TrainState(step=2, fingerprint="fp16fp16fp16")
    path = ckpt.save_checkpoint(tmp_path, state, net, opt.state_dict(), {}, keep=1,
                                scaler_state=scaler.state_dict())
    loaded = ckpt.load_checkpoint(path, tiny_net(seed=2))
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=5)
    resumed.load_state_dict(loaded.scaler_state)
    assert resumed.state_dict() == scaler.state_dict()
    assert resumed.get_scale() == 2.0**15 and resumed.state_dict()["_growth_tracker"] == 1
    no_scaler = ckpt.save_checkpoint(tmp_path, dataclasses.replace(state, step=3), net, opt.state_dict(), {}, keep=1)
    assert ckpt.load_checkpoint(no_scaler, tiny_net()).scaler_state is None


def test_trash_and_weightless_folders_are_never_resumed(tmp_path):
    net = tiny_net()
    save(tmp_path, "abc123abc123", 2, keep=3, net=net)
    folder = tmp_path / "abc123abc123"
    # a crash while deleting a newer checkpoint: renamed to .trash-*, still holding state.json and weights
    trash = folder / ".trash-step_00000006"
    (folder / "step_00000002").rename(folder / "keep")
    save(tmp_path, "abc123abc123", 6, keep=3, net=net)
    (folder / "step_00000006").rename(trash)
    (folder / "keep").rename(folder / "step_00000002")
    # a half-deleted folder that lost its weights but kept state.json
    weightless = folder / "step_00000004"
    weightless.mkdir()
    (weightless / "state.json").write_text((folder / "step_00000002/state.json").read_text())
    assert (trash / "state.json").exists() and (trash / "model.safetensors").exists()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path, "abc123abc123")] == ["step_00000002"]
    # the next save clears the leftover trash; pruning leaves no trash of its own
    save(tmp_path, "abc123abc123", 8, keep=1, net=net)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000004", "step_00000008"]
    save(tmp_path, "abc123abc123", 8, keep=1, net=net)  # re-saving the same step replaces it
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000004", "step_00000008"]


def test_other_fingerprints_lists_only_complete_experiments(tmp_path):
    net = tiny_net()
    save(tmp_path, "aaaaaaaaaaaa", 1, keep=1, net=net)
    save(tmp_path, "bbbbbbbbbbbb", 1, keep=1, net=net)
    (tmp_path / "cccccccccccc" / ".tmp-step_00000001").mkdir(parents=True)
    assert ckpt.other_fingerprints(tmp_path, "aaaaaaaaaaaa") == ["bbbbbbbbbbbb"]
    assert ckpt.other_fingerprints(tmp_path / "missing", "aaaaaaaaaaaa") == []


# ----------------------------------------------------------------------------------------------------
# A damaged newest checkpoint: fall back to the newest intact one, or refuse naming the folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rename_a_weight(path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(path))
    weights["0.renamed"] = weights.pop("0.weight")
    save_file(weights, str(path))


def _edit_tree(path: Path, edit) -> None:
    """Rewrite the JSON skeleton a `save_tree` file carries in its header metadata."""
    tensors, skeleton = ckpt.read_safetensors(path, ckpt.TREE_KEY)
    save_file(tensors, str(path), metadata={ckpt.TREE_KEY: json.dumps(edit(skeleton))})


def _drop_a_param_group(path: Path) -> None:
    _edit_tree(path, lambda tree: {**tree, "param_groups": tree["param_groups"][:0]})


def _name_an_absent_tensor(path: Path) -> None:
    _edit_tree(path, lambda tree: json.loads(json.dumps(tree).replace('"__tensor__": "state.0.exp_avg"',
                                                                     '"__tensor__": "nowhere"')))


DAMAGES = {
    "truncated weights": ("model.safetensors", _truncate),
    "garbled state.json": ("state.json", lambda p: p.write_text('{"step": 4, "curs')),
    "state.json without the scheduler": ("state.json", lambda p: p.write_text(
        json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "scheduler"}))),
    "invalid UTF-8 state.json": ("state.json", lambda p: p.write_bytes(b"\xff\xfe{}")),
    "missing optimizer tensors": ("optimizer.safetensors", lambda p: p.unlink()),
    "truncated optimizer tensors": ("optimizer.safetensors", _truncate),
    "optimizer skeleton naming absent tensors": ("optimizer.safetensors", _name_an_absent_tensor),
    "weights of another model": ("model.safetensors", _rename_a_weight),
    "optimizer of another model": ("optimizer.safetensors", _drop_a_param_group),
    "truncated RNG state": ("rng_rank0.safetensors", _truncate),
}


def _two_checkpoints(root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Checkpoints at steps 2 and 4 of fingerprint abc123abc123, from different weights and a stepped AdamW."""
    nets = []
    for step_no, seed in ((2, 1), (4, 2)):
        net = tiny_net(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        step(net, opt, seed)
        state = ckpt.TrainState(step=step_no, fingerprint="abc123abc123")
        ckpt.save_checkpoint(root, state, net, opt.state_dict(), {"last_epoch": step_no}, keep=3)
        nets.append(net)
    return nets[0], nets[1]


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    older, _ = _two_checkpoints(tmp_path)
    name, spoil = DAMAGES[damage]
    newest = tmp_path / "abc123abc123" / "step_00000004"
    spoil(newest / name)
    fresh = tiny_net(seed=9)
    lines: list[str] = []
    path, loaded = ckpt.resume_point(tmp_path, "abc123abc123", fresh, 0,
                                     torch.optim.AdamW(fresh.parameters()).state_dict(), log=lines.append)
    assert path.name == "step_00000002" and loaded.state.step == 2 and loaded.scheduler_state == {"last_epoch": 2}
    assert all(torch.equal(a, b) for a, b in zip(older.state_dict().values(), fresh.state_dict().values()))
    assert len(lines) == 2 and lines[0].startswith("checkpoint step_00000004 is damaged, skipping it: ")
    assert str(newest) in lines[0]  # which file (or folder) and why
    assert lines[1] == f"resuming from {tmp_path / 'abc123abc123' / 'step_00000002'}, the newest intact checkpoint"
    assert newest.exists()  # nothing of the user's is deleted


def test_no_intact_checkpoint_refuses_naming_the_folder_to_delete(tmp_path):
    _two_checkpoints(tmp_path)
    for step_dir in ("step_00000002", "step_00000004"):
        _truncate(tmp_path / "abc123abc123" / step_dir / "model.safetensors")
    net = tiny_net(seed=9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resume_point(tmp_path, "abc123abc123", net, 0, log=lambda line: None)
    message = str(err.value)
    assert message.startswith(f"no intact checkpoint in {tmp_path / 'abc123abc123'} (2 damaged; newest: ")
    assert message.endswith(f"delete {tmp_path / 'abc123abc123'} to train this experiment from step 0")
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model was not touched
    assert ckpt.resume_point(tmp_path, "nocheckpoint", net, 0) is None


def test_resume_skips_a_damaged_newest_checkpoint_and_matches_the_uninterrupted_run(workspace, capsys):
    reference = run_inprocess(workspace, "ckpt-straight", tiny_cfg())  # 12 steps; checkpoints 8 and 12 kept
    shutil.copytree(workspace / "ckpt-straight/checkpoints", workspace / "ckpt-damaged/checkpoints")
    newest = workspace / "ckpt-damaged/checkpoints" / reference["fingerprint"] / "step_00000012"
    _truncate(newest / "model.safetensors")
    capsys.readouterr()
    resumed = run_inprocess(workspace, "ckpt-damaged", tiny_cfg())
    out = capsys.readouterr().out.replace("\n", " ")
    assert (f"checkpoint step_00000012 is damaged, skipping it: {newest / 'model.safetensors'} does not match the "
            f"sha256 recorded in manifest.json") in out
    assert resumed["resumed_from_step"] == 8
    for key in ("loss", "lm_loss", "aux_loss", "val_lm_loss"):
        assert resumed[key] == reference[key], key
    assert logged(workspace / "ckpt-damaged/live") == logged(workspace / "ckpt-straight/live")
    ckpt.read_checkpoint(newest)  # the damaged step was written again, whole


def test_ctrl_c_in_training_says_from_which_step_dvc_repro_resumes(workspace, monkeypatch):
    real_step = train_module.train_step

    def interrupted_at_6(*args):
        if args[-1] == 6:  # the step number
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train_module, "train_step", interrupted_at_6)
    with pytest.raises(train_module.TrainingInterrupted) as err:
        run_inprocess(workspace, "ctrl-c", tiny_cfg())
    (saved,) = (workspace / "ctrl-c/checkpoints").glob("*/step_00000004")
    assert str(err.value) == (f"interrupted after step 5/12; `dvc repro` resumes from step 4 "
                              f"(checkpoint {saved})")
    assert err.value.exit_code == 130
    monkeypatch.undo()
    assert run_inprocess(workspace, "ctrl-c", tiny_cfg())["resumed_from_step"] == 4


@pytest.mark.slow  # two torchrun processes
def test_processes_that_find_different_intact_checkpoints_refuse_together(workspace):
    """Rank 1's RNG file of the newest checkpoint is damaged, rank 0's files are whole: rank 1 alone would fall
    back a step. Two processes (gloo on CPU) must not continue from two different checkpoints."""
    import subprocess
    import sys

    from tests.support.training import stage_cmd, stage_env, write_params

    params = write_params(workspace, "ddp-damaged", max_steps=4, micro_batch_size=2, grad_accum=1, save_every=2)
    port = single_process_env({})["MASTER_PORT"]  # a free port, not a fixed one another run may hold
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd = stage_cmd(workspace, "ddp-damaged", params, launcher)
    first = subprocess.run(cmd, cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    (newest,) = (workspace / "ddp-damaged/checkpoints").glob("*/step_00000004")
    _truncate(newest / "rng_rank1.safetensors")
    again = subprocess.run(cmd, cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert (f"train: error: the processes found different newest intact checkpoints (step by rank: [4, 2]); "
            f"{newest} is damaged for some of them: delete it and rerun") in again.stderr
