"""Issue 6, item 4: wall time of the tiny preset's whole DAG on this machine, stage by stage.

Builds the same scratch repo as `moechat demo`, then runs `dvc repro -s <stage>` in DAG order so each
stage's time is measured alone, and writes metrics/bench_pipeline.json.

    python bench/pipeline.py [--out metrics/bench_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchlib import device_name
from moechat.cli.demo import demo_env, make_demo_repo, project_root

STAGES = ("download", "prepare", "init", "train", "evaluate", "export", "quantize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=project_root() / "metrics" / "bench_pipeline.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="moechat-bench-") as tmp:
        repo = make_demo_repo(Path(tmp) / "repo")
        env = demo_env(repo)
        stage_seconds = {}
        for stage in STAGES:
            start = time.perf_counter()
            subprocess.run(["dvc", "repro", "-s", stage], cwd=repo, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            stage_seconds[stage] = round(time.perf_counter() - start, 1)
            print(f"{stage:<9} {stage_seconds[stage]:7.1f} s")
    total = round(sum(stage_seconds.values()), 1)
    result = {
        "device": f"{device_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": date.today().isoformat(),
        "preset": "tiny",
        "total_seconds": total,
        "stage_seconds": stage_seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"whole DAG (tiny preset): {total:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
