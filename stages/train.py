"""Stage `train`: train the init model on the packed blocks; checkpoints, DVCLive curves, final model.

Resumes on its own from the newest complete checkpoint of the same experiment (see docs/pipeline.md, Training).
Multi-GPU: launch this same script with `accelerate launch`, `torchrun` or `deepspeed`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moechat.stage import run_stage

# What `dvc metrics` compares; the total loss and z-loss (its other terms), fingerprint, seconds, device,
# resume point and token counts go to --run-facts.
METRICS = ("lm_loss", "aux_loss", "val_lm_loss", "tokens_per_s", "mfu", "peak_memory_gb", "skipped_steps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (train/ and val/)")
    parser.add_argument("--init", type=Path, required=True, help="init model folder (save_pretrained)")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint root (persists across runs)")
    parser.add_argument("--out", type=Path, required=True, help="final model folder")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    from moechat.config.params import load_params
    from moechat.metrics import write_stage_report
    from moechat.train.loop import train

    params = load_params(args.params)
    m = train(params.train, params.seed, args.data, args.init, args.checkpoints, args.out, args.live)
    if os.environ.get("RANK", "0") != "0":  # set by torchrun / accelerate launch / deepspeed
        return 0
    report = {k: v for k, v in m.items() if k != "parameters"}  # counted once, by init (model.json)
    write_stage_report(report, METRICS, args.metrics, args.run_facts)
    mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
    speed = "n/a" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:.0f}"
    print(f"train: {m['steps']} steps, val lm loss {m['val_lm_loss']:.4f}, {speed} tok/s, MFU {mfu} "
          f"on {m['device']}, peak {m['peak_memory_gb']:.2f} GiB ({m['peak_memory_kind']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    run_stage(main)
