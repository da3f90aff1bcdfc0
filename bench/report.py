"""Print the benchmark tables of docs/benchmarks.md from metrics/bench_*.json, so no figure is typed in by hand.

    python bench/report.py [--metrics metrics]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def moe_layer(b: dict) -> str:
    ours = b["results"]["ours"]["ms"]
    rows = [[name, f"{r['ms']:.1f}", f"{r['ms'] / ours:.2f}"] for name, r in b["results"].items()]
    return table(["variant (fwd+bwd, one layer)", "ms", "x ours"], rows)


def train_step(b: dict) -> str:
    rows = []
    for r in b["rows"]:
        if "tokens_per_s" not in r:
            rows.append([r["micro_batch"], r["checkpointing"], r.get("cap_gb") or "-", "OOM", "", "", r.get("planner_gb")])
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        rows.append([r["micro_batch"], r["checkpointing"], r.get("cap_gb") or "-", f"{r['tokens_per_s']:.0f}", mfu,
                     f"{r['peak_memory_gb']:.2f}" if r.get("peak_memory_gb") is not None else "n/a",
                     f"{r['planner_gb']:.2f}" if r.get("planner_gb") is not None else "n/a"])
    out = table(["micro-batch", "checkpointing", "cap GiB", "tokens/s", "MFU", "peak GiB", "planner GiB"], rows)
    if b.get("real_data_comparison"):
        c = b["real_data_comparison"]
        out += (f"\n\nReal-data tokens/s: ours {c['ours_real_tokens_per_s']:.0f} vs the seed's recipe "
                f"{c['seed_real_tokens_per_s']:.0f} ({c['speedup']}x).")
    return out


def data(b: dict) -> str:
    rows = [[r["name"], r["seq_len"], f"{r['packing_efficiency']:.1%}", f"{r['naive_padding_efficiency']:.1%}",
             f"{r['real_tokens_per_step_packed']} vs {r['real_tokens_per_step_naive']}", f"{r['prepare_s']:.1f}"]
            for r in b["runs"]]
    return table(["data", "seq_len", "packed", "pad-to-max", "real tokens/step packed vs padded", "prepare s"], rows)


def pipeline(b: dict) -> str:
    rows = [[stage, f"{s:.1f}"] for stage, s in b["stage_seconds"].items()] + [["**total**", f"{b['total_seconds']:.1f}"]]
    return table(["stage (tiny preset)", "seconds"], rows)


def quant(b: dict) -> str:
    rows = [[name, f"{b[key]['tokens_per_second']:.1f}", f"{b[key]['weight_bytes_loaded']:,}",
             f"{b[key]['weight_bytes_on_disk']:,}" if "weight_bytes_on_disk" in b[key] else "n/a",
             f"{b[key]['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in b[key] else "n/a",
             " + ".join(b[key]["kernel"])]
            for name, key in (("full precision export", "fp"), ("GPTQ 4-bit", "quantized"))]
    return table(["chat model", "decode tokens/s", "weight bytes loaded", "weight bytes on disk", "peak RSS MiB",
                  "kernel"], rows) + (
        f"\n\n4-bit / full precision: tokens/s x{b['ratio_tokens_per_second']:.2f}, "
        f"weight bytes loaded x{b['ratio_weight_bytes']:.2f}.")


def serving(b: dict) -> str:
    v, t = b["vllm"], b["transformers"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [["1 request: output tokens/s", fmt(v["single"]["tokens_per_s"]), fmt(t["single"]["tokens_per_s"])],
            ["1 request: time to first token, s", fmt(v["single"]["ttft_s"]), fmt(t["single"]["ttft_s"])],
            ["16 concurrent: output tokens/s", fmt(v["concurrent"]["tokens_per_s"]),
             fmt(t["concurrent"]["tokens_per_s"])],
            ["16 concurrent: mean time to first token, s", fmt(v["concurrent"]["mean_ttft_s"]),
             fmt(t["concurrent"]["mean_ttft_s"])],
            ["16 in one batched `generate`: output tokens/s", "-", fmt(t["batched_generate"]["tokens_per_s"])]]
    r = b["ratios"]
    return table(["same export, " + b["dtype"] + f", {b['new_tokens']} new tokens", "vLLM (HTTP, streamed)",
                  "transformers (moechat chat)"], rows) + (
        f"\n\nvLLM / transformers: 1 request tokens/s x{r['single_tokens_per_s']:.2f}, 16 concurrent tokens/s "
        f"x{r['concurrent_tokens_per_s']:.2f}, time to first token x{r['single_ttft']:.2f}. Model: "
        f"{json.dumps(b['model'])}; transformers with {b.get('torch_threads', '?')} torch thread(s).")


def lr_sweep(b: dict) -> str:
    rows = [[f"{r['lr']:g}", f"{r['train_lm_loss']:.3f}", f"{r['val_lm_loss']:.3f}", f"{r['aux_loss']:.3f}"]
            for r in b["rows"]]
    return table(["lr (tiny preset)", "train LM loss", "val LM loss", "aux loss"], rows)


REPORTS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "bench_moe_layer.json": ("1. MoE layer", moe_layer),
    "bench_train.json": ("2. Train step", train_step),
    "bench_data.json": ("3. Data", data),
    "bench_pipeline.json": ("4. CPU pipeline", pipeline),
    "bench_quant.json": ("5. Quantized inference", quant),
    "bench_serving.json": ("6. Serving: vLLM vs transformers", serving),
    "bench_lr_sweep.json": ("Learning-rate sweep", lr_sweep),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    args = parser.parse_args()
    for name, (title, render) in REPORTS.items():
        path = args.metrics / name
        if not path.exists():
            print(f"#### {title}\n\nnot measured yet ({path} missing)\n")
            continue
        b = json.loads(path.read_text())
        print(f"#### {title} ({b.get('device', 'see file')}, {str(b.get('date', ''))[:10]})\n\n{render(b)}\n")


if __name__ == "__main__":
    main()
