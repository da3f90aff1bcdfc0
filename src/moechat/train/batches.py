"""The packed train/val blocks in memory, and our own seeded, resumable order over them.

The data order is ours (a seeded permutation per epoch and a cursor into it), so a resumed run sees exactly
the rows an uninterrupted run would, under any engine."""

from __future__ import annotations

from pathlib import Path

import torch

from moechat.data.labels import target_mask
from moechat.train import checkpoint as ckpt
from moechat.train.schedule import steps_per_epoch


COLUMNS = ("input_ids", "labels", "position_ids")


def load_blocks(data_dir: Path, split: str, seq_len: int) -> dict[str, torch.Tensor]:
    """The packed blocks of `split` as int64 tensors [rows, seq_len] (held in memory: OASST is small)."""
    from moechat.data.chat_format import PreparedDataError, load_packed

    path = Path(data_dir) / split
    ds = load_packed(data_dir, split)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise PreparedDataError(f"{path}: missing columns {missing} (has {ds.column_names}); rerun the prepare stage")
    blocks = {c: t.long() for c, t in ds.with_format("torch", columns=list(COLUMNS))[:].items()}
    if blocks["input_ids"].ndim != 2 or blocks["input_ids"].shape[1] != seq_len:
        raise PreparedDataError(f"{path}: blocks have shape {tuple(blocks['input_ids'].shape)}, expected [rows, "
                                f"train.seq_len={seq_len}]; rerun `dvc repro prepare` after changing train.seq_len")
    largest = int(blocks["position_ids"].max()) if blocks["position_ids"].numel() else 0
    if largest >= seq_len:  # checked here, on the host, so the training step never waits for the device
        raise PreparedDataError(f"{path}: position ids reach {largest}, past train.seq_len={seq_len}; rerun "
                                f"`dvc repro prepare`")
    return blocks


class BatchStream:
    """Seeded, resumable order over the train blocks: epoch e visits rows in `randperm(seed + e)` order,
    one global batch (micro_batch x grad_accum x world) per optimizer step; a tail shorter than a global
    batch is skipped (every step sees the same number of rows). At least one global batch of rows is
    `build_schedule`'s check, which runs first."""

    def __init__(self, n_rows: int, global_batch: int, seed: int):
        assert n_rows >= global_batch, "build_schedule refuses fewer rows than one global batch"
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n_rows, self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._perm

    def next_rows(self, cursor: ckpt.Cursor) -> tuple[torch.Tensor, ckpt.Cursor]:
        """Row ids of the next global batch and the cursor after it."""
        epoch, pos = cursor.epoch, cursor.position
        if pos + self.global_batch > self.n_rows:
            epoch, pos = epoch + 1, 0
        rows = self.permutation(epoch)[pos:pos + self.global_batch]
        return rows, ckpt.Cursor(epoch, pos + self.global_batch)


def micro_batches(blocks: dict[str, torch.Tensor], rows: torch.Tensor, micro_batch: int, rank: int,
                  world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of a global batch: micro-batch i of rank r holds rows[(i*world + r)*mb:...],
    so one process with grad_accum=a*w and w processes with grad_accum=a see the same row groups."""
    n_micro = rows.numel() // (micro_batch * world)
    out = []
    for i in range(n_micro):
        start = (i * world + rank) * micro_batch
        idx = rows[start:start + micro_batch]
        out.append({c: blocks[c][idx] for c in COLUMNS})
    return out


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the model's shift."""
    return int(target_mask(labels).sum())


