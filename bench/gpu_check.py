"""What the CPU tests cannot prove, measured on the GPU this runs on, in one run (`bash bench/gpu.sh`).

For the card: its name and compute capability; the expert path and attention backend that training takes;
host syncs per training step (torch.cuda.set_sync_debug_mode); the planner's figure against
max_memory_allocated and max_memory_reserved at the reference micro-batch (16 x 1024, bf16, 8-bit AdamW, no
checkpointing); tokens/s and MFU of that step for each attention backend beside sdpa; flex_attention's loss
and gradients against sdpa's; the MoE layer per expert path against a dense FFN of equal active FLOPs.
Writes metrics/bench_gpu.json and the table between the bench_gpu markers of docs/performance.md.

    python bench/gpu_check.py             # on a CUDA GPU (about 3-5 minutes on an H100)
    python bench/gpu_check.py --dry --out /tmp/x.json --doc /tmp/performance.md
                                          # CPU: the same code at the tiny preset's dims, CUDA-only parts skipped
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import yaml

from moechat.train import plan
from moechat.train.backends import flash_attn_installed, resolve_attention
from moechat.errors import ConfigError
from moechat.config.params import load_params
from moechat.atomic import write_json
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
from moechat.model.modeling_moechat import EXPERT_PATHS, MoeChatMLP, MoeChatSparseMoeBlock, expert_path_for
from moechat.train.engine import build_accelerator
from moechat.train.optim import build_optimizer
from moechat.train.hardware import device_peak_flops
from moechat.train.step import train_step

VOCAB = 50260  # GPT-2's 50257 ids + the three chat tokens
START, END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"


@dataclasses.dataclass(frozen=True)
class Setup:
    """The dims a run uses: the reference on CUDA, the tiny preset's in the dry run."""

    cuda: bool
    precision: str
    optimizer: str
    micro_batch: int
    seq: int
    vocab: int
    doc_len: int
    steps: int
    params_overrides: Optional[dict]


def setup_for(dry: bool) -> Setup:
    if dry:
        tiny = yaml.safe_load(Path("presets/tiny.yaml").read_text())
        return Setup(False, "fp32", "adamw", 2, 64, 515, 16, 2, tiny)
    return Setup(True, "bf16", "adamw_8bit", 16, 1024, VOCAB, 256, 5, None)


def device_info(s: Setup) -> dict[str, Any]:
    if not s.cuda:
        return {"device": "cpu (dry run)", "compute_capability": None, "torch": torch.__version__}
    cc = torch.cuda.get_device_capability(0)
    return {"device": torch.cuda.get_device_name(0), "compute_capability": f"{cc[0]}.{cc[1]}",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def packed_batch(s: Setup, seed: int) -> dict[str, torch.Tensor]:
    """Packed rows: documents of `doc_len` tokens (position ids restart), a loss on every token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, s.vocab, (s.micro_batch, s.seq), generator=g)
    pos = (torch.arange(s.seq) % s.doc_len).expand(s.micro_batch, s.seq).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def build_model(arch: MoeChatConfig, s: Setup, attention: str) -> MoeChatForCausalLM:
    shape = {name: getattr(arch, name) for name in MoeChatConfig.hyperparameters()}
    torch.manual_seed(0)
    model = MoeChatForCausalLM(MoeChatConfig(**shape, vocab_size=s.vocab, pad_token_id=0, eos_token_id=2))
    model.set_attn_implementation(attention)
    return model


def count_syncs(fn: Callable[[], Any]) -> int:
    """Synchronizing CUDA calls made by fn, as torch.cuda.set_sync_debug_mode('warn') reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def step_row(params, s: Setup, attention: str) -> dict[str, Any]:
    """The reference step through `moechat.train.train_step`: tokens/s, MFU, memory, syncs, and the plan."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = dataclasses.replace(params.train, seq_len=s.seq, micro_batch_size=s.micro_batch, grad_accum=1,
                              gradient_checkpointing=False, optimizer=s.optimizer, precision=s.precision,
                              attn_implementation=attention, deepspeed=None)
    arch = params.model.architecture
    est = plan.estimate(arch, cfg, s.vocab, device_type="cuda" if s.cuda else "cpu")
    row: dict[str, Any] = {"attention": attention, "micro_batch": s.micro_batch, "seq_len": s.seq,
                           "planned_allocated_gb": round(est.allocated_gb, 3),
                           "planned_total_gb": round(est.total_gb, 3)}
    accelerator = build_accelerator(cfg, s.precision, None)
    model = build_model(arch, s, attention)
    optimizer = build_optimizer(model, cfg, offload=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    flops = accelerator.unwrap_model(model).flops_per_token(s.seq)
    step = lambda i: train_step(model, optimizer, accelerator, [packed_batch(s, i)], s.micro_batch * (s.seq - 1),
                                1.0, i + 1)  # noqa: E731
    for i in range(2):  # warmup: compilation (flex), allocator growth, optimizer state
        step(i)
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(2, 2 + s.steps):
        stats = step(i)
    if s.cuda:
        torch.cuda.synchronize()
    tps = s.steps * s.micro_batch * s.seq / (time.perf_counter() - t0)
    _, peak, _ = device_peak_flops(accelerator.device, s.precision)
    row.update(tokens_per_s=round(tps, 1), mfu=None if peak is None else round(flops * tps / peak, 4),
               loss=round(stats.loss, 4))
    if s.cuda:
        allocated = torch.cuda.max_memory_allocated() / plan.GIB
        row.update(max_allocated_gb=round(allocated, 3), max_reserved_gb=round(torch.cuda.max_memory_reserved() /
                                                                                 plan.GIB, 3),
                   planner_error=round(row["planned_allocated_gb"] / allocated - 1, 3),
                   host_syncs_per_step=count_syncs(lambda: step(99)))
    del model, optimizer
    if s.cuda:
        torch.cuda.empty_cache()
    return row


def attention_rows(params, s: Setup) -> tuple[list[dict[str, Any]], list[str]]:
    """sdpa, then each backend that skips masked tiles and can run here; the others named as skipped."""
    rows, skipped = [], []
    for attention in ("sdpa", "flex_attention", "flash_attention_2"):
        try:
            resolve_attention(attention, "cuda" if s.cuda else "cpu", flash_attn_installed(), s.precision)
        except ConfigError as err:
            skipped.append(f"{attention}: {err}")
            continue
        rows.append(step_row(params, s, attention))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["x_sdpa"] = round(row["tokens_per_s"] / base, 3)
    return rows, skipped


def flex_equals_sdpa(params, s: Setup) -> dict[str, Any]:
    """Loss and gradients of one packed micro-batch through flex_attention against sdpa, same weights."""
    if not s.cuda:
        return {"skipped": "needs CUDA: torch 2.13's FlexAttention has no CPU backward (tests/test_backends.py "
                           "checks the CPU forward)"}
    small = Setup(True, "bf16", "adamw", 2, 512, 4096, 100, 1, None)
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model = build_model(params.model.architecture, small, attention).cuda().train()
        batch = {k: v.cuda() for k, v in packed_batch(small, 0).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        results[attention] = (loss.detach().float(), [p.grad.float() for p in model.parameters()])
    (l0, g0), (l1, g1) = results["sdpa"], results["flex_attention"]
    rel = max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(g1, g0))
    return {"sdpa_loss": round(float(l0), 5), "flex_loss": round(float(l1), 5),
            "max_relative_grad_difference": round(rel, 5), "equal_within_bf16": bool(abs(l0 - l1) < 1e-2 and rel < 2e-2)}


def moe_layer_rows(s: Setup, repeats: int = 5) -> list[dict[str, Any]]:
    """MoE layer forward + backward per expert path, against a dense FFN of top_k x n_inner (equal active
    FLOPs), at the reference dims (4 x 1024 tokens, d 1024, FFN 4096, 10 experts, top-2) on CUDA."""
    d, ffn, experts, tokens = (1024, 4096, 10, 4096) if s.cuda else (64, 256, 4, 128)
    device = "cuda" if s.cuda else "cpu"
    cfg = MoeChatConfig(n_embd=d, n_inner=ffn, n_head=16 if s.cuda else 4, n_layer=2, num_experts=experts,
                        num_experts_per_tok=2, dropout=0.0)
    x = torch.randn(1, tokens, d, device=device)
    layers: dict[str, torch.nn.Module] = {}
    for path in EXPERT_PATHS:
        torch.manual_seed(0)
        block = MoeChatSparseMoeBlock(cfg).to(device).train()
        block.expert_path = path
        layers[path] = block
    layers["dense_ffn"] = MoeChatMLP(d, 2 * ffn, 0.0).to(device).train()
    rows = []
    for name, layer in layers.items():
        seconds = time_fwd_bwd(layer, x, s, repeats)
        rows.append({"variant": name, "ms": round(seconds * 1e3, 3)})
    dense = rows[-1]["ms"]
    for row in rows:
        row["x_dense"] = round(row["ms"] / dense, 3)
    return rows


def time_fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, s: Setup, repeats: int) -> float:
    def once() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=s.cuda):
            out = layer(x.requires_grad_(True))
            y = out[0] if isinstance(out, tuple) else out
        y.float().square().mean().backward()

    once()
    if s.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    if s.cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def paths_taken(params, s: Setup) -> dict[str, Any]:
    device = torch.device("cuda" if s.cuda else "cpu")
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    capped = params.model.architecture.capacity_factor > 0
    return {"expert_path": expert_path_for(device, dtype, capped), "capacity_routing": capped,
            "attention_auto": resolve_attention("auto", device.type, flash_attn_installed(), s.precision)}


def markdown(result: dict[str, Any]) -> str:
    """The docs table of a result (also what the dry run prints)."""
    info = result["device"]
    lines = [f"Measured by `bash bench/gpu.sh` on **{info['device']}** (compute capability "
             f"{info['compute_capability']}), torch {info['torch']}, {result['date']}. Expert path: "
             f"`{result['paths']['expert_path']}`; attention `auto` -> `{result['paths']['attention_auto']}`.", "",
             "| attention | tokens/s | x sdpa | MFU | planned GiB | max allocated GiB | max reserved GiB | "
             "planner error | host syncs / step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["attention"]:
        lines.append(f"| {r['attention']} | {r['tokens_per_s']} | {r['x_sdpa']} | {r['mfu']} | "
                     f"{r['planned_allocated_gb']} | {r.get('max_allocated_gb', '-')} | {r.get('max_reserved_gb', '-')} | "
                     f"{r.get('planner_error', '-')} | {r.get('host_syncs_per_step', '-')} |")
    lines += ["", "| MoE layer variant (fwd + bwd) | ms | x dense FFN |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['ms']} | {r['x_dense']} |" for r in result["moe_layer"]]
    lines += ["", f"flex_attention vs sdpa (loss, gradients): {json.dumps(result['flex_vs_sdpa'])}"]
    lines += [f"Skipped: {note}" for note in result["skipped"]]
    return "\n".join(lines)


def write_doc_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc}: no {START} ... {END} markers to write the table between")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.DOTALL)
    doc.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU run of the same code at the tiny preset's dims")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/bench_gpu.json")
    ap.add_argument("--doc", default="docs/performance.md", help="page whose bench_gpu table is rewritten")
    args = ap.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA GPU visible; run on a GPU, or with --dry for the CPU run of the same code")
        return 2
    s = setup_for(args.dry)
    params = load_params(args.params, s.params_overrides)
    skipped = [] if s.cuda else ["max_memory_allocated / max_memory_reserved, host syncs per step (CUDA only)"]
    attention, not_run = attention_rows(params, s)
    result = {"date": datetime.date.today().isoformat(), "dry_run": not s.cuda, "device": device_info(s),
              "paths": paths_taken(params, s), "attention": attention, "moe_layer": moe_layer_rows(s),
              "flex_vs_sdpa": flex_equals_sdpa(params, s), "skipped": skipped + not_run}
    write_json(Path(args.out), result)
    table = markdown(result)
    write_doc_table(Path(args.doc), table)
    print(table)
    print(f"wrote {args.out} and the table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
