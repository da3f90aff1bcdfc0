"""Data benchmark: packing vs pad-to-seq_len, real tokens per optimizer step, prepare throughput.

Runs the download + prepare library functions (the stages' code path) on the bundled fixture with the tiny
preset, and on the real OASST1 sample shipped in tests/fixtures/oasst1_en_100 with the real GPT-2 BPE and
the reference params. Prints one table and writes metrics/bench_data.json.

    python bench/data.py [--out metrics/bench_data.json] [--real PATH] [--num-proc N]
"""

from __future__ import annotations

import argparse
from datetime import date
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from moechat.config.params import Params, load_params
from moechat.data.fixture import gpt2_tokenizer_dir
from moechat.data.oasst import download
from moechat.data.prepare import prepare
from moechat.atomic import write_json
from benchlib import device_name

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "fixtures" / "oasst1_en_100" / "oa_export_en_100.trees.jsonl"


def repo_relative(source: str) -> str:
    """A source inside the repository as a repository path, so the results file names no local folder."""
    path = Path(source).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else source


def bench_one(name: str, params: Params, work: Path) -> dict:
    """Time download and prepare on `params`, and turn prepare's figures into tokens per step."""
    t0 = time.perf_counter()
    down = download(params.data, work / "raw")
    t1 = time.perf_counter()
    prep = prepare(work / "raw", work / "prepared", work / "tokenizer", params.data, params.tokenizer,
                   seq_len=params.train.seq_len, seed=params.seed)
    t2 = time.perf_counter()
    train, t = prep["train"], params.train
    slots_per_step = t.micro_batch_size * t.grad_accum * t.seq_len
    return {
        "name": name,
        "source": repo_relative(params.data.source),
        "tokenizer": params.tokenizer.source if params.tokenizer.source == "train" else "gpt2 (local BPE files)",
        "thread_policy": params.data.thread_policy,
        "seq_len": t.seq_len,
        "messages": down["rows"],
        "conversations_train": train["conversations"],
        "tokens_train": train["tokens"],
        "assistant_token_share": train["assistant_token_share"],
        "truncations": train["truncations"],
        "packing_efficiency": train["packing_efficiency"],
        "naive_padding_efficiency": train["naive_padding_efficiency"],
        "packing_gain": round(train["packing_efficiency"] / train["naive_padding_efficiency"], 3),
        # real (non-pad) tokens in one optimizer step of micro_batch_size * grad_accum rows
        "real_tokens_per_step_packed": round(slots_per_step * train["packing_efficiency"]),
        "real_tokens_per_step_naive": round(slots_per_step * train["naive_padding_efficiency"]),
        "steps_per_epoch_packed": -(-train["blocks"] // (t.micro_batch_size * t.grad_accum)),
        "steps_per_epoch_naive": -(-train["conversations"] // (t.micro_batch_size * t.grad_accum)),
        "download_s": round(t1 - t0, 2),
        "prepare_s": round(t2 - t1, 2),
        "prepare_messages_per_s": round(down["rows"] / (t2 - t1), 1),
        "prepare_tokens_per_s": round((train["tokens"] + prep["val"]["tokens"]) / (t2 - t1), 1),
        "num_proc": params.data.num_proc,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_data.json")
    parser.add_argument("--real", type=Path, default=REAL, help="OASST1 trees export or message rows")
    parser.add_argument("--num-proc", type=int, default=None, help="override data.num_proc")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every source here is local

    tiny = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    fixture = dict(tiny, data={**tiny["data"], "source": str(ROOT / tiny["data"]["source"])})
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = [("fixture, tiny preset", fixture)]
        gpt2 = gpt2_tokenizer_dir(tmp / "gpt2")
        real = {"data": {"source": str(args.real.resolve()), "revision": None}, "tokenizer": {"source": str(gpt2)}}
        configs += [("real sample, best", real),
                    ("real sample, all", {**real, "data": {**real["data"], "thread_policy": "all"}})]
        for k, (name, overrides) in enumerate(configs):
            if args.num_proc:
                overrides = {**overrides, "data": {**overrides.get("data", {}), "num_proc": args.num_proc}}
            runs.append(bench_one(name, load_params(ROOT / "params.yaml", overrides), tmp / f"run{k}"))

    print(f"\n{'run':<22}{'seq':>6}{'conv':>7}{'tokens':>9}{'packed':>8}{'naive':>8}{'gain':>7}"
          f"{'tok/step packed':>17}{'naive':>8}{'prep s':>8}{'msg/s':>8}")
    for r in runs:
        print(f"{r['name']:<22}{r['seq_len']:>6}{r['conversations_train']:>7}{r['tokens_train']:>9}"
              f"{r['packing_efficiency']:>8.1%}{r['naive_padding_efficiency']:>8.1%}{r['packing_gain']:>6.2f}x"
              f"{r['real_tokens_per_step_packed']:>17}{r['real_tokens_per_step_naive']:>8}{r['prepare_s']:>8}"
              f"{r['prepare_messages_per_s']:>8}")
    write_json(args.out, {"device": device_name(), "date": date.today().isoformat(), "runs": runs})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
