"""Training step before/after, side by side: full-logits loss vs chunked loss, GELUs saved vs recomputed,
and train.compile.

Every variant runs `moechat.train.step.train_step` (the loop's own step) on the same synthetic packed batches,
in a fresh subprocess so that its peak memory is its own:
  full_logits   the previous loss: lm_head over every position, then cross-entropy on the full logits
  gelu_saved    the chunked loss, with every MLP keeping its GELU output for backward (the previous MLP)
  chunked       the model as it is: chunked loss, GELUs recomputed in backward (modeling_moechat.gelu_then)
  chunked+compile  the same with train.compile (each block torch.compile'd; compile time is in warmup)
Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU the growth of the process's peak RSS over
its RSS after setup (model, optimizer, batches built), a coarser figure that includes allocator slack.

    python bench/train_variants.py                 # CPU: a scaled config (d 128, vocab 50260), fp32
    python bench/train_variants.py --device cuda   # GPU: the reference config, bf16, 16 x 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import device_name  # noqa: E402

VARIANTS = ("full_logits", "gelu_saved", "chunked", "chunked+compile")


class FullLogitsLoss(torch.nn.Module):
    """The previous training loss around the same model: full logits, then cross-entropy on all of them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # train_step reads the router layout from it

    def forward(self, labels: torch.Tensor, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        out = self.model(**kwargs)
        out.lm_loss = self.model.lm_loss(out.logits[:, :-1], labels[:, 1:], num_items_in_batch)  # t predicts t+1
        c = self.model.config
        out.loss = out.lm_loss + c.aux_loss_coef * out.aux_loss + c.z_loss_coef * out.z_loss
        return out


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def run_variant(variant: str, device: str, steps: int, warmup: int) -> dict[str, Any]:
    import dataclasses

    from moechat.config.params import load_params
    from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
    from moechat.train.engine import build_accelerator, compile_blocks, drop_fp32_output_copy
    from moechat.train.optim import build_optimizer
    from moechat.train.step import train_step

    cuda = device == "cuda"
    if cuda:
        dims = dict(n_embd=1024, n_layer=8, n_head=16, n_inner=4096, num_experts=10)
        mb, seq, precision, optimizer = 16, 1024, "bf16", "adamw_8bit"
    else:
        dims = dict(n_embd=128, n_layer=2, n_head=4, n_inner=512, num_experts=4)
        mb, seq, precision, optimizer = 8, 256, "fp32", "adamw"
    vocab = 50260
    cfg = dataclasses.replace(load_params("params.yaml").train, seq_len=seq, micro_batch_size=mb, grad_accum=1, optimizer=optimizer,
                              precision=precision, gradient_checkpointing=False, compile=variant.endswith("compile"))
    if variant == "gelu_saved":
        import moechat.model.modeling_moechat as modeling

        modeling.gelu_then = lambda linear, h: linear(torch.nn.functional.gelu(h, approximate="tanh"))
    torch.manual_seed(0)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=vocab, n_positions=seq, num_experts_per_tok=2, moe_every=2,
                                             pad_token_id=0, eos_token_id=2, **dims))
    if cfg.compile:
        compile_blocks(model)
    wrapped = FullLogitsLoss(model) if variant == "full_logits" else model
    accelerator = build_accelerator(cfg, precision, None)
    optimizer_ = build_optimizer(model, cfg, offload=False)
    wrapped, optimizer_ = accelerator.prepare(wrapped, optimizer_)
    drop_fp32_output_copy(wrapped)
    wrapped.train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(warmup + steps):
        ids = torch.randint(3, vocab, (mb, seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone(),
                        "position_ids": (torch.arange(seq) % 256).expand(mb, seq).contiguous()})
    targets = mb * (seq - 1)
    base_rss = rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    timed = 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        stats = train_step(wrapped, optimizer_, accelerator, [batch], targets, 1.0, i + 1)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            timed += time.perf_counter() - t0
    row = {"variant": variant, "tokens_per_s": round(steps * mb * seq / timed, 1), "last_loss": round(stats.loss, 4),
           "micro_batch": mb, "seq_len": seq, "vocab": vocab, "precision": precision, **dims}
    if cuda:
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["peak_over_setup_gib"] = round((torch.cuda.max_memory_allocated() - base_alloc) / 2**30, 3)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["peak_rss_over_setup_gib"] = round(max(peak - base_rss, 0) / 2**30, 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 cuda, 3 cpu)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the subprocess's one variant
    ap.add_argument("--out", type=Path, default=Path("metrics/bench_train_variants.json"))
    args = ap.parse_args()
    steps = args.steps or (10 if args.device == "cuda" else 3)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.device, steps, args.warmup)))
        return
    rows = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(steps),
                               "--warmup", str(args.warmup), "--variant", variant],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # recorded, not hidden
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["variant"]: r for r in rows if "error" not in r}
    mem_key = "peak_over_setup_gib" if args.device == "cuda" else "peak_rss_over_setup_gib"
    ratios = {}
    if "full_logits" in by and "chunked" in by:
        ratios["chunked_over_full_tokens_per_s"] = round(
            by["chunked"]["tokens_per_s"] / by["full_logits"]["tokens_per_s"], 3)
        if by["full_logits"][mem_key]:
            ratios["chunked_over_full_step_memory"] = round(by["chunked"][mem_key] / by["full_logits"][mem_key], 3)
    if "gelu_saved" in by and "chunked" in by:
        ratios["gelu_recomputed_over_saved_tokens_per_s"] = round(
            by["chunked"]["tokens_per_s"] / by["gelu_saved"]["tokens_per_s"], 3)
        if by["gelu_saved"][mem_key]:
            ratios["gelu_recomputed_over_saved_step_memory"] = round(
                by["chunked"][mem_key] / by["gelu_saved"][mem_key], 3)
    if "chunked" in by and "chunked+compile" in by:
        ratios["compile_over_eager_tokens_per_s"] = round(
            by["chunked+compile"]["tokens_per_s"] / by["chunked"]["tokens_per_s"], 3)
    report = {"device": device_name(args.device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "timed_steps": steps, "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"train_variants on {report['device']}: {ratios} -> {args.out}")


if __name__ == "__main__":
    main()
