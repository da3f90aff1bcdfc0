"""The vLLM half of tests/serving/test_vllm.py, run by the vLLM environment's Python (it never imports moechat).

    python tests/support/vllm_side.py REQUEST.json RESULT.json

REQUEST: {"model", "dtype", "max_tokens", "cases": [{"messages", "prompt_ids"}], "transformers_backend": bool,
"extra_tensor": bool}.
One engine start-up per entry point: the OpenAI server is started first (in the background) and the offline
`LLM` runs while it starts. The server runs as `vllm serve` does (API server, engine core and worker, three
processes); the offline `LLM` and the start-ups that must fail run engine core and worker inside their own
process (`IN_PROCESS_ENV`): the same model code, a third of the interpreter start-ups (each imports vLLM and
torch, 10-20 s on 2 cores). Greedy decoding with `ignore_eos`, so every case yields exactly `max_tokens` ids.
RESULT: per case the offline ids (from the given prompt ids, with their logprobs), the offline chat ids (vLLM's
own chat template), the HTTP ids (plain and streamed, with the prompt ids the server rendered), and the
output of the start-ups that must fail: `model_impl="transformers"` (`transformers_backend`) and the export
with one tensor too many (`extra_tensor`).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MEMORY_SHARE = 0.12  # on CPU the share of RAM vLLM reserves for weights and KV cache
MAX_MODEL_LEN = 256
SERVER_START_SECONDS = 600
# engine core and worker inside the calling process; without it vLLM's CPU platform spawns both (it turns the "uni"
# executor, the default for one device, into "mp" while multiprocessing is on)
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server on 127.0.0.1:port (compiled mode, vLLM's default)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--trust-remote-code",
           "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
           "--gpu-memory-utilization", str(MEMORY_SHARE), "--served-model-name", "moechat"]
    env = {k: v for k, v in os.environ.items() if k not in IN_PROCESS_ENV}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vLLM server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"vLLM server not ready after {SERVER_START_SECONDS} s:\n{log.read_text()[-4000:]}")


def offline(request: dict) -> tuple[list[dict], list[dict]]:
    """Greedy ids (and chosen-token logprobs) from the given prompt ids, and from vLLM's chat template."""
    os.environ.update(IN_PROCESS_ENV)  # read when vLLM builds the engine
    from vllm import LLM, SamplingParams

    llm = LLM(request["model"], trust_remote_code=True, dtype=request["dtype"], max_model_len=MAX_MODEL_LEN,
              gpu_memory_utilization=MEMORY_SHARE, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=0)
    cases = request["cases"]
    # no progress bar: with TQDM_DISABLE=1 in the environment (moechat's stages set it) vLLM 0.32's bar reports
    # 0 s elapsed and `generate` dies dividing by it
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases], params, use_tqdm=False)
    from_ids = [{"ids": list(o.outputs[0].token_ids),
                 "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                for o in outs]
    chats = llm.chat([c["messages"] for c in cases], params, use_tqdm=False)
    from_chat = [{"prompt_ids": list(o.prompt_token_ids), "ids": list(o.outputs[0].token_ids)} for o in chats]
    llm.llm_engine.engine_core.shutdown()  # frees the KV cache before the HTTP half runs
    return from_ids, from_chat


def post(port: int, body: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=300)


def http(port: int, request: dict) -> list[dict]:
    """/v1/chat/completions per case, plain then streamed, with `return_token_ids` (a vLLM extension)."""
    results = []
    for case in request["cases"]:
        body = {"model": "moechat", "messages": case["messages"], "max_tokens": request["max_tokens"],
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        with post(port, body) as r:
            reply = json.load(r)
        choice = reply["choices"][0]
        streamed, stream_prompt, chunks = [], None, 0
        with post(port, {**body, "stream": True}) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                chunks += 1
                stream_prompt = stream_prompt or chunk.get("prompt_token_ids")
                for c in chunk["choices"]:
                    streamed += c.get("token_ids") or []
        results.append({"prompt_ids": reply.get("prompt_token_ids"), "ids": choice["token_ids"],
                        "text": choice["message"]["content"], "stream_prompt_ids": stream_prompt,
                        "stream_ids": streamed, "stream_chunks": chunks})
    return results


def start_must_fail(model: str, model_impl: str, log: Path) -> subprocess.Popen:
    """Start `LLM(model, model_impl=...)` in a child process that prints SERVED if the engine comes up."""
    code = ("from vllm import LLM\nif __name__ == '__main__':\n"
            f"    LLM({model!r}, trust_remote_code=True, model_impl={model_impl!r}, dtype='float32', "
            f"max_model_len={MAX_MODEL_LEN}, gpu_memory_utilization={MEMORY_SHARE}, enforce_eager=True)\n"
            "    print('SERVED')\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **IN_PROCESS_ENV})


def with_extra_tensor(model: str, out: Path) -> str:
    """A copy of the export whose weights hold one tensor MoeChatForCausalLM does not have (a router bias)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    [shard] = out.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["transformer.h.1.mlp.router.bias"] = tensors["transformer.h.1.mlp.router.weight"][:, 0].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(out)


def finished(proc: subprocess.Popen, log: Path) -> dict:
    proc.wait(timeout=SERVER_START_SECONDS)
    return {"returncode": proc.returncode, "output": log.read_text()}


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    port, log = free_port(), out_path.with_suffix(".server.log")
    server = start_server(request["model"], request["dtype"], port, log)
    refusals = {}  # engines that must not come up, started now so their start-up overlaps the others
    if request.get("transformers_backend"):
        tb_log = out_path.with_suffix(".transformers-backend.log")
        refusals["transformers_backend"] = (start_must_fail(request["model"], "transformers", tb_log), tb_log)
    if request.get("extra_tensor"):
        corrupt = with_extra_tensor(request["model"], out_path.parent / f"{out_path.stem}-extra-tensor")
        extra_log = out_path.with_suffix(".extra-tensor.log")
        refusals["extra_tensor"] = (start_must_fail(corrupt, "auto", extra_log), extra_log)
    try:
        timings = {}
        start = time.monotonic()
        from_ids, from_chat = offline(request)
        timings["offline_s"] = time.monotonic() - start
        wait_ready(server, port, log)
        timings["server_ready_s"] = time.monotonic() - start
        served = http(port, request)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {"offline": from_ids, "offline_chat": from_chat, "http": served, "timings": timings}
    for name, (proc, refusal_log) in refusals.items():
        result[name] = finished(proc, refusal_log)
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Several engines run side by side here: let the OS place their threads (vLLM's default pins every
    # engine's OpenMP threads to the same core)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main()
