"""A tiny training workspace (models/init + data/prepared of learnable counting rows) and the ways the train
tests run it: in process through `train`, or as the stage script the way dvc.yaml runs it."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from datasets import Dataset

from moechat.config.params import TrainConfig, load_params
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
from moechat.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


VOCAB, PAD, SEQ = 48, 47, 32


TINY_TRAIN = dict(seq_len=SEQ, micro_batch_size=4, grad_accum=1, epochs=1, max_steps=12, lr=3e-3, min_lr=3e-4,
                  warmup_steps=2, warmup_ratio=None, optimizer="adamw", precision="fp32", gradient_checkpointing=False,
                  eval_every=4, eval_batches=2, save_every=4, keep_checkpoints=2)


REFERENCE_TRAIN = load_params(ROOT / "params.yaml").train


def tiny_cfg(**overrides) -> TrainConfig:
    return dataclasses.replace(REFERENCE_TRAIN, **{**TINY_TRAIN, **overrides})


def make_blocks(n_rows: int, seed: int) -> Dataset:
    """Packed rows of 'conversations' that count upward mod PAD from a random start: learnable, so the loss
    must fall. Each row holds 2-3 documents (position ids restart) and a pad tail with labels -100."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for _ in range(n_rows):
        ids, labels, pos = [], [], []
        while len(ids) < SEQ - 6:
            n = int(torch.randint(6, 14, (1,), generator=g))
            n = min(n, SEQ - 4 - len(ids))
            start = int(torch.randint(0, PAD, (1,), generator=g))
            doc = [(start + i) % PAD for i in range(n)]
            ids += doc
            labels += [-100] + doc[1:]
            pos += list(range(n))
        tail = SEQ - len(ids)
        ids += [PAD] * tail
        labels += [-100] * tail
        pos += list(range(tail))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
    return Dataset.from_dict(rows)


def run_inprocess(ws: Path, run: str, cfg: TrainConfig, seed: int = 7) -> dict:
    out = ws / run
    return train(cfg, seed, ws / "data/prepared", ws / "models/init", out / "checkpoints", out / "final",
                 out / "live")


def live_files(live_dir: Path) -> dict[str, str]:
    """Every curve file under the DVCLive folder's plots/, by relative path."""
    return {p.relative_to(live_dir).as_posix(): p.read_text() for p in sorted((live_dir / "plots").rglob("*"))
            if p.is_file()}


def expert_share_rows(live_dir: Path, layer: int) -> list[dict[str, str]]:
    with open(live_dir / "plots/expert_shares" / f"layer{layer}.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def logged(live_dir: Path, name: str = "train/loss") -> list[tuple[int, float]]:
    with open(live_dir / "plots/metrics" / f"{name}.tsv") as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def write_params(ws: Path, name: str, **train_overrides) -> Path:
    """A params.yaml for the stage script: the repo's params with the tiny train section."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update({**TINY_TRAIN, **train_overrides})
    raw["seed"] = 7
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_cmd(ws: Path, run: str, params: Path, launcher: list[str] | None = None) -> list[str]:
    out = ws / run
    return (launcher or [sys.executable]) + [
        str(ROOT / "stages/train.py"), "--params", str(params), "--data", str(ws / "data/prepared"),
        "--init", str(ws / "models/init"), "--checkpoints", str(out / "checkpoints"), "--out", str(out / "final"),
        "--live", str(out / "live"), "--metrics", str(out / "train.json")]


def stage_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def build_workspace(root: Path, blocks: Callable[[int, int], Dataset] = make_blocks) -> Path:
    """models/init (a tiny MoE + a tokenizer file) and data/prepared (packed train/val rows from `blocks(n_rows,
    seed)`)."""
    torch.manual_seed(0)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                             n_inner=64, num_experts=4, num_experts_per_tok=2, moe_every=2,
                                             pad_token_id=PAD, eos_token_id=PAD - 1))
    model.save_pretrained(root / "models/init")
    (root / "models/init/tokenizer_config.json").write_text(json.dumps({"model_max_length": SEQ}))
    blocks(64, 1).save_to_disk(str(root / "data/prepared/train"))
    blocks(16, 2).save_to_disk(str(root / "data/prepared/val"))
    return root
