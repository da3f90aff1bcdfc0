"""prepare stage: data/raw message rows -> filtered threads, train/val split by tree, tokenizer, packed blocks.

Writes data/prepared/{train,val} (packed, `train.seq_len` tokens per row), conversations_{split}.jsonl,
data/tokenizer/ (with the ChatML chat_template) and metrics/prepare.json (written with its counts also when the
stage refuses because a split would be empty).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage

# What `dvc metrics` compares; filters, length percentiles, truncations and drops go to --run-facts.
METRICS = ("messages", "messages_kept", "threads", "threads_cut.paths_cut", "threads_cut.paths_merged",
           "packing_efficiency", "naive_padding_efficiency",
           "train.conversations", "train.tokens", "train.assistant_token_share", "train.blocks",
           "val.conversations", "val.tokens", "val.blocks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", type=Path, required=True, help="folder written by the download stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for packed splits and conversations")
    parser.add_argument("--tokenizer-out", type=Path, required=True, help="folder for the chat tokenizer")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file for the prepare figures")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    from moechat.config.params import load_params
    from moechat.data.prepare import EmptySplitError, prepare
    from moechat.atomic import write_json
    from moechat.metrics import write_stage_report

    params = load_params(args.params)
    try:
        metrics = prepare(args.raw, args.out, args.tokenizer_out, params.data, params.tokenizer,
                          seq_len=params.train.seq_len, seed=params.seed)
    except EmptySplitError as err:
        write_json(args.metrics, err.metrics)  # the counts say what dropped everything
        raise
    write_stage_report(metrics, METRICS, args.metrics, args.run_facts)
    train, val, cut = metrics["train"], metrics["val"], metrics["threads_cut"]
    cut_note = (f" ({cut['paths_cut']} paths longer than {cut['max_messages']} messages cut there, "
                f"{cut['paths_merged']} of them merged as the same conversation)" if cut["paths_cut"] else "")
    print(f"prepare: {metrics['threads']} threads ({metrics['thread_policy']}){cut_note} from "
          f"{metrics['messages_kept']}/{metrics['messages']} messages; train {train['conversations']} conv "
          f"{train['tokens']} tok "
          f"{train['blocks']} blocks, val {val['conversations']} conv {val['tokens']} tok; packing "
          f"{metrics['packing_efficiency']:.1%} vs naive {metrics['naive_padding_efficiency']:.1%}")
    return 0


if __name__ == "__main__":
    run_stage(main)
