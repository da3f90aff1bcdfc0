"""The prepare stage as one function: raw message rows -> filtered threads -> split -> tokenizer ->
tokenized, labelled, packed blocks, plus the figures that say what happened on the way."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from moechat.io import atomic_dir
from moechat.config import DataConfig, TokenizerConfig
from moechat.data import chat, oasst

TRUNCATIONS = ("truncated_turns", "truncated_reply")
DROPS = ("overlong", "prompt_too_long", "no_assistant_tokens", "special_token_in_text")


def prepare(raw_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path, data: DataConfig,
            tokenizer_cfg: TokenizerConfig, seq_len: int, seed: int) -> dict[str, Any]:
    """Write `out_dir/{train,val}` (packed blocks), `out_dir/conversations_{split}.jsonl` and the tokenizer
    folder; return the metrics dict for metrics/prepare.json."""
    rows = oasst.read_raw(raw_dir).to_list()
    filtered = oasst.filter_messages(rows, data)
    threads = oasst.build_threads(filtered.kept, data.thread_policy)
    train_trees, val_trees = oasst.split_trees((c["message_tree_id"] for c in threads.conversations),
                                               data.val_fraction, seed)
    splits = {
        "train": [c for c in threads.conversations if c["message_tree_id"] in train_trees],
        "val": [c for c in threads.conversations if c["message_tree_id"] in val_trees],
    }
    # The role headers go in too, so `user`/`assistant` become single tokens of a trained vocabulary.
    train_texts = (f"{m['role']}\n{m['content']}" for c in splits["train"] for m in c["messages"])
    tokenizer = chat.load_or_train_tokenizer(tokenizer_cfg, train_texts)
    pad_id = tokenizer.convert_tokens_to_ids(chat.PAD)

    split_metrics = {}
    with atomic_dir(out_dir) as tmp:
        for split, conversations in splits.items():
            tokens = chat.tokenize_conversations(conversations, tokenizer, seq_len, data.overlong, data.num_proc,
                                                 split)
            keep = [i for i, outcome in enumerate(tokens["outcome"]) if outcome not in DROPS]
            kept_tokens = tokens.select(keep)
            blocks = chat.build_blocks(kept_tokens["input_ids"], kept_tokens["labels"], seq_len, pad_id, seed)
            blocks.save_to_disk(str(tmp / split))
            _write_jsonl(tmp / f"conversations_{split}.jsonl", [conversations[i] for i in keep])
            split_metrics[split] = split_figures(tokens, len(blocks), seq_len,
                                                 trees=len({conversations[i]["message_tree_id"] for i in keep}))
    chat.save_tokenizer(tokenizer, tokenizer_dir)

    return {
        "messages": len(rows),
        "messages_kept": len(filtered.kept),
        "filtered": filtered.dropped,
        "orphans_parent_absent": filtered.orphans_parent_absent,
        "thread_policy": data.thread_policy,
        "threads": len(threads.conversations),
        "threads_skipped": threads.skipped,
        "trees": {"train": len(train_trees), "val": len(val_trees)},
        "tokenizer": {"source": tokenizer_cfg.source, "size": len(tokenizer), "pad_id": pad_id,
                      "eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id},
        "seq_len": seq_len,
        "overlong": data.overlong,
        "packing_efficiency": split_metrics["train"]["packing_efficiency"],
        "naive_padding_efficiency": split_metrics["train"]["naive_padding_efficiency"],
        **split_metrics,
    }


def split_figures(tokens: Dataset, n_blocks: int, seq_len: int, trees: int) -> dict[str, Any]:
    """Counts, lengths and packing figures of one tokenized split (`tokens` from tokenize_conversations)."""
    outcomes = Counter(tokens["outcome"])
    kept = [i for i, o in enumerate(tokens["outcome"]) if o not in DROPS]
    lengths = np.array([len(ids) for ids in tokens.select(kept)["input_ids"]], dtype=np.int64)
    full = np.array(tokens["full_length"], dtype=np.int64)
    labelled = sum(sum(1 for t in labels if t != chat.IGNORE) for labels in tokens.select(kept)["labels"])
    n_tokens = int(lengths.sum())
    slots = n_blocks * seq_len
    return {
        "conversations": len(kept),
        "trees": trees,
        "tokens": n_tokens,
        "assistant_tokens": labelled,
        "assistant_token_share": round(labelled / n_tokens, 4) if n_tokens else 0.0,
        "length_before_fit": _percentiles(full),
        "length_after_fit": _percentiles(lengths),
        "truncations": {name: outcomes.get(name, 0) for name in TRUNCATIONS},
        "dropped": {name: outcomes.get(name, 0) for name in DROPS},
        "blocks": n_blocks,
        # useful tokens / slots: packed blocks vs one conversation per padded seq_len row (the naive recipe)
        "packing_efficiency": round(n_tokens / slots, 4) if slots else 0.0,
        "naive_padding_efficiency": round(n_tokens / (len(kept) * seq_len), 4) if len(kept) else 0.0,
    }


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": int(values.max()),
            "mean": round(float(values.mean()), 1)}


def _write_jsonl(path: Path, conversations: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps({"message_tree_id": conversation["message_tree_id"],
                                "messages": conversation["messages"]}, ensure_ascii=False) + "\n")
