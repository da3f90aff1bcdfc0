"""The memory planner against a measured training step, in each precision x checkpointing mode, on CPU.

The measurement is moechat.train.memtrack.step_peak_bytes: the peak of live tensor storages (counted by torch, not
by the host allocator) in the second micro-batch of an accumulation step, on packed rows through sdpa.
Writes metrics/bench_plan_modes.json; docs/performance.md quotes it.

    python bench/plan_modes.py                      # the test's scale (vocab 4096, d 64, 3 x 384), 4 modes
    python bench/plan_modes.py --scale review       # d 256, vocab 12,565, 8 layers, 10 experts, 4 x 1024 (fp32;
                                                    # bf16 matmuls crawl on an AVX2 CPU: add --bf16 to run them)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from moechat.train import plan
from moechat.config.params import load_params
from moechat.atomic import write_json
from moechat.train.memtrack import step_peak_bytes
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM

SCALES = {  # vocab, micro-batch, seq, width, layers, experts
    "test": (4096, 3, 384, 64, 4, 4),
    "review": (12565, 4, 1024, 256, 8, 10),
}


def measure(scale: str, precision: str, checkpointing: bool) -> dict[str, Any]:
    vocab, batch, seq, d, layers, experts = SCALES[scale]
    cfg = MoeChatConfig(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=layers, n_head=4, n_inner=4 * d,
                        num_experts=experts, num_experts_per_tok=2, moe_every=2, pad_token_id=None)
    torch.manual_seed(0)
    model = MoeChatForCausalLM(cfg).train()
    model.set_attn_implementation("sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    packed = (torch.arange(seq) % (seq // 2)).expand(batch, seq).contiguous()
    measured = step_peak_bytes(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                               {"input_ids": ids, "labels": ids, "position_ids": packed}, precision)
    train = dataclasses.replace(load_params("params.yaml").train, seq_len=seq, micro_batch_size=batch,
                                precision=precision, optimizer="adamw", gradient_checkpointing=checkpointing,
                                attn_implementation="sdpa", deepspeed=None)
    planned = plan.estimate(cfg, train, vocab, device_type="cpu").allocated_gb * plan.GIB
    return {"scale": scale, "precision": precision, "checkpointing": checkpointing,
            "measured_gib": round(measured / plan.GIB, 4), "planned_gib": round(planned / plan.GIB, 4),
            "error": round(planned / measured - 1, 4)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="test")
    ap.add_argument("--bf16", action="store_true", help="also bf16 at the review scale (slow on CPUs without AMX)")
    ap.add_argument("--out", default="metrics/bench_plan_modes.json")
    args = ap.parse_args(argv)
    precisions = ("fp32", "bf16") if args.scale == "test" or args.bf16 else ("fp32",)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = [r for r in result["rows"] if r["scale"] != args.scale]
    for precision in precisions:
        for checkpointing in (False, True):
            rows.append(measure(args.scale, precision, checkpointing))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
              "torch": torch.__version__, "measured_by": "moechat.train.memtrack.step_peak_bytes (live storages)",
              "rows": rows}
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
