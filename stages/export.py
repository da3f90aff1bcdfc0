"""export stage: a self-contained Hugging Face folder (code, sharded safetensors, tokenizer, model card).

Usage (see dvc.yaml): python stages/export.py --model models/final --metrics-dir metrics --out models/export
    [--params params.yaml] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moechat.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="trained save_pretrained folder")
    parser.add_argument("--metrics-dir", type=Path, required=True,
                        help="folder with prepare.json, train.json and eval.json (the model card's figures)")
    parser.add_argument("--out", type=Path, required=True, help="export folder to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 500MB or 2GB")
    args = parser.parse_args(argv)
    # the libraries import here, after run_stage quieted their import-time output (moechat.stage)
    import torch

    from moechat.config.params import load_params
    from moechat.release.export import export_model, read_metrics
    from moechat.model.folder import load_model, load_tokenizer

    params = load_params(args.params)
    # export only copies the weights: on the CPU, in the fp32 train saved
    model, tokenizer = load_model(args.model, torch.device("cpu"), torch.float32), load_tokenizer(args.model)
    summary = export_model(model, tokenizer, params, read_metrics(args.metrics_dir), args.out, args.max_shard_size)
    print(f"export: {args.out}: {len(summary['shards'])} safetensors shard(s), {summary['weight_bytes']:,} bytes, "
          f"{summary['params']['total']:,} params ({summary['params']['active']:,} active per token)")
    return 0


if __name__ == "__main__":
    run_stage(main)
