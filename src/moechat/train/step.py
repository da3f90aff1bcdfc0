"""One optimizer step over a global batch, and the validation pass: the two things the loop repeats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from moechat.errors import MoechatError
from moechat.eval.router_tally import RouterTally
from moechat.eval.val_loss import count_batches, val_sums
from moechat.train.batches import COLUMNS


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: Optional[float]
    tokens: int  # all positions processed, every process
    targets: int  # positions with a loss, every process
    router: list[dict[str, Any]]  # per MoE layer: layer, expert_share (list), dropped_share
    applied: bool = True  # False: the gradients were not finite and the step was skipped (never applied)

    def losses(self) -> dict[str, float]:
        return {"loss": self.loss, "lm_loss": self.lm_loss, "aux_loss": self.aux_loss, "z_loss": self.z_loss}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
               batches: list[dict[str, torch.Tensor]], n_targets_global: int, grad_clip: float,
               step: int) -> StepStats:
    """One optimizer step over this rank's micro-batches (forward, backward, clip, step).

    The LM loss is the mean over every target token of the global batch: each micro-batch's token sum is
    divided by N_global / (micro-batches x processes), which the accumulation (/ micro-batches) and DDP's
    gradient average (/ processes) turn back into sum / N_global."""
    world, accum = accelerator.num_processes, len(batches)
    device = accelerator.device
    norm = torch.tensor(max(n_targets_global, 1) / (accum * world), device=device, dtype=torch.float32)
    sums = torch.zeros(4, device=device)  # loss, lm, aux, z summed over micro-batches
    router = RouterTally.for_model(accelerator.unwrap_model(model).config, device)  # summed on the device
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(model):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        num_items_in_batch=norm, output_router_stats=True, use_cache=False)
            accelerator.backward(out.loss)
        sums += torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                             out.aux_loss.detach().float(), out.z_loss.detach().float()])
        router.add(out)
        del out, batch  # nothing of this micro-batch stays alive during the next one's forward
    means = accelerator.reduce(sums / accum, reduction="mean")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    applied, (loss, lm, aux, z), gn = apply_if_finite(optimizer, accelerator, means, grad_norm, step)
    shares = router.reduced(lambda t: accelerator.reduce(t, reduction="sum")).step_shares()
    tokens = sum(b["input_ids"].numel() for b in batches) * world
    return StepStats(loss, lm, aux, z, gn if applied else None, tokens, n_targets_global, shares, applied)


def apply_if_finite(optimizer: torch.optim.Optimizer, accelerator: Accelerator, means: torch.Tensor,
                    grad_norm: Optional[torch.Tensor | float], step: int
                    ) -> tuple[bool, list[float], Optional[float]]:
    """Step the optimizer only when the loss and the gradient norm are finite: (applied, the four loss means,
    the norm or None when the engine reports none).

    One host sync per optimizer step (the loss means and the norm come over together; per micro-batch there
    is none). The norm is of the gradients every process holds after DDP's all-reduce (a NaN anywhere is a NaN
    everywhere), so all ranks decide alike. fp16's GradScaler and DeepSpeed (bf16/fp16/fp32, ZeRO-2 and
    offload) already skip a non-finite step themselves, DeepSpeed inside `backward`: for them this only reads
    `optimizer_step_was_skipped`. A non-finite loss stops at once: the forward itself diverged."""
    norm = torch.full((1,), float("nan"), device=means.device) if grad_norm is None \
        else torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1).to(means.device)
    *losses, gn = torch.cat([means.float(), norm]).tolist()
    if not all(map(math.isfinite, losses)):
        optimizer.zero_grad(set_to_none=True)
        loss, lm, aux, z = losses
        raise NonFiniteLossError(f"step {step}: non-finite loss (loss={loss}, lm={lm}, aux={aux}, z={z})")
    finite = grad_norm is None or math.isfinite(gn)  # no norm reported: the engine's own check decides
    if finite or accelerator.scaler is not None:  # the scaler skips a non-finite step and lowers its scale
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    applied = finite and not accelerator.optimizer_step_was_skipped
    if not finite and accelerator.distributed_type == DistributedType.DEEPSPEED \
            and not accelerator.optimizer_step_was_skipped:
        raise NonFiniteStateError(f"step {step}: DeepSpeed applied a step whose gradient norm was {gn}; its "
                                  f"overflow check is off (check the DeepSpeed JSON)")
    return applied, losses, None if grad_norm is None else gn


def validate(model: torch.nn.Module, accelerator: Accelerator, val: dict[str, torch.Tensor], micro_batch: int,
             max_batches: int) -> dict[str, float]:
    """Token-weighted LM loss over the first `max_batches` val micro-batches (fixed rows, shared over
    processes) plus the mean router losses. The loss is chunked (`val_sums` without accuracy): a validation
    pass never holds the [B, T, V] logits."""
    rank, world = accelerator.process_index, accelerator.num_processes
    n_batches = count_batches(val["input_ids"].shape[0], micro_batch, max_batches)
    batches = ({c: val[c][b * micro_batch:(b + 1) * micro_batch] for c in COLUMNS}
               for b in range(rank, n_batches, world))
    model.eval()
    sums = val_sums(model, batches, accelerator.device).reduced(lambda t: accelerator.reduce(t, reduction="sum"))
    model.train()
    s = sums.values()
    return {"lm_loss": s["nll"] / max(s["targets"], 1), "aux_loss": s["aux_loss"] / max(s["batches"], 1),
            "z_loss": s["z_loss"] / max(s["batches"], 1)}


class NonFiniteLossError(MoechatError, RuntimeError):
    """The loss went NaN/inf; the message names the step and the checkpoint that survives."""


class NonFiniteGradientsError(NonFiniteLossError):
    """train.max_consecutive_skips optimizer steps in a row had non-finite gradients (none was applied)."""


class NonFiniteStateError(NonFiniteLossError):
    """Weights or optimizer state went non-finite despite finite gradients: nothing is saved from them."""


