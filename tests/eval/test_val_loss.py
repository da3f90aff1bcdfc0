"""The one validation pass: training's validation and the evaluate stage sum the same loss, and training's never
holds the full [B, T, V] logits."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from accelerate import Accelerator

from moechat.eval.evaluate import evaluate_lm, iter_batches
from moechat.train.batches import COLUMNS
from moechat.train.step import validate
from moechat.eval.val_loss import count_batches, val_sums
from tests.support.tiny import conversations, packed, tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_rows():
    tok = tiny_tokenizer()
    return tiny_model(tok, seed=4), packed(tok, conversations(9))


def with_head_lengths(model, run: Callable[[], Any]) -> tuple[Any, list[int]]:
    """What `run()` returns, and the sequence length of every lm_head output meanwhile."""
    lengths: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    try:
        return run(), lengths
    finally:
        hook.remove()


def test_chunked_and_full_logits_passes_sum_the_same_loss(model_and_rows):
    model, rows = model_and_rows
    model.eval()
    n = count_batches(len(rows), 2)
    chunked, chunked_lengths = with_head_lengths(model, lambda: val_sums(model, iter_batches(rows, 2, None), CPU))
    full, full_lengths = with_head_lengths(
        model, lambda: val_sums(model, iter_batches(rows, 2, None), CPU, accuracy=True))
    a, b = chunked.values(), full.values()
    assert chunked_lengths == [1] * n and full_lengths == [128] * n
    assert a["targets"] == b["targets"] > 0 and a["batches"] == b["batches"] == n
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert a["correct"] == 0 and 0 <= b["correct"] <= b["targets"]


def test_training_validation_is_the_evaluate_stage_loss_without_full_logits(model_and_rows):
    model, rows = model_and_rows
    val = {c: rows[:][c].long() for c in COLUMNS}
    model.train()
    got, lengths = with_head_lengths(model, lambda: validate(model, Accelerator(cpu=True), val, 2, 100))
    assert model.training  # validation hands the model back in train mode
    assert set(lengths) == {1}  # logits_to_keep=1: the loss is chunked, the [B, T, V] logits never exist
    assert got["lm_loss"] == pytest.approx(evaluate_lm(model, rows, batch_size=3)["loss"], rel=1e-6)
