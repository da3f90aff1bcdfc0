"""init stage: build the MoE model (from scratch or upcycled from a dense GPT-2) and write models/init.

Usage (see dvc.yaml): python stages/init.py --tokenizer data/tokenizer --out models/init
    --metrics metrics/model.json [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage

# The parameter counts live here once (train does not repeat them); FLOPs per token, the block layout,
# non-embedding counts and the echoed params go to --run-facts.
METRICS = ("params.total", "params.active")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder written by prepare")
    parser.add_argument("--out", type=Path, required=True, help="save_pretrained folder to write")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON with parameter counts and FLOPs")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    from moechat.config.params import load_params
    from moechat.model.upcycle import initialize
    from moechat.metrics import write_stage_report

    params = load_params(args.params)
    report = initialize(params.model, params.seed, params.train.seq_len, args.tokenizer, args.out)
    write_stage_report(report, METRICS, args.metrics, args.run_facts)
    counts = report["params"]
    print(f"init: {report['init_from'] or 'scratch'} -> {args.out}: {counts['total']:,} params, "
          f"{counts['active']:,} active per token, MoE blocks {report['moe_layers']}, "
          f"{report['train_flops_per_token']:.3g} train FLOPs/token at seq_len {report['seq_len']}")
    return 0


if __name__ == "__main__":
    run_stage(main)
