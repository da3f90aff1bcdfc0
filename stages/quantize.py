"""quantize stage: GPTQ 4-bit (GPTQModel) of the exported model, MoE-aware, plus fp32 vs 4-bit perplexity.

Usage (see dvc.yaml): python stages/quantize.py --model models/export --data data/prepared
    --out models/quantized --metrics metrics/quantize.json --experts metrics/quantize_experts.json
    [--log-dir metrics/run/quantize_gptq] [--params params.yaml] [--device auto]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moechat.stage import run_stage

PACK_KERNEL = "gptqmodel_pack_block_cpu"  # GPTQModel's C++ packing op, compiled with g++ on first use


def pack_kernel_cache() -> Path:
    """Where GPTQModel 7.6 caches the built packing kernel, one subfolder per build fingerprint (its
    `default_torch_ops_build_root`; computed here because importing gptqmodel prints a banner)."""
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"
    return base / "pack_block_cpu"


def pack_kernel_notice(cache: Path) -> str | None:
    """A line to print before GPTQ when GPTQModel will first compile its packing kernel (about a minute on
    2 cores, with no output of its own), else None."""
    if any(cache.glob(f"*/{PACK_KERNEL}*.so")):
        return None
    return (f"quantize: first run on this machine: GPTQModel compiles its C++ packing kernel with g++ "
            f"(about a minute, once; cached in {cache})")


# What `dvc metrics` compares; the losses behind the perplexities, device, seconds, module count and echoed
# quantize params go to --run-facts.
METRICS = ("perplexity_fp32", "perplexity_quantized", "perplexity_ratio", "weight_bytes_fp32",
           "weight_bytes_quantized", "size_ratio", "calib_tokens", "calib_tokens_per_expert_min",
           "calib_tokens_per_expert_median", "fallback")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="exported full-precision folder")
    parser.add_argument("--data", type=Path, required=True, help="prepared data (conversations_train.jsonl, val)")
    parser.add_argument("--out", type=Path, required=True, help="quantized folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON totals: perplexity fp32 vs 4-bit, sizes")
    parser.add_argument("--experts", type=Path, required=True,
                        help="JSON per expert: calibration tokens (router, GPTQ) and the fallback flag")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="folder for GPTQModel's console log and quant_log.csv, run facts kept out of --out "
                             "(default: run/quantize_gptq beside --metrics)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", default="auto", help="auto (a visible GPU, else the CPU) | cpu | cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=4, help="val batch size for the perplexity runs")
    parser.add_argument("--max-batches", type=int, default=None, help="cap the val batches (default: all)")
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    from moechat.device import resolve_device
    from moechat.config.params import load_params
    from moechat.data.chat_format import load_packed
    from moechat.atomic import write_json
    from moechat.metrics import write_stage_report
    from moechat.release.quantize import quantize_stage

    device = resolve_device(args.device)  # a bad --device is one line, before any work
    params = load_params(args.params)
    q = params.quantize
    notice = pack_kernel_notice(pack_kernel_cache())
    if notice:
        print(notice, flush=True)
    metrics, experts = quantize_stage(args.model, args.data / "conversations_train.jsonl",
                                      load_packed(args.data, "val"), q, params.seed, args.out, args.batch_size,
                                      args.max_batches, device,
                                      args.log_dir or args.metrics.parent / "run" / "quantize_gptq")
    write_json(args.experts, experts)
    write_stage_report(metrics, METRICS, args.metrics, args.run_facts)
    print(f"quantize: {q.bits}-bit g{q.group_size} on {metrics['device']} -> {args.out} in "
          f"{metrics['quantize_seconds']:.1f}s (+{metrics['load_seconds']:.1f}s load); "
          f"val ppl {metrics['perplexity_fp32']:.3f} -> {metrics['perplexity_quantized']:.3f} "
          f"(x{metrics['perplexity_ratio']:.4f}); weights {metrics['weight_bytes_fp32']:,} -> "
          f"{metrics['weight_bytes_quantized']:,} bytes; {metrics['fallback']['experts']} expert(s) on RTN fallback")
    return 0


if __name__ == "__main__":
    run_stage(main)
