"""A training run's state and its lifecycle around the loop: `setup` builds it (engine, model, data, optimizer,
schedule), `resume` loads the newest intact checkpoint into it, `save` checkpoints it, `save_final` publishes
the trained model."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from moechat.atomic import atomic_dir
from moechat.config.params import TrainConfig
from moechat.errors import MoechatError
from moechat.model.configuration_moechat import MoeChatConfig
from moechat.model.folder import load_model
from moechat.train import checkpoint as ckpt
from moechat.train import curves, integrity, plan
from moechat.train.backends import flash_attn_installed, resolve_attention
from moechat.train.batches import BatchStream, load_blocks
from moechat.train.engine import (build_accelerator, compile_blocks, deepspeed_config, drop_fp32_output_copy, offloads_optimizer, resolve_precision)
from moechat.train.hardware import device_memory
from moechat.train.optim import build_optimizer
from moechat.train.parent_watch import ParentWatch
from moechat.train.schedule import Schedule, build_schedule, lr_multiplier
from moechat.train.step import NonFiniteStateError


class TrainOOMError(MoechatError, RuntimeError):
    """CUDA ran out of memory; the message says what to lower, with the planner's estimate."""


def oom_error(err: BaseException, where: str, model_cfg: MoeChatConfig, cfg: TrainConfig, vocab_size: int,
              world: int) -> TrainOOMError:
    """A CUDA OOM turned into what to lower, with the planner's estimate (cfg has the resolved precision)."""
    estimate = plan.estimate(model_cfg, cfg, vocab_size, world_size=world)
    return TrainOOMError(
        f"CUDA out of memory {where}: the planner estimated {estimate.total_gb:.2f} GiB for "
        f"micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len}, gradient_checkpointing="
        f"{cfg.gradient_checkpointing}. Lower train.micro_batch_size (raise grad_accum to keep the batch), "
        f"lower train.seq_len, or set train.gradient_checkpointing: true; "
        f"{plan.advice(model_cfg, cfg, vocab_size, world)}. ({err})")


def agree_on_resume(accelerator: Accelerator, resume: Optional[Path], folder: Path) -> None:
    """Every process resumes from the same step. A file damaged for one rank only (its RNG state or optimizer
    shard) makes that rank fall back alone; continuing would mix two checkpoints, so this refuses instead."""
    if accelerator.num_processes == 1:
        return
    step = int(ckpt.STEP_DIR.match(resume.name).group(1)) if resume is not None else -1
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        newest = folder / ckpt.step_dir_name(max(steps))
        raise ckpt.CheckpointError(f"the processes found different newest intact checkpoints (step by rank: "
                                   f"{steps}); {newest} is damaged for some of them: delete it and rerun")


def save_final(model: torch.nn.Module, accelerator: Accelerator, init_dir: Path, out_dir: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer files of the init folder, renamed into place."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    with atomic_dir(out_dir) as tmp:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        for f in Path(init_dir).iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.suffix != ".safetensors" \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)


@dataclass
class Run:
    """Everything a training run holds, built once by `setup` (torchtitan's trainer state); `resume`, `save`
    and `train_loop` take it. `cfg.precision` is the resolved one, never `auto`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP / DeepSpeed engine around raw_model)
    raw_model: torch.nn.Module
    model_cfg: MoeChatConfig  # the loaded model's own config (init may differ from params)
    optimizer: torch.optim.Optimizer  # as prepared by accelerate
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    stream: BatchStream
    train_blocks: dict[str, torch.Tensor]
    val_blocks: dict[str, torch.Tensor]
    offload: bool  # DeepSpeed's CPU Adam replaced train.optimizer
    per_rank_optimizer: bool  # ZeRO shards the optimizer state: one file per rank
    checkpoint_dir: Path
    live_dir: Path
    fingerprint: str
    state: ckpt.TrainState
    live: Any = None  # the DVCLive logger, main process only
    parent: ParentWatch = dataclasses.field(default_factory=ParentWatch)  # notices a killed `dvc repro`

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer itself, without accelerate's wrapper (whose state_dict a checkpoint holds)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    @property
    def vocab_size(self) -> int:
        return self.raw_model.config.vocab_size

    def oom_error(self, err: BaseException, where: str) -> TrainOOMError:
        return oom_error(err, where, self.model_cfg, self.cfg, self.vocab_size, self.accelerator.num_processes)


def setup(cfg: TrainConfig, seed: int, data_dir: Path, init_dir: Path, checkpoint_dir: Path,
          live_dir: Path) -> Run:
    """Engine, model, data, optimizer and schedule of a run at step 0 (nothing resumed yet)."""
    cuda = torch.cuda.is_available()
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, cuda,
                                                              cuda and torch.cuda.is_bf16_supported()))
    device_type = "cuda" if cuda else "cpu"
    attention = resolve_attention(cfg.attn_implementation, device_type, flash_attn_installed(), cfg.precision)
    cfg = dataclasses.replace(cfg, attn_implementation=attention)
    ds_config = deepspeed_config(cfg, cfg.precision)
    offload = offloads_optimizer(ds_config)
    accelerator = build_accelerator(cfg, cfg.precision, ds_config)
    world = accelerator.num_processes
    set_seed(seed)

    model = load_model(init_dir, torch.device("cpu"), torch.float32)  # fp32 master weights; accelerate places them
    model.set_attn_implementation(attention)
    model_cfg, vocab = model.config, model.config.vocab_size
    plan.preflight(model_cfg, cfg, vocab, world, *device_memory(accelerator.device))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_blocks(model)
    train_blocks = load_blocks(data_dir, "train", cfg.seq_len)
    val_blocks = load_blocks(data_dir, "val", cfg.seq_len)
    n_rows = train_blocks["input_ids"].shape[0]
    # before step 0: refuses fewer rows than one global batch, and a warmup that covers the run
    schedule = build_schedule(cfg, n_rows, world)
    stream = BatchStream(n_rows, cfg.micro_batch_size * cfg.grad_accum * world, seed)

    optimizer = build_optimizer(model, cfg, offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, schedule))
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
    except torch.OutOfMemoryError as err:
        raise oom_error(err, "while placing the model and optimizer on the GPU", model_cfg, cfg, vocab,
                        world) from err
    drop_fp32_output_copy(model)
    # the resolved precision, not `auto`: a bf16 run and an fp16 (loss-scaled) run are different experiments
    fp = ckpt.fingerprint(dataclasses.asdict(cfg), seed, init_dir, data_dir, world)
    return Run(cfg=cfg, accelerator=accelerator, model=model, raw_model=accelerator.unwrap_model(model),
               model_cfg=model_cfg, optimizer=optimizer, scheduler=scheduler, schedule=schedule, stream=stream,
               train_blocks=train_blocks, val_blocks=val_blocks, offload=offload,
               per_rank_optimizer=ds_config is not None, checkpoint_dir=Path(checkpoint_dir),
               live_dir=Path(live_dir), fingerprint=fp, state=ckpt.TrainState(fingerprint=fp))


def resume(run: Run) -> Optional[Path]:
    """Load the newest intact checkpoint of the run's experiment into it (weights, optimizer, scheduler,
    GradScaler, counters): the checkpoint's folder, or None for a fresh start. RNG is restored separately,
    by `restore_rng`, as the last thing before the loop."""
    acc, world = run.accelerator, run.accelerator.num_processes
    # the fresh optimizer's parameter groups, which a checkpoint's optimizer state must match (ZeRO's
    # partitioned state is loaded and checked by DeepSpeed itself)
    template = None if run.per_rank_optimizer else run.inner_optimizer.state_dict()
    found = ckpt.resume_point(run.checkpoint_dir, run.fingerprint, run.raw_model, acc.process_index, template,
                              log=acc.print)
    path, loaded = found if found is not None else (None, None)
    agree_on_resume(acc, path, run.checkpoint_dir / run.fingerprint)
    if path is None:
        others = ckpt.other_fingerprints(run.checkpoint_dir, run.fingerprint)
        if others:
            acc.print(f"no checkpoint of experiment {run.fingerprint} in {run.checkpoint_dir}; starting from "
                      f"step 0 (checkpoints of other experiments, kept: {', '.join(others)})")
        return None
    if run.per_rank_optimizer:  # ZeRO takes one state dict per saved rank; ours are saved with the same world
        run.inner_optimizer.load_state_dict([loaded.optimizer_state] * world, load_from_fp32_weights=True)
    else:
        run.inner_optimizer.load_state_dict(loaded.optimizer_state)
    run.scheduler.load_state_dict(loaded.scheduler_state)
    if acc.scaler is not None and loaded.scaler_state is not None:
        acc.scaler.load_state_dict(loaded.scaler_state)
    run.state = loaded.state
    return path


def check_finite_state(run: Run, optimizer_state: Any) -> None:
    """Refuse to checkpoint non-finite weights or optimizer state (every process agrees: a ZeRO shard is
    checked by its rank). Reads each tensor once, at save steps only."""
    acc = run.accelerator
    bad = integrity.first_nonfinite(run.raw_model.state_dict()) if acc.is_main_process else None
    bad = bad or integrity.first_nonfinite(optimizer_state)
    flags = torch.tensor([int(bad is not None)], device=acc.device)
    if acc.num_processes > 1:
        flags = acc.gather(flags)
    if bool(flags.any()):
        raise NonFiniteStateError(f"step {run.state.step}: the weights or optimizer state are not finite "
                                  f"({bad or 'on another process'}) although every applied gradient was")


def save(run: Run) -> Path:
    """Checkpoint the run at `run.state.step` (collective: every process calls it), curves included, after
    checking that everything saved is finite."""
    acc = run.accelerator
    optimizer_state = run.inner_optimizer.state_dict()
    check_finite_state(run, optimizer_state)
    snapshot = (lambda folder: curves.snapshot_live(run.live_dir, folder)) if run.live is not None else None
    return ckpt.save_checkpoint(
        run.checkpoint_dir, run.state, run.raw_model, optimizer_state, run.scheduler.state_dict(),
        run.cfg.keep_checkpoints, rank=acc.process_index, world_size=acc.num_processes,
        barrier=acc.wait_for_everyone, per_rank_optimizer=run.per_rank_optimizer,
        scaler_state=acc.scaler.state_dict() if acc.scaler is not None else None, extra_files=snapshot)


