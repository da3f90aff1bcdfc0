"""`moechat chat`: one-shot --prompt and an interactive session (history, /reset, /exit) on exported and
quantized folders, checked against direct greedy generation."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moechat.chat import Chat, interactive
from moechat.config import QuantizeConfig
from moechat.data.chat import load_packed
from moechat.export import export_model
from moechat.config import load_params
from tests._release_tiny import tiny_model, tiny_tokenizer, write_prepared

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _greedy(model, tok, messages, n):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=6)
    export_model(model, tok, load_params(ROOT / "params.yaml"), {}, tmp / "export")
    return tmp, model, tok


def _cli(*args: str, stdin: str = "") -> str:
    proc = subprocess.run([sys.executable, "-m", "moechat.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_prompt_one_shot_streams_the_greedy_reply(exported):
    tmp, model, tok = exported
    out = _cli(str(tmp / "export"), "--prompt", "Tell me about the sea.", "--max-new-tokens", "8",
               "--temperature", "0", "--device", "cpu")
    expected = _greedy(model, tok, [{"role": "user", "content": "Tell me about the sea."}], 8)
    assert out.rstrip("\n") == expected.rstrip("\n")


def test_interactive_session_with_reset_and_exit(exported):
    tmp, model, tok = exported
    out = _cli(str(tmp / "export"), "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu",
               stdin="Tell me about the sea.\nMore?\n/reset\nMore?\n/exit\nnever read\n")
    first = _greedy(model, tok, [{"role": "user", "content": "Tell me about the sea."}], 5).strip()
    second = _greedy(model, tok, [{"role": "user", "content": "Tell me about the sea."},
                                  {"role": "assistant", "content": first}, {"role": "user", "content": "More?"}], 5)
    fresh = _greedy(model, tok, [{"role": "user", "content": "More?"}], 5)
    assert "(conversation cleared)" in out
    assert out.count("you> ") == 5  # three messages, /reset and /exit; nothing after /exit is read
    turns = [t.split("\n")[0] for t in out.split("bot> ")[1:]]
    assert turns == [first.split("\n")[0], second.split("\n")[0], fresh.split("\n")[0]]


def test_history_follows_the_template_and_is_trimmed_to_fit(exported):
    _, model, tok = exported
    buf = io.StringIO()
    chat = Chat(model, tok, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=None, out=buf)
    interactive(chat, stdin=io.StringIO("Hi\nMore?\n"), out=buf)
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    long_text = "the sea " * 40  # ~ > n_positions / 2 tokens per turn
    for _ in range(3):
        chat.reply(long_text)
    ids = tok.apply_chat_template(chat.history[:-1], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert len(ids) + 4 <= model.config.n_positions
    assert chat.history[-2]["content"] == long_text


def test_chat_with_the_quantized_model_on_cpu(exported):
    tmp, model, tok = exported
    from moechat.quantize import quantize_stage

    prepared = write_prepared(tok, tmp / "prepared")
    quantize_stage(tmp / "export", prepared / "conversations_train.jsonl", load_packed(prepared, "val"),
                   QuantizeConfig(group_size=32, calib_samples=8, calib_max_tokens=64, min_expert_tokens=4),
                   seed=0, out_dir=tmp / "quantized")
    out = _cli(str(tmp / "quantized"), "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "0.8",
               "--seed", "3", "--device", "cpu")
    assert out.endswith("\n") and len(out.strip("\n")) <= 4 * 16
