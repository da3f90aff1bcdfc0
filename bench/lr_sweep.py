"""Learning-rate sweep on the tiny preset: the same train() per rate, final train and val LM loss side by side.

    python bench/lr_sweep.py --data data/prepared --init models/init          # after `moechat demo` / dvc repro
    python bench/lr_sweep.py --lrs 1e-3 3e-3 1e-2 --out metrics/bench_lr_sweep.json

min_lr follows each rate at the preset's ratio (lr / 10). Writes metrics/bench_lr_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from moechat.config.params import load_params
from moechat.atomic import write_json
from moechat.train.loop import train


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default="presets/tiny.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--init", type=Path, default=Path("models/init"))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--out", default="metrics/bench_lr_sweep.json")
    args = ap.parse_args(argv)
    params = load_params(args.params, yaml.safe_load(Path(args.preset).read_text()))
    ratio = params.train.min_lr / params.train.lr
    rows = []
    for lr in args.lrs:
        cfg = dataclasses.replace(params.train, lr=lr, min_lr=lr * ratio)
        with tempfile.TemporaryDirectory() as tmp:
            m = train(cfg, params.seed, args.data, args.init, Path(tmp) / "ckpt", Path(tmp) / "final",
                      Path(tmp) / "live")
        rows.append({"lr": lr, "min_lr": lr * ratio, "steps": m["steps"], "train_lm_loss": m["lm_loss"],
                     "val_lm_loss": m["val_lm_loss"], "aux_loss": m["aux_loss"]})
        print(rows[-1], flush=True)
    best = min(rows, key=lambda r: r["val_lm_loss"])
    write_json(Path(args.out), {"date": datetime.date.today().isoformat(), "preset": args.preset, "rows": rows,
                                "best_lr": best["lr"]})
    print(f"best lr {best['lr']:g} (val lm loss {best['val_lm_loss']:.4f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
