"""The prepare stage as one function: raw message rows -> filtered threads -> split -> tokenizer ->
tokenized, labelled, packed blocks, plus the figures that say what happened on the way."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from moechat.atomic import atomic_dir
from moechat.config.params import DataConfig, TokenizerConfig
from moechat.data import chat_format, oasst
from moechat.data.threads import build_threads, max_messages_for
from moechat.data.labels import IGNORE

TRUNCATIONS = ("truncated_turns", "truncated_reply")
DROPS = ("overlong", "prompt_too_long", "no_assistant_tokens", "special_token_in_text")


class EmptySplitError(oasst.DataError):
    """prepare would leave a split with no conversation; `metrics` holds the counts so far, which the stage
    still writes to metrics/prepare.json (they say what dropped everything)."""

    def __init__(self, message: str, metrics: dict[str, Any]):
        super().__init__(message)
        self.metrics = metrics


def prepare(raw_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path, data: DataConfig,
            tokenizer_cfg: TokenizerConfig, seq_len: int, seed: int) -> dict[str, Any]:
    """Write `out_dir/{train,val}` (packed blocks), `out_dir/conversations_{split}.jsonl` and the tokenizer
    folder; return the metrics dict for metrics/prepare.json. Raises EmptySplitError (with the metrics)
    when fewer than 2 trees have a conversation or a split loses every conversation to seq_len."""
    rows = oasst.read_raw(raw_dir).to_list()
    filtered = oasst.filter_messages(rows, data)
    threads = build_threads(filtered.kept, data.thread_policy, max_messages_for(seq_len), data.overlong)
    metrics: dict[str, Any] = {
        "messages": len(rows),
        "messages_kept": len(filtered.kept),
        "filtered": filtered.dropped,
        "orphans_parent_absent": filtered.orphans_parent_absent,
        "thread_policy": data.thread_policy,
        "threads": len(threads.conversations),
        "threads_skipped": threads.skipped,
        "threads_cut": threads.cut,  # paths longer than any seq_len can hold, cut (and merged) before tokenizing
        "seq_len": seq_len,
        "overlong": data.overlong,
    }
    if len({c["message_tree_id"] for c in threads.conversations}) < 2:
        raise EmptySplitError(f"data.source={data.source!r}: " + oasst.too_few_trees(rows, data, filtered, threads),
                              metrics)
    train_trees, val_trees = oasst.split_trees((c["message_tree_id"] for c in threads.conversations),
                                               data.val_fraction, seed)
    splits = {
        "train": [c for c in threads.conversations if c["message_tree_id"] in train_trees],
        "val": [c for c in threads.conversations if c["message_tree_id"] in val_trees],
    }
    # The role headers go in too, so `user`/`assistant` become single tokens of a trained vocabulary.
    train_texts = (f"{m['role']}\n{m['content']}" for c in splits["train"] for m in c["messages"])
    tokenizer = chat_format.load_or_train_tokenizer(tokenizer_cfg, train_texts)
    pad_id = tokenizer.convert_tokens_to_ids(chat_format.PAD)
    metrics["trees"] = {"train": len(train_trees), "val": len(val_trees)}
    metrics["tokenizer"] = {"source": tokenizer_cfg.source, "size": len(tokenizer), "pad_id": pad_id,
                            "eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id}

    with atomic_dir(out_dir) as tmp:
        for split, conversations in splits.items():
            tokens = chat_format.tokenize_conversations(conversations, tokenizer, seq_len, data.overlong, data.num_proc,
                                                 split)
            keep = [i for i, outcome in enumerate(tokens["outcome"]) if outcome not in DROPS]
            kept_tokens = tokens.select(keep)
            blocks = chat_format.build_blocks(kept_tokens["input_ids"], kept_tokens["labels"], seq_len, pad_id, seed)
            blocks.save_to_disk(str(tmp / split))
            _write_jsonl(tmp / f"conversations_{split}.jsonl", [conversations[i] for i in keep])
            metrics[split] = split_figures(tokens, len(blocks), seq_len,
                                           trees=len({conversations[i]["message_tree_id"] for i in keep}))
        empty = [split for split in splits if metrics[split]["conversations"] == 0]
        if empty:  # raised inside atomic_dir: the previous prepared folder stays as it was
            raise EmptySplitError(empty_split_message(empty[0], metrics[empty[0]], seq_len), metrics)
    chat_format.save_tokenizer(tokenizer, tokenizer_dir)
    return {**metrics, "packing_efficiency": metrics["train"]["packing_efficiency"],
            "naive_padding_efficiency": metrics["train"]["naive_padding_efficiency"]}


# What to change when one drop reason removed a whole split.
DROP_ADVICE = {
    "prompt_too_long": "raise train.seq_len (and model.n_positions) above the first user turns",
    "overlong": "set data.overlong: truncate, or raise train.seq_len",
    "no_assistant_tokens": "raise train.seq_len so that some reply fits",
    "special_token_in_text": "the conversations quote chat control tokens such as <|im_end|>; clean the source",
}


def empty_split_message(split: str, figures: dict[str, Any], seq_len: int) -> str:
    dropped = {k: v for k, v in figures["dropped"].items() if v}
    lengths = figures["length_before_fit"]
    reason = max(dropped, key=dropped.get)
    return (f"train.seq_len={seq_len}: the {split} split has 0 conversations left, all dropped "
            f"({', '.join(f'{k}={v}' for k, v in dropped.items())}; their full lengths: p50={lengths['p50']:.0f}, "
            f"max={lengths['max']} tokens); {DROP_ADVICE[reason]}")


def split_figures(tokens: Dataset, n_blocks: int, seq_len: int, trees: int) -> dict[str, Any]:
    """Counts, lengths and packing figures of one tokenized split (`tokens` from tokenize_conversations)."""
    outcomes = Counter(tokens["outcome"])
    kept = [i for i, o in enumerate(tokens["outcome"]) if o not in DROPS]
    lengths = np.array([len(ids) for ids in tokens.select(kept)["input_ids"]], dtype=np.int64)
    full = np.array(tokens["full_length"], dtype=np.int64)
    labelled = sum(sum(1 for t in labels if t != IGNORE) for labels in tokens.select(kept)["labels"])
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
