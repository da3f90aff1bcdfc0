"""The schedule is sized from the data: warmup can never cover the run, and the reference run peaks early."""

from pathlib import Path

import pytest

from moechat.train import plan
from moechat.errors import ConfigError
from moechat.config.params import load_params
from moechat.train.schedule import build_schedule, lr_multiplier

ROOT = Path(__file__).resolve().parents[2]


def first_peak_step(cfg, schedule) -> int:
    return next(s for s in range(schedule.total_steps + 1) if lr_multiplier(s, cfg, schedule) == 1.0)


def test_reference_params_reach_peak_lr_within_the_first_tenth_of_the_run():
    params = load_params(ROOT / "params.yaml")
    data = plan.data_size(params.data, params.train.seq_len, prepare_metrics=None)  # the reference data size
    schedule = build_schedule(params.train, data.blocks)
    peak = first_peak_step(params.train, schedule)
    assert peak == schedule.warmup_steps and peak <= schedule.total_steps / 10, (peak, schedule)
    assert schedule.total_steps >= 200  # enough steps for the cosine to mean something
    assert lr_multiplier(schedule.total_steps, params.train, schedule) == pytest.approx(
        params.train.min_lr / params.train.lr)


def test_the_seed_schedule_is_refused_naming_the_key_and_the_fix():
    """The seed's params: warmup_steps 100, one epoch of thread_policy best: ~44 steps, never out of warmup."""
    params = load_params(ROOT / "params.yaml", {"data": {"thread_policy": "best"},
                                                "train": {"epochs": 1, "warmup_steps": 100, "warmup_ratio": None}})
    data = plan.data_size(params.data, params.train.seq_len, prepare_metrics=None)
    with pytest.raises(ConfigError, match=r"train.warmup_steps=100 >= the run's 44 optimizer steps.*"
                                          r"train.warmup_ratio: 0.05"):
        build_schedule(params.train, data.blocks)


@pytest.mark.parametrize("train, expected", [
    ({"warmup_steps": 10}, "train.warmup_steps=10 and train.warmup_ratio=0.05: set exactly one"),
    ({"warmup_ratio": None}, "train.warmup_steps=None and train.warmup_ratio=None: set exactly one"),
    ({"warmup_ratio": 1.0}, "train.warmup_ratio=1.0 must be in [0, 1)"),
    ({"warmup_ratio": None, "warmup_steps": 50, "max_steps": 50},
     "train.warmup_steps=50 must be < train.max_steps=50"),
])
def test_impossible_warmup_is_refused_at_load_time(train, expected):
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", {"train": train})
    assert expected in str(err.value)


def test_ratio_warmup_follows_the_data_and_the_world_size():
    params = load_params(ROOT / "params.yaml", {"train": {"warmup_ratio": 0.1}})
    one = build_schedule(params.train, n_train_blocks=3200)  # 3200 / 32 = 100 steps per epoch
    assert (one.steps_per_epoch, one.total_steps, one.warmup_steps) == (100, 200, 20)
    two = build_schedule(params.train, n_train_blocks=3200, world_size=2)
    assert (two.steps_per_epoch, two.total_steps, two.warmup_steps) == (50, 100, 10)
    with pytest.raises(ConfigError, match="the train split has 31 blocks, fewer than one global batch of 32"):
        build_schedule(params.train, n_train_blocks=31)
