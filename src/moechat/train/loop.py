"""The training loop: `train -> train_loop -> train_step`, one loop for every engine.

accelerate is the one seam for the engine (moechat.train.engine): device placement, autocast (bf16/fp16 with
a GradScaler), gradient accumulation, DDP (NCCL, or gloo on CPU) and DeepSpeed ZeRO-2 all come from
`Accelerator`, so the loop below reads the same on one CPU and on many GPUs. The run's state and its
checkpoints live in moechat.train.run; the data order in moechat.train.batches.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from moechat.config.params import TrainConfig
from moechat.errors import MoechatError
from moechat.train import checkpoint as ckpt
from moechat.train import curves
from moechat.train.batches import count_targets, micro_batches
from moechat.train.folder_lock import exclusive_folder
from moechat.train.hardware import device_peak_flops, peak_memory
from moechat.train.parent_watch import ParentGone
from moechat.train.run import Run, resume, save, save_final, setup
from moechat.train.step import NonFiniteGradientsError, NonFiniteLossError, StepStats, train_step, validate


class TrainingInterrupted(MoechatError):
    """Ctrl-C during training; the message says from which step `dvc repro` resumes."""

    exit_code = 130  # the shell's code for SIGINT


def interrupted(checkpoint_dir: Path, fp: str, step: int, total_steps: int) -> TrainingInterrupted:
    """The one line for a Ctrl-C after `step` finished steps (what the bar shows): what survives and what the
    next `dvc repro` does."""
    return TrainingInterrupted(f"interrupted after step {step}/{total_steps}{resume_hint(checkpoint_dir, fp)}")


def resume_hint(checkpoint_dir: Path, fp: str) -> str:
    """"; `dvc repro` resumes from step N (checkpoint ...)", or the fresh start when nothing was saved yet."""
    last = ckpt.latest_checkpoint(checkpoint_dir, fp)
    if last is None:
        return " before the first checkpoint; `dvc repro` starts this experiment again from step 0"
    saved = int(ckpt.STEP_DIR.match(last.name).group(1))
    return f"; `dvc repro` resumes from step {saved} (checkpoint {last})"


def train(cfg: TrainConfig, seed: int, data_dir: Path, init_dir: Path, checkpoint_dir: Path, out_dir: Path,
          live_dir: Path) -> dict[str, Any]:
    """Train the init model on the packed blocks, resuming from the newest checkpoint of this experiment.

    Side effects: checkpoints under `checkpoint_dir/<fingerprint>/`, DVCLive curves under `live_dir`, the
    final model in `out_dir`. Returns the metrics for metrics/train.json."""
    wall_start = time.perf_counter()
    run = setup(cfg, seed, data_dir, init_dir, checkpoint_dir, live_dir)  # reads only: refusals write nothing
    # one trainer per checkpoint folder (rank 0 holds the lock for all ranks)
    with exclusive_folder(checkpoint_dir) if run.accelerator.is_main_process else nullcontext():
        return train_run(run, init_dir, out_dir, wall_start)


def train_run(run: Run, init_dir: Path, out_dir: Path, wall_start: float) -> dict[str, Any]:
    """`train` once the checkpoint folder is this run's alone: resume, loop, final model, summary."""
    resumed_from = resume(run)
    if run.accelerator.is_main_process:
        run.live = curves.open_live(run.live_dir, resumed_from, run.state.step, run.accelerator.print)
    start_step = run.state.step
    if resumed_from is not None:
        ckpt.restore_rank_rng(resumed_from, run.accelerator.process_index)  # last: the loop continues bit-exact
        run.accelerator.print(f"resuming {run.fingerprint} from {resumed_from} "
                              f"(step {start_step}/{run.schedule.total_steps})")
    try:
        with one_line_errors(run):
            train_loop(run)
    finally:
        if run.live is not None:
            run.live.end()
    # a checkpoint from before val losses were kept in it has none
    val = run.state.last_val or validate(run.model, run.accelerator, run.val_blocks, run.cfg.micro_batch_size,
                                         run.cfg.eval_batches)
    save_final(run.model, run.accelerator, init_dir, out_dir)
    return summary(run, val, start_step, time.perf_counter() - wall_start)


@contextmanager
def one_line_errors(run: Run) -> Iterator[None]:
    """NaN/inf, CUDA OOM and Ctrl-C inside the loop become one-line errors saying what survives and what to do."""
    try:
        yield
    except NonFiniteLossError as err:
        last = ckpt.last_good_checkpoint(run.checkpoint_dir, run.fingerprint)
        raise type(err)(f"{err}; stopped without saving. Last good checkpoint: {last or 'none'}. "
                        f"Lower train.lr, or use train.precision: bf16/fp32 if this was fp16") from None
    except ParentGone as err:
        raise ParentGone(f"{err}{resume_hint(run.checkpoint_dir, run.fingerprint)}") from None
    except torch.OutOfMemoryError as err:
        raise run.oom_error(err, f"at step {run.state.step + 1}") from err
    except KeyboardInterrupt:
        raise interrupted(run.checkpoint_dir, run.fingerprint, run.state.step, run.schedule.total_steps) from None


def train_loop(run: Run) -> None:
    """Optimizer steps from `run.state.step` to the schedule's end: log, validate and checkpoint on schedule.
    `run.state` is advanced after every step, so an error names the step it happened in."""
    cfg, acc, live = run.cfg, run.accelerator, run.live
    rank, world, total_steps = acc.process_index, acc.num_processes, run.schedule.total_steps
    bar = tqdm(total=total_steps, initial=run.state.step, disable=None if acc.is_main_process else True,
               desc="train", unit="step")  # None: shown in a terminal, off in a log
    run.model.train()
    try:
        while run.state.step < total_steps:
            stop_if_orphaned(run)
            state = run.state
            step = state.step + 1
            rows, cursor = run.stream.next_rows(state.cursor)
            batches = micro_batches(run.train_blocks, rows, cfg.micro_batch_size, rank, world)
            n_targets = count_targets(run.train_blocks["labels"][rows])
            t0 = time.perf_counter()
            stats = train_step(run.model, run.optimizer, acc, batches, n_targets, cfg.grad_clip, step)
            lr = run.scheduler.get_last_lr()[0]
            if stats.applied:  # a skipped step (ours, fp16's GradScaler's or DeepSpeed's) holds the schedule
                run.scheduler.step()
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            run.state = advance(state, step, cursor, stats, dt)
            if live is not None:
                curves.log_train_step(live, step, {**stats.losses(), "lr": lr, "tokens_per_s": stats.tokens / dt,
                                                   "grad_norm": stats.grad_norm,
                                                   "skipped_steps": run.state.skipped_steps}, stats.router)
                curves.log_expert_shares(run.live_dir, step, stats.router)
            stop_after_consecutive_skips(run.state, cfg.max_consecutive_skips)
            if step % cfg.eval_every == 0 or step == total_steps:
                val = validate(run.model, acc, run.val_blocks, cfg.micro_batch_size, cfg.eval_batches)
                run.state = dataclasses.replace(run.state, last_val={**val, "step": step})
                if live is not None:
                    curves.log_val(live, step, val)
            if live is not None:
                live.next_step()
            if step % cfg.save_every == 0 or step == total_steps:
                save(run)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}")
    finally:
        bar.close()


def advance(state: ckpt.TrainState, step: int, cursor: ckpt.Cursor, stats: StepStats, dt: float) -> ckpt.TrainState:
    """The state after `step`: counters, losses and the skip tally (a skipped step still consumed its rows,
    as in Megatron and DeepSpeed, so a resumed run sees the same data as an uninterrupted one)."""
    skipped = 0 if stats.applied else 1
    return dataclasses.replace(
        state, step=step, cursor=cursor, tokens_seen=state.tokens_seen + stats.tokens,
        target_tokens_seen=state.target_tokens_seen + stats.targets, train_seconds=state.train_seconds + dt,
        last_losses=stats.losses(), skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=(state.consecutive_skips + 1) if skipped else 0)


def stop_after_consecutive_skips(state: ckpt.TrainState, limit: int) -> None:
    if state.consecutive_skips >= limit:
        first = state.step - state.consecutive_skips + 1
        raise NonFiniteGradientsError(
            f"step {state.step}: non-finite gradients in {state.consecutive_skips} consecutive steps ({first}-"
            f"{state.step}, train.max_consecutive_skips={limit}); none of them was applied")


def stop_if_orphaned(run: Run) -> None:
    """At a step boundary: stop when the process that started us is gone (single process; under a launcher the
    ranks would have to agree first, and the launcher stops its workers itself)."""
    if run.accelerator.num_processes == 1 and run.parent.gone():
        raise ParentGone(f"the process that started this trainer (pid {run.parent.parent}, e.g. `dvc repro`) is "
                         f"gone; stopped at step {run.state.step}/{run.schedule.total_steps} without writing the "
                         f"final model")


def summary(run: Run, val: dict[str, float], start_step: int, wall_seconds: float) -> dict[str, Any]:
    """The metrics of metrics/train.json: progress, losses, throughput, MFU, memory and the run's facts."""
    state, cfg, acc = run.state, run.cfg, run.accelerator
    world, last = acc.num_processes, state.last_losses
    flops_per_token = run.raw_model.flops_per_token(cfg.seq_len)
    device_name, peak, mfu_note = device_peak_flops(acc.device, cfg.precision)
    mem_gb, mem_kind = peak_memory(acc.device)
    tokens_per_s = state.tokens_seen / state.train_seconds if state.train_seconds else None
    mfu = flops_per_token * tokens_per_s / (peak * world) if peak and tokens_per_s else None
    return {
        "steps": state.step, "total_steps": run.schedule.total_steps, "warmup_steps": run.schedule.warmup_steps,
        "resumed_from_step": start_step or None, "fingerprint": run.fingerprint,
        "loss": last.get("loss"), "lm_loss": last.get("lm_loss"), "aux_loss": last.get("aux_loss"),
        "z_loss": last.get("z_loss"), "val_lm_loss": val["lm_loss"], "tokens_seen": state.tokens_seen,
        "target_tokens_seen": state.target_tokens_seen, "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token, "mfu": mfu, "device": device_name, "processes": world,
        "peak_flops_per_device": peak, "mfu_note": mfu_note, "peak_memory_gb": mem_gb, "peak_memory_kind": mem_kind,
        "precision": cfg.precision, "optimizer": "deepspeed_cpu_adam" if run.offload else cfg.optimizer,
        "deepspeed": cfg.deepspeed, "parameters": run.raw_model.parameter_counts(),
        "skipped_steps": state.skipped_steps,
    }
