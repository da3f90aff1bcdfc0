"""Chat inference, full-precision export vs GPTQ 4-bit, side by side.

Each variant runs in its own process (so peak memory is its own): load the folder the way `moechat chat`
does, warm up, then greedy-generate `--new-tokens` tokens for each prompt through the chat template (eos
disabled so every run makes the same number of tokens). Reports decode tokens/s, load seconds, the
bytes the loaded weights occupy, the process's peak RSS (CPU) or peak allocated GPU memory (CUDA), and
writes metrics/bench_quant.json with the device name, date and the 4-bit / fp ratios.

    python bench/quantized_inference.py                          # CPU: fp32 export vs 4-bit (int8 CPU kernel)
    python bench/quantized_inference.py --device cuda            # GPU: bf16 export vs 4-bit (GPTQModel's kernel)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import device_name
from moechat.atomic import write_json

PROMPTS = ["What is a mixture-of-experts model?", "Write a haiku about autumn.", "How do I reverse a list in Python?"]


def measure(model_dir: Path, device: str, new_tokens: int) -> dict:
    """One variant in this process: load, warm up, time greedy decoding."""
    from moechat.cli.chat import load_for_chat

    dev = torch.device(device)
    start = time.perf_counter()
    model, tok = load_for_chat(model_dir, dev)
    load_s = time.perf_counter() - start
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    limit = model.config.n_positions
    new_tokens = min(new_tokens, limit // 2)

    def run(prompt: str) -> int:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        ids = enc["input_ids"][:, -(limit - new_tokens):].to(dev)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    run(PROMPTS[0])  # warm-up: kernel selection, caches
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = sum(run(p) for p in PROMPTS)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"model": str(model_dir), "load_seconds": load_s, "tokens": tokens, "seconds": seconds,
              "tokens_per_second": tokens / seconds, "weight_bytes_loaded": weight_bytes,
              # the files, as the quantize stage counts them (metrics/quantize.json weight_bytes_*); loaded
              # bytes differ: GPTQModel's CPU kernel repacks the 4-bit weights to int8 in memory
              "weight_bytes_on_disk": sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")),
              "kernel": sorted({type(m).__name__ for m in model.modules()
                                if type(m).__module__.startswith("gptqmodel")}) or ["nn.Linear"]}
    if dev.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp", type=Path, default=Path("models/export"))
    p.add_argument("--quantized", type=Path, default=Path("models/quantized"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("metrics/bench_quant.json"))
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # child mode: measure this folder, print JSON
    args = p.parse_args()
    if args.one is not None:
        print("BENCH " + json.dumps(measure(args.one, args.device, args.new_tokens)))
        return 0
    results = {}
    for name, folder in (("fp", args.fp), ("quantized", args.quantized)):
        proc = subprocess.run([sys.executable, __file__, "--one", str(folder), "--device", args.device,
                               "--new-tokens", str(args.new_tokens)], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench: measuring {folder} failed (exit {proc.returncode}); see the error above")
        line = [l for l in proc.stdout.splitlines() if l.startswith("BENCH ")][-1]
        results[name] = json.loads(line[len("BENCH "):])
    fp, q = results["fp"], results["quantized"]
    mem = "peak_gpu_bytes" if "peak_gpu_bytes" in fp else "peak_rss_bytes"
    report = {"device": device_name(args.device), "date": datetime.date.today().isoformat(),
              "new_tokens_per_prompt": args.new_tokens, "prompts": len(PROMPTS), **results,
              "ratio_tokens_per_second": q["tokens_per_second"] / fp["tokens_per_second"],
              "ratio_weight_bytes": q["weight_bytes_loaded"] / fp["weight_bytes_loaded"],
              f"ratio_{mem}": q[mem] / fp[mem]}
    write_json(args.out, report)
    print(f"bench_quant on {report['device']}: fp {fp['tokens_per_second']:.1f} tok/s, "
          f"4-bit {q['tokens_per_second']:.1f} tok/s (x{report['ratio_tokens_per_second']:.2f}); weights "
          f"{fp['weight_bytes_loaded']:,} -> {q['weight_bytes_loaded']:,} bytes; {mem} x{report[f'ratio_{mem}']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
