"""Scratch MoE vs upcycled MoE vs the dense parent fine-tuned on the same tokens.

Three `dvc exp run`s of the reference pipeline (same data, schedule and seed; only `model.*` differs), then
one table of val assistant loss and the lm-eval scores, with the GPU named:

  scratch   model.init_from=null: the reference MoE from random init
  upcycled  model.init_from=gpt2-medium: 8 of its 24 blocks, Drop-Upcycled experts (docs/recipe.md)
  dense     gpt2-medium itself, all 24 blocks, fine-tuned through the same loop: one expert per MoE block
            with top-1 routing computes exactly the dense MLP (tested), so this is the dense parent

    python bench/recipe_compare.py              # on a CUDA GPU with Hub access; writes metrics/bench_recipe.json
    python bench/recipe_compare.py --dry-run    # print the experiments' commands only

Needs the Hub (OASST1, gpt2, gpt2-medium and the lm-eval tasks) and about an hour on a 16 GB GPU
(`moechat plan` with each variant's -S values gives the projected time of each run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_name  # noqa: E402

VARIANTS = {
    "scratch": ["model.init_from=null", "train.lr=3.0e-4", "train.min_lr=3.0e-5"],  # presets/scratch.yaml
    "upcycled": ["model.init_from=gpt2-medium", "model.init_layers=null", "model.upcycle_reinit_ratio=0.5"],
    "dense": ["model.init_from=gpt2-medium", "model.n_layer=24", "model.num_experts=1", "model.num_experts_per_tok=1",
              "model.upcycle_reinit_ratio=0.0", "model.init_layers=null"],
}


def experiment_command(name: str, sets: list[str]) -> list[str]:
    return ["dvc", "exp", "run", "--force", "-n", f"recipe-{name}", *[a for s in sets for a in ("-S", s)],
            "evaluate"]


def read_row(name: str) -> dict[str, Any]:
    """The workspace's metrics after `dvc exp run` (it leaves the experiment's results in place)."""
    evaluation = json.loads(Path("metrics/eval.json").read_text())
    train = json.loads(Path("metrics/train.json").read_text())
    model = json.loads(Path("metrics/model.json").read_text())
    tasks = evaluation.get("lm_eval", {}).get("tasks", {})
    return {"variant": name, "params_total": model["params"]["total"], "params_active": model["params"]["active"],
            "val_loss": evaluation["loss"], "val_perplexity": evaluation["perplexity"],
            "train_tokens": train["tokens_seen"], "train_seconds": train["train_seconds"], "mfu": train["mfu"],
            "lm_eval": {task: {k: v for k, v in m.items() if k in ("acc", "acc_norm", "acc_stderr")}
                        for task, m in tasks.items()}}


def table(rows: list[dict[str, Any]], gpu: str) -> str:
    tasks = sorted({t for r in rows for t in r["lm_eval"]})
    head = ["variant", "params (active)", "val assistant loss", *[f"{t} acc_norm" for t in tasks], "train time"]
    lines = [f"Measured on {gpu}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = [f"{r['lm_eval'][t].get('acc_norm', r['lm_eval'][t].get('acc', float('nan'))):.3f}"
                  if t in r["lm_eval"] else "" for t in tasks]
        cells = [r["variant"], f"{r['params_total'] / 1e6:.0f}M ({r['params_active'] / 1e6:.0f}M)",
                 f"{r['val_loss']:.3f}", *scores, f"{r['train_seconds'] / 60:.0f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the experiments' commands and exit")
    ap.add_argument("--out", default="metrics/bench_recipe.json")
    args = ap.parse_args()
    if args.dry_run:
        for name, sets in VARIANTS.items():
            print(" ".join(experiment_command(name, sets)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("recipe_compare: needs a CUDA GPU (three reference-size training runs); --dry-run prints them")
        return 2
    rows = []
    for name, sets in VARIANTS.items():
        subprocess.run(experiment_command(name, sets), check=True)
        rows.append(read_row(name))
    gpu = device_name("cuda")
    Path(args.out).write_text(json.dumps({"device": gpu, "date": datetime.date.today().isoformat(),
                                          "variants": VARIANTS, "rows": rows}, indent=1))
    print(table(rows, gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
