"""The tiny model exported for the serving tests and benchmarks: shapes vLLM's CPU backend accepts.

vLLM's CPU attention needs a head size of 32 or more and its fused-MoE kernel hidden and expert widths that
are multiples of 32, so this is the release tests' tiny model (`support.tiny`) with 2 heads of 32 and
4 blocks (blocks 1 and 3 MoE: dense and MoE blocks both served), trained for a few steps on the tiny chats
so that greedy decoding has clear winners, then written by the export stage's own `export_model`.
The one place the serving tests and `bench/serving.py` build their model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moechat.config.params import load_params
from moechat.release.export import export_model
from tests.support.tiny import conversations, packed, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SERVING_DIMS = dict(n_embd=64, n_head=2, n_inner=128, n_layer=4, moe_every=2, num_experts=4,
                    num_experts_per_tok=2, n_positions=256)


def export_serving_tiny(folder: Path, steps: int = 40, seed: int = 0, **overrides: Any) -> Path:
    """Train the serving-shaped tiny model `steps` AdamW steps on the tiny chats and export it to `folder`.

    `overrides` change SERVING_DIMS (the benchmark widens the model). Returns `folder`."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed, **{**SERVING_DIMS, **overrides})
    if steps:
        _train(model, tokenizer, steps)
    export_model(model.eval(), tokenizer, load_params(ROOT / "params.yaml"), {}, Path(folder))
    return Path(folder)


def _train(model: torch.nn.Module, tokenizer: Any, steps: int) -> None:
    """Full-batch AdamW on the packed tiny chats (seconds on a CPU)."""
    batch = packed(tokenizer, conversations(20), seq_len=128)[:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
