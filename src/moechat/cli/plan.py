"""`moechat plan`: will a training config fit the GPU, which micro-batch is fastest, and how long the run takes.

Argument parsing and printing only; the estimate itself is moechat.train.plan (torch-free).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from moechat.config.params import Params, load_params
from moechat.config.presets import merged_params
from moechat.errors import ConfigError
from moechat.train.plan import (DEFAULT_MFU, RTX_4060_TI_BF16_FLOPS, MemoryPlan, RunSize, advice, data_size, estimate, fastest_fitting, largest_micro_batch, run_size, vocab_size_for)

if TYPE_CHECKING:
    from moechat.model.configuration_moechat import MoeChatConfig
    from moechat.config.params import TrainConfig

CPU_NOTE = ("CPU plan: the peak is host memory held by the step's tensors (the process and its libraries come on "
            "top); train.gpu_memory_gb, the CUDA context reserve and the micro-batch advice apply to GPU runs "
            "only (plan one with --device cuda)")



def render(plan: MemoryPlan) -> str:
    cpu = plan.device_type != "cuda"
    unit, scale = ("MiB", 1024) if cpu else ("GiB", 1)
    rows = [("weights", plan.weights_gb), ("grads", plan.grads_gb), (f"optimizer ({plan.optimizer})", plan.optimizer_gb),
            ("weight casts + stacks", plan.casts_gb), ("activations", plan.activations_gb),
            ("lm_head cast + grad", plan.logits_gb), ("backward working set", plan.backward_gb)]
    if not cpu:
        rows += [("allocated", plan.allocated_gb), ("CUDA context + fragm.", plan.headroom_gb)]
    lines = [f"{plan.params / 1e6:.1f}M params, micro-batch {plan.micro_batch_size} x seq {plan.seq_len}, "
             f"{plan.precision}, checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
             f"{plan.attention} attention, on {plan.device_type}"]
    lines += [f"  {name:<24} {gb * scale:8.2f} {unit}" for name, gb in rows]
    if cpu:
        lines.append(f"  {'peak (host memory)':<24} {plan.total_gb * scale:8.2f} {unit}")
        return "\n".join(lines)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<24} {plan.total_gb:8.2f} GiB  ({verdict} in {plan.budget_gb:g} GiB)")
    return "\n".join(lines)


def render_run(run: RunSize) -> str:
    d = run.data
    return "\n".join([
        f"run: {d.tokens_per_epoch / 1e6:.2f}M train tokens per epoch in {d.blocks:,} blocks [{d.source}]",
        f"  optimizer steps {run.total_steps} ({run.steps_per_epoch} per epoch), warmup {run.warmup_steps}",
        f"  {run.tokens_per_run / 1e6:.1f}M tokens x {run.flops_per_token / 1e9:.2f} GFLOP/token: "
        f"~{run.seconds / 60:.0f} min at {run.mfu:.0%} MFU (assumed) of {run.peak_flops / 1e12:.1f} TFLOP/s per GPU "
        f"(default: RTX 4060 Ti bf16)",
    ])


def recommendation_line(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int = 1) -> str:
    """One line for `moechat plan`: the fastest configuration that fits, as params keys."""
    best = fastest_fitting(model, train, vocab_size, world_size)
    if best is None:
        return "fastest that fits: none, " + advice(model, train, vocab_size, world_size)
    return (f"fastest that fits {train.gpu_memory_gb:g} GiB: train.micro_batch_size: {best.micro_batch_size}, "
            f"train.grad_accum: {best.grad_accum}, train.gradient_checkpointing: "
            f"{str(best.gradient_checkpointing).lower()} (planned {best.plan.total_gb:.2f} GiB)")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="moechat plan", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--preset", default=None,
                    help="preset merged over the params file: a name under presets/ (tiny) or a YAML path")
    ap.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    ap.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir for the exact vocab, if built")
    ap.add_argument("--world-size", type=int, default=1, help="GPUs sharing ZeRO-2 state (with train.deepspeed)")
    ap.add_argument("--prepare-metrics", default="metrics/prepare.json",
                    help="measured data size (default: metrics/prepare.json; estimated when absent)")
    ap.add_argument("--gpu-tflops", type=float, default=RTX_4060_TI_BF16_FLOPS / 1e12,
                    help="dense 16-bit peak per GPU for the time projection (default: RTX 4060 Ti, bf16)")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU for the time projection")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="where the run trains (default: cpu for train.precision fp32, the CPU demo's; else cuda)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    params_path = Path(args.params)
    try:
        if args.preset:
            params = merged_params(params_path, args.preset, params_path.parent / "presets")[1]
        else:
            params = load_params(params_path)
    except ConfigError as err:
        print(f"moechat plan: {err}")
        return 2
    if args.micro_batch is not None and args.micro_batch < 1:
        print(f"moechat plan: --micro-batch={args.micro_batch} must be >= 1")
        return 2
    vocab = vocab_size_for(params.tokenizer.source, params.tokenizer.vocab_size, Path(args.tokenizer))
    arch = params.model.architecture
    device = args.device or ("cpu" if params.train.precision == "fp32" else "cuda")
    plan = estimate(arch, params.train, vocab, args.micro_batch, args.world_size, device)
    best = largest_micro_batch(arch, params.train, vocab, args.world_size) if device == "cuda" else None
    try:
        run = run_for(params, vocab, args)
    except ConfigError as err:
        print(f"moechat plan: {err}")
        return 2
    if args.json:
        print(json.dumps({**asdict(plan), "fits": plan.fits, "largest_micro_batch": best,
                          "run": asdict(run) if run else None}, indent=1))
    else:
        print(render(plan))
        if device == "cpu":
            print(CPU_NOTE)
        else:
            print(f"largest micro-batch that fits: {best}" if best else advice(arch, params.train, vocab))
            print(recommendation_line(arch, params.train, vocab, args.world_size))
        print(render_run(run) if run else f"run: no data size for data.source={params.data.source!r} "
                                          f"(only English OASST1 is estimated); run `dvc repro prepare` to measure")
    return 0 if plan.fits or device == "cpu" else 1


def run_for(params: Params, vocab: int, args: argparse.Namespace) -> Optional[RunSize]:
    """The CLI's run size: None when the data size is neither measured nor estimable."""
    data = data_size(params.data, params.train.seq_len, Path(args.prepare_metrics))
    if data is None:
        return None
    return run_size(params.model.architecture, params.train, vocab, data, args.world_size, args.mfu,
                    args.gpu_tflops * 1e12)


