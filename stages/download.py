"""download stage: read `data.source` (Hub id, local message rows, or a trees export) into data/raw.

Writes canonical message rows (`messages.parquet`) and metrics/download.json with counts, a content hash and,
for a local source, the files read (`files`) and skipped (`skipped`: hidden files, documentation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage

# What `dvc metrics` compares; the source, revision, per-value counts and content hash go to --run-facts.
METRICS = ("rows", "trees")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the canonical message rows")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file for the message and tree counts")
    parser.add_argument("--run-facts", type=Path, default=None,
                        help="JSON for the run's facts, not a DVC metric (default: run/<name> beside --metrics)")
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    from moechat.config.params import load_params
    from moechat.data.oasst import download
    from moechat.metrics import write_stage_report

    params = load_params(args.params)
    metrics = download(params.data, args.out)
    write_stage_report(metrics, METRICS, args.metrics, args.run_facts)
    skipped = metrics.get("skipped") or []
    note = f"; skipped {len(skipped)} hidden or documentation file(s): {', '.join(skipped[:3])}" if skipped else ""
    print(f"download: {metrics['rows']} messages in {metrics['trees']} trees from {metrics['source']} "
          f"({metrics['kind']}) -> {args.out} sha256={metrics['sha256'][:12]}{note}")
    return 0


if __name__ == "__main__":
    run_stage(main)
