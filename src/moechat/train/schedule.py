"""The learning-rate schedule, sized from the data before step 0.

`train` and `moechat plan` both call `build_schedule` with the number of packed train blocks, so the
run's optimizer steps and warmup are known (and checked) before any work: a warmup that covers the whole
run is refused with the key and the fix, rather than a run that never leaves warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moechat.errors import ConfigError
from moechat.config.params import TrainConfig


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int  # optimizer steps in one pass over the train blocks (a short tail is skipped)
    total_steps: int  # optimizer steps of the run: train.max_steps, else epochs x steps_per_epoch
    warmup_steps: int  # linear warmup; the peak rate is reached at this step


def steps_per_epoch(n_train_blocks: int, global_batch: int) -> int:
    """Whole global batches in one epoch (BatchStream skips a shorter tail)."""
    return n_train_blocks // global_batch


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """train.warmup_steps when set, else floor(train.warmup_ratio x total_steps); refused when it would
    cover the whole run (the rate would never reach train.lr and the cosine would never run)."""
    if cfg.warmup_steps is not None:
        if cfg.warmup_steps >= total_steps:
            raise ConfigError(
                f"params.yaml: train.warmup_steps={cfg.warmup_steps} >= the run's {total_steps} optimizer steps, "
                f"so the rate never reaches train.lr; set train.warmup_steps: null and train.warmup_ratio: 0.05 "
                f"(sized from the data), or warmup_steps below {total_steps}")
        return cfg.warmup_steps
    return math.floor(cfg.warmup_ratio * total_steps)


def build_schedule(cfg: TrainConfig, n_train_blocks: int, world_size: int = 1) -> Schedule:
    """The run's size from the packed train blocks, the global batch (micro_batch x grad_accum x GPUs) and
    train.epochs / train.max_steps."""
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world_size
    per_epoch = steps_per_epoch(n_train_blocks, global_batch)
    if per_epoch < 1:
        raise ConfigError(
            f"params.yaml: the train split has {n_train_blocks} blocks, fewer than one global batch of "
            f"{global_batch} (train.micro_batch_size={cfg.micro_batch_size} x train.grad_accum={cfg.grad_accum} "
            f"x {world_size} processes); lower train.grad_accum or prepare more data")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    return Schedule(steps_per_epoch=per_epoch, total_steps=total, warmup_steps=warmup_steps(cfg, total))


def lr_multiplier(step: int, cfg: TrainConfig, schedule: Schedule) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at `schedule.total_steps` (nanoGPT's
    schedule), as a multiple of train.lr for LambdaLR. `step` counts optimizer steps already taken."""
    warmup, total = schedule.warmup_steps, schedule.total_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    lr = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)
    return lr / cfg.lr
