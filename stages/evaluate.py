"""evaluate stage: val loss/perplexity over assistant tokens, accuracy, router health, chat samples.

Usage (see dvc.yaml): python stages/evaluate.py --model models/final --data data/prepared
    --metrics metrics/eval.json --samples metrics/samples.json --plots metrics/eval [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage  # first: it filters third-party import-time chatter
from moechat.config import load_params
from moechat.data.chat import load_packed
from moechat.evaluate import evaluate, load_model, pick_device, share_rows
from moechat.io import write_json
from moechat.metrics import write_stage_report


# What `dvc metrics` compares, plus router.* (the per-layer averages) when the model has MoE blocks; the
# per-layer detail and batch count go to --run-facts.
METRICS = ("loss", "perplexity", "accuracy", "tokens", "dead_expert_threshold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="save_pretrained folder of the trained model")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (packed val split)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON with loss, perplexity, router stats")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    parser.add_argument("--samples", type=Path, required=True, help="JSON with the generated chat samples")
    parser.add_argument("--plots", type=Path, required=True, help="folder for DVC plot data files")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    args = parser.parse_args()

    params = load_params(args.params)
    model, tokenizer = load_model(args.model, pick_device(args.device))
    metrics, samples = evaluate(model, tokenizer, load_packed(args.data, "val"), params.eval, params.seed)
    router_keys = [f"router.{key}" for key in metrics.get("router", {})]
    write_stage_report(metrics, METRICS + tuple(router_keys), args.metrics, args.run_facts)
    write_json(args.samples, samples)
    write_json(args.plots / "expert_shares.json", share_rows(metrics))
    write_json(args.plots / "samples_table.json", samples)
    router = metrics.get("router", {})
    print(f"evaluate: loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f} acc {metrics['accuracy']:.3f} "
          f"on {metrics['tokens']:,} assistant tokens; router cv {router.get('mean_cv', 0):.3f}, "
          f"dead experts {router.get('dead_experts', 0)}; {len(samples)} samples -> {args.samples}")


if __name__ == "__main__":
    run_stage(main)
