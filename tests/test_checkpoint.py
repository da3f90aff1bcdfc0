"""Checkpoints: pickle-free optimizer state round trips exactly (torch and bnb 8-bit AdamW), RNG restore,
atomic folders (temp folders ignored), pruning per fingerprint, fingerprint sensitivity."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moechat import checkpoint as ckpt
from moechat.config import TrainConfig


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 64x96 weights: above bnb's 4096-element threshold, so they get real 8-bit (uint8 + absmax) state
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))


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
    ckpt.save_tree(opt.state_dict(), tmp_path, "optimizer")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    if isinstance(opt, bnb.optim.AdamW8bit):
        stored = json.loads((tmp_path / "optimizer.json").read_text())
        assert "__bnb_optimizer_quant_state__" in json.dumps(stored)  # the 8-bit state travels too
    resumed_net = tiny_net(seed=1)
    resumed_net.load_state_dict(net.state_dict())
    resumed = make_opt(resumed_net.parameters())
    resumed.load_state_dict(ckpt.load_tree(tmp_path, "optimizer"))
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
    with pytest.raises(ckpt.CheckpointError, match="cannot store object at state path 'x'"):
        ckpt.encode_tree({"x": object()}, {})


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
    cfg = dataclasses.asdict(TrainConfig())
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
