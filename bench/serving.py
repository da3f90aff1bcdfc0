"""Serving speed: vLLM (OpenAI server, moechat-vllm plugin) vs `moechat chat`'s transformers generate, same export.

Each request is a chat prompt answered greedily with exactly `--new-tokens` tokens (end of turn ignored, so
both engines do the same work). Measured per engine:
- 1 request: output tokens/s (new tokens / request wall time) and time to first token (TTFT);
- 16 concurrent requests: aggregate output tokens/s (all new tokens / wall time until the last finishes) and
  mean TTFT. `moechat chat` answers one conversation at a time, so its 16 run one after another; a batched
  transformers `generate` of the 16 (left-padded) is shown too, as the best a plain generate call does.
vLLM runs as its OpenAI server (`python -m vllm.entrypoints.openai.api_server`) from the vLLM environment
($MOECHAT_VLLM_PYTHON, default .venv-vllm/bin/python), queried over HTTP with streaming; transformers runs
in this process in chat's dtype (fp32 on a CPU, bf16 on a GPU), on CPU with as many torch threads as
vLLM's engine uses on a 2-core machine (`--threads`, 1). Writes metrics/bench_serving.json.

    python bench/serving.py                       # a widened random-init model (the serving tiny export's shape)
    python bench/serving.py --model models/export # the pipeline's export (after dvc repro)
    python bench/serving.py --device cuda         # GPU run (bench/gpu.sh); vLLM then needs a CUDA vLLM env
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from benchlib import device_name
from moechat.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MOECHAT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CONCURRENT = 16
TOPICS = ["the sea", "a red fox", "python lists", "autumn leaves", "mixture of experts", "green tea", "the moon",
          "a small boat", "binary search", "mountain rivers", "old maps", "rainy days", "jazz", "bread", "owls", "snow"]
# The serving tiny export widened to a size where the matmuls, not Python, dominate (random init: speed only).
BENCH_DIMS = dict(n_embd=256, n_head=8, n_inner=1024, n_layer=4, num_experts=8, num_experts_per_tok=2,
                  n_positions=512)


def chats() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Tell me about {t}, please, in a few words."}] for t in TOPICS]


class FirstTokenClock(BaseStreamer):
    """Records when generate() emits its first new token (its first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def transformers_side(folder: Path, device: str, new_tokens: int) -> dict:
    """moechat chat's loader and generate call, greedy, eos disabled so every reply is `new_tokens` long."""
    from moechat.cli.chat import load_for_chat

    model, tokenizer = load_for_chat(folder, torch.device(device), trust_remote_code=True)
    model.generation_config.eos_token_id = None
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"].to(device) for c in chats()]

    def one(ids: torch.Tensor) -> tuple[float, float]:
        clock, start = FirstTokenClock(), time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, streamer=clock)
        assert out.shape[1] - ids.shape[1] == new_tokens
        return clock.first - start, time.perf_counter() - start

    one(prompts[0])  # warm-up
    ttft, total = one(prompts[0])
    start, ttfts = time.perf_counter(), []
    for ids in prompts:  # one conversation at a time, as `moechat chat` answers
        first, _ = one(ids)
        ttfts.append(time.perf_counter() - start - (_ - first))
    sequential_s = time.perf_counter() - start
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [p[0].tolist() for p in prompts]}, return_tensors="pt").to(device)
    clock, start = FirstTokenClock(), time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                   streamer=None)
    batched_s = time.perf_counter() - start
    n = len(prompts) * new_tokens
    return {"single": {"tokens_per_s": new_tokens / total, "ttft_s": ttft},
            "concurrent": {"tokens_per_s": n / sequential_s, "mean_ttft_s": statistics.mean(ttfts),
                           "mode": "one after another (moechat chat)"},
            "batched_generate": {"tokens_per_s": n / batched_s, "ttft_s": None}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(folder: Path, dtype: str, port: int, log: Path, memory_share: float) -> subprocess.Popen:
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--trust-remote-code", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", str(memory_share), "--served-model-name", "moechat"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench/serving.py: vLLM server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(2)
    proc.terminate()
    raise SystemExit(f"bench/serving.py: vLLM server not ready after 900 s (log: {log})")


def stream_chat(port: int, messages: list[dict], new_tokens: int, start: float) -> tuple[float, float, int]:
    """(TTFT, finish time, tokens) of one streamed /v1/chat/completions request, times from `start`."""
    body = {"model": "moechat", "messages": messages, "max_tokens": new_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            got = sum(len(c.get("token_ids") or []) for c in json.loads(line[6:])["choices"])
            if got and first is None:
                first = time.perf_counter() - start
            tokens += got
    return first, time.perf_counter() - start, tokens


def vllm_side(port: int, new_tokens: int) -> dict:
    messages = chats()
    stream_chat(port, messages[0], new_tokens, time.perf_counter())  # warm-up
    ttft, total, tokens = stream_chat(port, messages[0], new_tokens, time.perf_counter())
    assert tokens == new_tokens, tokens
    results, start = [None] * CONCURRENT, time.perf_counter()

    def run(i: int) -> None:
        results[i] = stream_chat(port, messages[i], new_tokens, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r[2] == new_tokens for r in results), results
    wall = max(r[1] for r in results)
    return {"single": {"tokens_per_s": new_tokens / total, "ttft_s": ttft},
            "concurrent": {"tokens_per_s": CONCURRENT * new_tokens / wall,
                           "mean_ttft_s": statistics.mean(r[0] for r in results), "mode": "16 concurrent HTTP streams"}}


def build_folder(scratch: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support.serving_tiny import export_serving_tiny

    return export_serving_tiny(scratch / "export", steps=0, **BENCH_DIMS)


def print_table(result: dict) -> None:
    v, t = result["vllm"], result["transformers"]
    rows = [("1 request: tokens/s", v["single"]["tokens_per_s"], t["single"]["tokens_per_s"]),
            ("1 request: TTFT s", v["single"]["ttft_s"], t["single"]["ttft_s"]),
            ("16 concurrent: tokens/s", v["concurrent"]["tokens_per_s"], t["concurrent"]["tokens_per_s"]),
            ("16 concurrent: mean TTFT s", v["concurrent"]["mean_ttft_s"], t["concurrent"]["mean_ttft_s"]),
            ("16 batched generate: tokens/s", None, t["batched_generate"]["tokens_per_s"])]
    print(f"{result['device']}, {result['new_tokens']} new tokens per request")
    print(f"{'':32s}{'vLLM':>10s}{'transformers':>14s}{'vLLM/tf':>9s}")
    for name, a, b in rows:
        ratio = f"{a / b:8.2f}x" if a and b else ""
        print(f"{name:32s}{a if a is not None else float('nan'):10.3f}{b:14.3f}{ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported folder (default: a widened random-init tiny export)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--memory-share", type=float, default=0.15, help="vLLM --gpu-memory-utilization (on CPU: of RAM)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for transformers on CPU; vLLM's CPU engine runs 1 on a 2-core machine (it "
                        "reserves a core), and 2 OpenMP threads on a shared 2-core machine run ~25x slower")
    p.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_serving.json")
    args = p.parse_args()
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"bench/serving.py: {VLLM_PYTHON} not found; install the vLLM environment (README.md) "
                         f"or set MOECHAT_VLLM_PYTHON")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or build_folder(Path(scratch))
        dtype = "float32" if args.device == "cpu" else "bfloat16"  # chat's dtype on each device
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        transformers_result = transformers_side(folder, args.device, args.new_tokens)
        port, log = free_port(), Path(scratch) / "vllm.log"
        server = start_vllm(folder, dtype, port, log, args.memory_share)
        try:
            vllm_result = vllm_side(port, args.new_tokens)
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {"device": device_name(args.device), "date": datetime.date.today().isoformat(), "dtype": dtype,
              "model": str(args.model) if args.model else {"random_init": BENCH_DIMS}, "new_tokens": args.new_tokens,
              "concurrent": CONCURRENT, "torch_threads": torch.get_num_threads(), "vllm": vllm_result, "transformers": transformers_result,
              "ratios": {"single_tokens_per_s": vllm_result["single"]["tokens_per_s"]
                         / transformers_result["single"]["tokens_per_s"],
                         "concurrent_tokens_per_s": vllm_result["concurrent"]["tokens_per_s"]
                         / transformers_result["concurrent"]["tokens_per_s"],
                         "single_ttft": vllm_result["single"]["ttft_s"] / transformers_result["single"]["ttft_s"]}}
    write_json(args.out, result)
    print_table(result)


if __name__ == "__main__":
    main()
