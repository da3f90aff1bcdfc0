"""evaluate stage: val loss/perplexity over assistant tokens, accuracy, router health, chat samples, and
the lm-evaluation-harness tasks of `eval.lm_eval_tasks` (scores under `lm_eval` in the metrics file).

Usage (see dvc.yaml): python stages/evaluate.py --model models/final --data data/prepared
    --metrics metrics/eval.json --samples metrics/samples.json --plots metrics/eval [--params params.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage

# What `dvc metrics` compares, plus router.* (the per-layer averages) when the model has MoE blocks; the
# per-layer detail and batch count go to --run-facts.
METRICS = ("loss", "perplexity", "accuracy", "tokens", "dead_expert_threshold")


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    import torch

    from moechat.device import resolve_device
    from moechat.config.params import load_params
    from moechat.data.chat_format import load_packed
    from moechat.eval.evaluate import evaluate, share_rows
    from moechat.eval.harness import run_lm_eval, task_manager
    from moechat.atomic import write_json
    from moechat.metrics import write_stage_report
    from moechat.model.folder import load_model, load_tokenizer

    device = resolve_device(args.device)  # a bad --device is one line, before any work
    params = load_params(args.params)
    manager = task_manager(params.eval)  # lm-eval tasks checked before the val pass
    # fp32: exact, and cheap on a GPU; this project's CPUs run 16-bit matmuls ~100x slower
    model, tokenizer = load_model(args.model, device, torch.float32), load_tokenizer(args.model)
    metrics, samples = evaluate(model, tokenizer, load_packed(args.data, "val"), params.eval, params.seed)
    if params.eval.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(model, tokenizer, params.eval, params.seed, manager)
    router_keys = [f"router.{key}" for key in metrics.get("router", {})]
    lm_eval_keys = [f"lm_eval.tasks.{task}" for task in metrics.get("lm_eval", {}).get("tasks", {})]
    write_stage_report(metrics, METRICS + tuple(router_keys + lm_eval_keys), args.metrics, args.run_facts)
    write_json(args.samples, samples)
    write_json(args.plots / "expert_shares.json", share_rows(metrics))
    write_json(args.plots / "samples_table.json", samples)
    router = metrics.get("router", {})
    print(f"evaluate: loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f} acc {metrics['accuracy']:.3f} "
          f"on {metrics['tokens']:,} assistant tokens; router cv {router.get('mean_cv', 0):.3f}, "
          f"dead experts {router.get('dead_experts', 0)}; {len(samples)} samples -> {args.samples}"
          + "".join(f"; {task} acc {m['acc']:.3f}" for task, m in metrics.get("lm_eval", {}).get("tasks", {}).items()
                    if "acc" in m))
    return 0


if __name__ == "__main__":
    run_stage(main)
