"""The validation loss, computed in one place: the model over val micro-batches, summed on the device.

Training's periodic validation (`moechat.train.step.validate`, on every process, then reduced by accelerate) and
the evaluate and quantize stages (`moechat.eval.evaluate.evaluate_lm`) both run `val_sums`. Every figure is a sum
over target tokens or batches, never a mean of batch means, so a result does not depend on the batch size
or the number of processes; the sums stay on the device until the caller reads them (no host sync per
batch). The LM loss is the model's own (`MoeChatForCausalLM.lm_loss` / `chunked_lm_loss` with
`num_items_in_batch=1`, i.e. the summed NLL), so there is no second cross-entropy to drift from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from moechat.data.labels import target_mask
from moechat.eval.router_tally import RouterTally

SUMS = ("nll", "targets", "correct", "aux_loss", "z_loss", "batches")


@dataclass(frozen=True)
class ValSums:
    """Sums over the val batches one process ran, in float64 on the device, in the order of `SUMS`: the
    NLL of the target tokens (nats), the target tokens, the correct top-1 next-token predictions (0 unless
    counted), the router aux and z losses (one value per batch) and the batches."""

    totals: torch.Tensor  # [len(SUMS)]

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> ValSums:
        """The sums after `reduce` (e.g. a sum over processes), applied once to all of them."""
        return ValSums(reduce(self.totals))

    def values(self) -> dict[str, float]:
        """The sums as Python floats (one host sync)."""
        return dict(zip(SUMS, self.totals.tolist()))


def count_batches(n_rows: int, batch_size: int, max_batches: Optional[int] = None) -> int:
    """Batches of `batch_size` consecutive rows (the last one may be shorter), `max_batches` at most."""
    n = math.ceil(n_rows / batch_size)
    return n if max_batches is None else min(n, max_batches)


@torch.no_grad()
def val_sums(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             accuracy: bool = False, router: Optional[RouterTally] = None) -> ValSums:
    """Run `model` over `batches` of packed rows (`input_ids`, `labels`, `position_ids`, each [B, T]) and sum
    what `ValSums` holds on `device`. The caller puts the model in eval mode (a DeepSpeed engine does not
    report it, so it is not checked here).

    Without `accuracy` the model computes the loss chunked (`logits_to_keep=1`): the [B, T, V] logits are
    never held, which a validation loop inside training needs. With it the full logits are kept for the
    top-1 predictions, and the loss comes from them. With `router` (a RouterTally) each batch's routing is
    added to it."""
    totals = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
    zero, one = totals.new_zeros(()), totals.new_ones(())
    for batch in batches:
        labels_BT = batch["labels"].to(device)
        # labels mark the pad tail of packed rows, which the model then leaves unrouted and uncounted
        out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                    labels=labels_BT, num_items_in_batch=1, use_cache=False, logits_to_keep=0 if accuracy else 1,
                    output_router_stats=router is not None)
        keep_BT = target_mask(labels_BT)
        correct = ((out.logits[:, :-1].argmax(-1) == labels_BT[:, 1:]) & keep_BT).sum() if accuracy else zero
        totals += torch.stack([t.double() for t in (out.lm_loss, keep_BT.sum(), correct, out.aux_loss, out.z_loss)]
                              + [one])
        if router is not None:
            router.add(out)
    return ValSums(totals)
