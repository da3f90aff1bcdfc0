"""Full training-step benchmark: tokens/s, MFU (named peak), peak memory and the planner's estimate side by side.

GPU (the reference config, seq 1024, bf16 autocast, bnb 8-bit AdamW): micro-batch 1/2/4/8/16 x gradient
checkpointing off/on, once uncapped and once capped at 16 GiB with
`torch.cuda.set_per_process_memory_fraction`; then the seed's recipe (every example padded to 1024, fp16 with
loss scaling, torch AdamW, micro-batch 1) converted to real-data tokens/s with the padding efficiencies that
the prepare stage measured (metrics/prepare.json). Every row runs `moechat.train.step.train_step`, the loop's own
step.

    python bench/train_step.py                    # on a CUDA GPU; writes metrics/bench_train.json
    python bench/train_step.py --tiny             # CPU smoke run of the same code with the tiny preset dims
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from moechat.train import plan
from moechat.config.params import TrainConfig, load_params
from moechat.atomic import write_json
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
from moechat.train.engine import build_accelerator
from moechat.train.optim import build_optimizer
from moechat.train.hardware import device_peak_flops
from moechat.train.step import train_step

VOCAB = 50260  # GPT-2's 50257 ids + the three chat tokens


def synthetic_batch(mb: int, seq: int, vocab: int, doc_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Packed-like rows: documents of `doc_len` tokens (position ids restart), labels on every token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (mb, seq), generator=g)
    pos = (torch.arange(seq) % doc_len).expand(mb, seq).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def padded_batch(seq: int, vocab: int, real: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
    """The seed's layout: one example of `real` tokens padded to seq (pad ids, labels -100 on the pad)."""
    b = synthetic_batch(1, seq, vocab, seq, seed)
    b["input_ids"][:, real:] = pad_id
    b["labels"][:, real:] = -100
    return b


def measure(model_cfg: MoeChatConfig, cfg: TrainConfig, precision: str, steps: int, warmup: int,
            cap_gb: Optional[float], batch_fn) -> dict[str, Any]:
    """Time `steps` optimizer steps after `warmup` of them, in a fresh accelerate state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * plan.GIB / total) if cap_gb else 1.0)
        torch.cuda.reset_peak_memory_stats()
    accelerator = build_accelerator(cfg, precision, None)
    torch.manual_seed(0)
    shape = {name: getattr(model_cfg, name) for name in MoeChatConfig.hyperparameters()}
    hf = MoeChatConfig(**shape, vocab_size=VOCAB if cuda else 512 + 3, pad_token_id=0, eos_token_id=2)
    row: dict[str, Any] = {"micro_batch": cfg.micro_batch_size, "seq_len": cfg.seq_len,
                           "checkpointing": cfg.gradient_checkpointing, "precision": precision,
                           "optimizer": cfg.optimizer, "cap_gb": cap_gb}
    est = plan.estimate(model_cfg, dataclasses.replace(cfg, precision=precision), hf.vocab_size)
    row["planner_gb"] = round(est.allocated_gb, 3)  # compared with max_memory_allocated: no headroom
    row["planner_total_gb"] = round(est.total_gb, 3)  # with the CUDA context + fragmentation reserve
    model = optimizer = None
    try:
        model = MoeChatForCausalLM(hf)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        optimizer = build_optimizer(model, cfg, offload=False)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        flops = accelerator.unwrap_model(model).flops_per_token(cfg.seq_len)
        timed, tokens = 0.0, 0
        for i in range(warmup + steps):
            batches = [batch_fn(i * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
            targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = train_step(model, optimizer, accelerator, batches, targets, 1.0, i + 1)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                timed += time.perf_counter() - t0
                tokens += stats.tokens
        tps = tokens / timed
        name, peak, note = device_peak_flops(accelerator.device, precision)
        row.update(tokens_per_s=round(tps, 1), mfu=None if peak is None else round(flops * tps / peak, 4),
                   flops_per_token=flops, last_loss=round(stats.loss, 4))
        if cuda:
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / plan.GIB, 3)
            row["planner_error"] = round(row["planner_gb"] / row["peak_memory_gb"] - 1, 3)
    except torch.OutOfMemoryError as err:
        row["error"] = f"CUDA out of memory ({str(err).splitlines()[0][:160]})"
    finally:
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tiny", action="store_true", help="tiny preset dims on CPU (a smoke run, fp32, AdamW)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10 GPU, 3 tiny)")
    ap.add_argument("--prepare-metrics", default="metrics/prepare.json",
                    help="padding/packing efficiencies measured by the prepare stage (for real-data tokens/s)")
    ap.add_argument("--out", default="metrics/bench_train.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench/train_step.py: the reference config (507M params, seq 1024, bf16) needs a CUDA GPU and "
              "none is visible here. Run it on a GPU, or add --tiny for a CPU smoke run of the same code.")
        return 2
    overrides = yaml.safe_load(Path("presets/tiny.yaml").read_text()) if args.tiny else None
    params = load_params(args.params, overrides)
    model_cfg, base = params.model.architecture, params.train
    precision = "bf16" if cuda else "fp32"
    seq = base.seq_len if args.tiny else 1024
    steps = args.steps or (10 if cuda else 3)
    vocab = VOCAB if cuda else 515
    micro_batches = (1, 2, 4, 8, 16) if cuda else (1, 2, 4)
    caps = (None, 16.0) if cuda else (None,)
    rows = []
    for cap in caps:
        for ckpt in (False, True):
            for mb in micro_batches:
                cfg = dataclasses.replace(base, seq_len=seq, micro_batch_size=mb, grad_accum=1,
                                          gradient_checkpointing=ckpt, optimizer="adamw_8bit" if cuda else "adamw",
                                          precision=precision)
                row = measure(model_cfg, cfg, precision, steps, 2, cap,
                              lambda s, mb=mb: synthetic_batch(mb, seq, vocab, 256 if cuda else 64, s))
                print(json.dumps(row), flush=True)
                rows.append(row)

    prep = Path(args.prepare_metrics)
    eff = json.loads(prep.read_text()) if prep.exists() else {}
    packed_eff, padded_eff = eff.get("packing_efficiency"), eff.get("naive_padding_efficiency")
    seed_precision = "fp16" if cuda else "fp32"
    seed_cfg = dataclasses.replace(base, seq_len=seq, micro_batch_size=1, grad_accum=1, gradient_checkpointing=False,
                                   optimizer="adamw", precision=seed_precision)
    real = max(1, int(seq * (padded_eff or 0.5)))
    seed_row = measure(model_cfg, seed_cfg, seed_precision, steps, 2, 16.0 if cuda else None,
                       lambda s: padded_batch(seq, vocab, real, 0, s))
    seed_row["recipe"] = "seed: pad every example to seq_len, fp16 + loss scaling, AdamW, micro-batch 1"
    print(json.dumps(seed_row), flush=True)
    ours = [r for r in rows if r.get("cap_gb") == caps[-1] and "tokens_per_s" in r]
    best = max(ours, key=lambda r: r["tokens_per_s"]) if ours else None
    comparison = None
    if packed_eff and padded_eff and best and "tokens_per_s" in seed_row:
        comparison = {
            "ours_real_tokens_per_s": round(best["tokens_per_s"] * packed_eff, 1),
            "seed_real_tokens_per_s": round(seed_row["tokens_per_s"] * padded_eff, 1),
            "ours_row": {k: best[k] for k in ("micro_batch", "checkpointing", "cap_gb")},
            "packing_efficiency": packed_eff, "padding_efficiency": padded_eff,
            "efficiencies_from": str(prep),
        }
        comparison["speedup"] = round(comparison["ours_real_tokens_per_s"] / comparison["seed_real_tokens_per_s"], 2)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    name, peak, note = device_peak_flops(torch.device("cuda" if cuda else "cpu"), precision)
    result = {"date": datetime.date.today().isoformat(), "device": device, "peak_flops": peak, "peak_note": note,
              "config": "tiny preset (CPU smoke run)" if args.tiny else "reference (params.yaml), seq 1024",
              "timed_steps": steps, "rows": rows, "seed_recipe": seed_row, "real_data_comparison": comparison,
              "memory_measured_by": "torch.cuda.max_memory_allocated" if cuda else None}
    write_json(Path(args.out), result)
    print(f"wrote {args.out}: {len(rows)} rows on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
