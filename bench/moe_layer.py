"""MoE layer forward + backward, side by side.

At the reference dims (d 1024, FFN 4096, 10 experts, top-2) it times, on the same tokens and routing:
  ours          moechat's torch MoE block: assignments sorted by expert, two grouped matmuls (F.grouped_mm)
                on device offsets, the experts' nn.Linear weights stacked inside forward
  stack_only    that stacking alone (torch.stack of every expert's c_fc and c_proj, forward + backward):
                the price of keeping the per-expert parameter layout
  loop_sorted   the previous dispatch (same sort, then one nn.Linear call per expert on host split sizes)
  dense_ffn     a dense GPT-2 MLP with FFN top_k * 4096 = 8192: the same active FLOPs per token
  naive_masked  a loop over all experts, each run on every token and masked by its routing weight
  hf_<impl>     transformers' own experts implementations (NemotronHExperts: an un-gated up/down
                MLP like GPT-2's, no biases) with experts_implementation eager | grouped_mm
  tutel         moechat's block with model.moe_backend: tutel (same weights, routing and drop order;
                tutel's fast_encode/fast_decode kernels move the tokens), when tutel is importable
and writes metrics/bench_moe_layer.json with the device name, date, times and ratios.

    python bench/moe_layer.py --device cuda                  # bf16, 4 x 1024 tokens, d 1024, FFN 4096
    python bench/moe_layer.py                                # CPU, fp32, the same dims (about 5 minutes)
    python bench/moe_layer.py --d 256 --ffn 1024             # CPU, a quick look at a quarter of the width
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from moechat.model.auto import MoeChatConfig
from moechat.model.modeling_moechat import MoeChatMLP, MoeChatSparseMoeBlock
from benchlib import device_name
from moechat.atomic import write_json


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                 params: list[torch.nn.Parameter], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of y = fn(x); y.backward(grad), and peak device memory on CUDA."""
    device = x.device
    for _ in range(warmup):
        fn(x).backward(grad)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        for p in params:  # fresh gradients each step, as after optimizer.zero_grad(set_to_none=True)
            p.grad = None
        x.grad = None
        start = time.perf_counter()
        fn(x).backward(grad)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    result = {"ms": statistics.median(times), "ms_all": [round(t, 3) for t in times]}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def build_variants(block: MoeChatSparseMoeBlock, d: int, ffn: int, device: torch.device, dtype: torch.dtype
                   ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    top_k = block.top_k
    dense = MoeChatMLP(d, top_k * ffn, 0.0).to(device, dtype)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return block(x.unsqueeze(0))[0][0]

    def naive_masked(x: torch.Tensor) -> torch.Tensor:
        _, _, weights, experts = block.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(block.experts):
            w_e = (weights * (experts == e)).sum(-1, keepdim=True).to(x.dtype)
            out = out + w_e * expert(x)
        return out

    def loop_sorted(x: torch.Tensor) -> torch.Tensor:
        _, _, weights, experts = block.route(x)
        expert_A = experts.reshape(-1)
        order = torch.argsort(expert_A, stable=True)
        token_S = (torch.arange(expert_A.numel(), device=x.device) // top_k)[order]
        counts = torch.bincount(expert_A, minlength=block.num_experts)
        chunks = x[token_S].split(counts.tolist())
        y = torch.cat([e(c) for e, c in zip(block.experts, chunks) if c.shape[0] > 0])
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add(0, token_S, y)

    def stack_only(x: torch.Tensor) -> torch.Tensor:
        stacked = [torch.stack([getattr(e, name).weight.to(x.dtype) for e in block.experts])
                   for name in ("c_fc", "c_proj")]
        return x + 0 * sum(w.sum() for w in stacked)  # keeps x's shape so the same timing loop applies

    variants = {"ours": ours, "stack_only": stack_only, "loop_sorted": loop_sorted, "dense_ffn": dense,
                "naive_masked": naive_masked}
    for impl in ("eager", "grouped_mm"):
        config = SimpleNamespace(n_routed_experts=block.num_experts, hidden_size=d, moe_intermediate_size=ffn,
                                 moe_latent_size=None, mlp_hidden_act="gelu_pytorch_tanh",
                                 _experts_implementation=impl)
        hf = NemotronHExperts(config).to(device, dtype)
        with torch.no_grad():
            hf.up_proj.normal_(std=0.02)
            hf.down_proj.normal_(std=0.02)

        def hf_forward(x: torch.Tensor, hf=hf) -> torch.Tensor:
            _, _, weights, experts = block.route(x)
            return hf(x, experts, weights.to(x.dtype))

        hf_forward.hf = hf
        variants[f"hf_{impl}"] = hf_forward
    return variants


def tutel_variant(block: MoeChatSparseMoeBlock, config: MoeChatConfig, device: torch.device, dtype: torch.dtype
                  ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """`block`'s twin on the tutel backend (its weights copied), checked equal to `block` before timing;
    empty when tutel is not importable (it is not on PyPI: docs/engines.md says how to build it)."""
    if importlib.util.find_spec("tutel") is None:
        print("         tutel: not installed, skipped (docs/engines.md: build it from source)")
        return {}
    twin = MoeChatSparseMoeBlock(MoeChatConfig(**{**config.to_dict(), "moe_backend": "tutel"}))
    twin.load_state_dict(block.state_dict())
    twin = twin.to(device, dtype)
    twin.router.float()

    def tutel(x: torch.Tensor) -> torch.Tensor:
        return twin(x.unsqueeze(0))[0][0]

    tutel.parameters = twin.parameters
    probe = torch.randn(64, config.n_embd, device=device, dtype=dtype)
    tolerance = {} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}  # bf16: torch's defaults
    with torch.no_grad():
        torch.testing.assert_close(tutel(probe), block(probe.unsqueeze(0))[0][0], **tolerance)
    return {"tutel": tutel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on cuda, fp32 on cpu (bf16 matmuls are ~100x slower on AVX2 CPUs)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the layer (a micro-batch of 4 x 1024 or more)")
    parser.add_argument("--d", type=int, default=1024, help="model width (default: the reference's 1024)")
    parser.add_argument("--ffn", type=int, default=4096, help="expert FFN width (default: the reference's 4096)")
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on cuda, 1 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on cuda, 3 on cpu")
    parser.add_argument("--out", type=Path, default=Path("metrics/bench_moe_layer.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    tokens = args.tokens
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    repeats = args.repeats or (20 if cuda else 3)

    torch.manual_seed(0)
    config = MoeChatConfig(n_embd=args.d, n_inner=args.ffn, num_experts=args.experts,
                           num_experts_per_tok=args.top_k, n_head=1)
    block = MoeChatSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    block = block.to(device, dtype)
    block.router.float()
    x = torch.randn(tokens, args.d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, args.d, device=device, dtype=dtype)

    results: dict[str, dict] = {}
    variants = build_variants(block, args.d, args.ffn, device, dtype)
    variants.update(tutel_variant(block, config, device, dtype))
    params = [p for fn in variants.values() for p in getattr(fn, "parameters", lambda: [])()]
    params += list(block.parameters()) + [p for fn in variants.values() if hasattr(fn, "hf") for p in fn.hf.parameters()]
    # Rounds with every variant once each (warmed up in the first), so a change in the machine's load during
    # the run hits all variants alike; each variant's figure is its median over the rounds.
    for round_ in range(repeats):
        for name, fn in variants.items():
            if "error" in results.get(name, {}):
                continue
            try:
                timed = time_fwd_bwd(fn, x, grad, params, warmup if round_ == 0 else 0, 1)
            except (RuntimeError, NotImplementedError) as err:  # recorded, not hidden: e.g. no CPU kernel
                results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                continue
            row = results.setdefault(name, {"ms_all": []})
            row["ms_all"] += timed["ms_all"]
            row["ms"] = statistics.median(row["ms_all"])
            if "peak_mem_gib" in timed:
                row["peak_mem_gib"] = max(row.get("peak_mem_gib", 0.0), timed["peak_mem_gib"])
    for name, row in results.items():
        print(f"{name:>14}: " + (f"{row['ms']:9.2f} ms" if "ms" in row else row["error"]))

    ours = results["ours"]["ms"]
    ratios = {f"{name}_over_ours": round(r["ms"] / ours, 3) for name, r in results.items()
              if name != "ours" and "ms" in r}
    if "ms" in results["dense_ffn"]:
        ratios["ours_over_dense_ffn"] = round(ours / results["dense_ffn"]["ms"], 3)
    report = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens, "d": args.d, "ffn": args.ffn, "experts": args.experts, "top_k": args.top_k,
        "what": "forward + backward of one layer, median over repeats",
        "results": results,
        "ratios": ratios,
        "targets": {"ours_over_dense_ffn_max": 1.25, "naive_masked_over_ours_min": 3.0},
    }
    write_json(args.out, report)
    print(f"moe_layer on {report['device']} ({report['dtype']}, {tokens} tokens): ours {ours:.2f} ms; "
          f"ratios {ratios} -> {args.out}")


if __name__ == "__main__":
    main()
