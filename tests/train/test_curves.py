"""The DVCLive curves travel with the checkpoints: copied in, restored on resume, emptied on a fresh start, trimmed to
the checkpoint's step when an older checkpoint has no copy (the whole-run behaviour is in tests/train/test_train.py)."""

from __future__ import annotations

import dataclasses
import json

import torch

from moechat.train import checkpoint as ckpt
from moechat.train.curves import reset_live, restore_live, snapshot_live


def tiny_linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def test_dvclive_curves_travel_with_the_checkpoint(tmp_path):
    """The live folder's plots and summary are copied into the checkpoint; restoring replaces whatever the
    workspace holds (another experiment's files, rows past the step, a torn row) with exactly that copy."""
    live = tmp_path / "live"
    (live / "plots/metrics/train").mkdir(parents=True)
    (live / "plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t6.0\n2\t5.5\n")
    (live / "metrics.json").write_text('{"step": 2, "train": {"loss": 5.5}}')
    (live / "report.html").write_text("not a curve")  # outside plots/ and the summary: not copied
    state = ckpt.TrainState(step=2, fingerprint="abc123abc123")
    net = tiny_linear()
    path = ckpt.save_checkpoint(tmp_path / "ckpts", state, net, torch.optim.SGD(net.parameters(), lr=0.1)
                                .state_dict(), {}, keep=1,
                                extra_files=lambda folder: snapshot_live(live, folder))
    assert sorted(p.relative_to(path / "live").as_posix() for p in (path / "live").rglob("*") if p.is_file()) \
        == ["metrics.json", "plots/metrics/train/loss.tsv"]
    # the workspace moves on: another experiment's curves, an extra series, a torn row of a killed run
    (live / "plots/metrics/train/loss.tsv").write_text("step\tloss\n1\t9.0\n2\t8.0\n3\t7.")
    (live / "plots/metrics/moe").mkdir()
    (live / "plots/metrics/moe/expert7_share.tsv").write_text("step\texpert7_share\n1\t0.1\n")
    (live / "metrics.json").write_text('{"step": 3, "tra')
    assert restore_live(path, live, 2)
    assert (live / "plots/metrics/train/loss.tsv").read_text() == "step\tloss\n1\t6.0\n2\t5.5\n"
    assert not (live / "plots/metrics/moe").exists()
    assert json.loads((live / "metrics.json").read_text()) == {"step": 2, "train": {"loss": 5.5}}
    # a fresh start empties the curves; a checkpoint without a copy restores nothing and says so
    reset_live(live)
    assert not (live / "plots").exists() and not (live / "metrics.json").exists()
    assert (live / "report.html").exists()
    bare = ckpt.save_checkpoint(tmp_path / "ckpts", dataclasses.replace(state, step=3), net,
                                torch.optim.SGD(net.parameters(), lr=0.1).state_dict(), {}, keep=1)
    (live / "plots").mkdir()
    assert not restore_live(bare, live, 3) and (live / "plots").is_dir()
    assert ckpt.latest_checkpoint(tmp_path / "ckpts", "abc123abc123") == bare  # the copy is optional


def test_checkpoint_without_curve_copy_keeps_the_workspace_curves_up_to_its_step(tmp_path):
    """An older checkpoint has no live/ copy: the workspace rows up to its step are the only record of the
    curve before it and must stay; rows past it (a crashed run's) and a torn row go."""
    live = tmp_path / "live"
    (live / "plots/metrics/train").mkdir(parents=True)
    (live / "plots/expert_shares").mkdir(parents=True)
    (live / "plots/metrics/train/loss.tsv").write_text(
        "timestamp\tstep\tloss\n10\t1\t6.0\n11\t2\t5.5\n12\t3\t5.1\n13\t4\t4.")
    (live / "plots/expert_shares/layer1.tsv").write_text(
        "step\tseries\tshare\n2\texpert0\t0.5\n3\texpert0\t0.4\n")
    net = tiny_linear()
    bare = ckpt.save_checkpoint(tmp_path / "ckpts", ckpt.TrainState(step=2, fingerprint="abc123abc123"), net,
                                torch.optim.SGD(net.parameters(), lr=0.1).state_dict(), {}, keep=1)
    assert not restore_live(bare, live, 2)
    assert (live / "plots/metrics/train/loss.tsv").read_text() == "timestamp\tstep\tloss\n10\t1\t6.0\n11\t2\t5.5\n"
    assert (live / "plots/expert_shares/layer1.tsv").read_text() == "step\tseries\tshare\n2\texpert0\t0.5\n"
