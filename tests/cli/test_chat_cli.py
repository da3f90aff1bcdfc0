"""`moechat chat`: one-shot --prompt and an interactive session (history, /reset, /exit) on exported and
quantized folders, checked against direct greedy generation; the default reply length on a model with
n_positions < 256, the one-line error for an impossible --max-new-tokens, and a quiet stderr."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moechat.cli.chat import Chat, interactive, resolve_max_new_tokens

pytestmark = pytest.mark.slow  # trains, exports and quantizes a model, then runs the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _greedy(model, tok, messages, n):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def exported(tiny_release):
    return tiny_release["tmp"], tiny_release["model"], tiny_release["tok"]


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moechat.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=300, check=False)


def _cli(*args: str, stdin: str = "") -> str:
    proc = _run(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_prompt_one_shot_streams_the_greedy_reply(exported):
    tmp, model, tok = exported
    out = _cli(str(tmp / "export"), "--prompt", "Tell me about the sea.", "--max-new-tokens", "8",
               "--temperature", "0", "--device", "cpu")
    expected = _greedy(model, tok, [{"role": "user", "content": "Tell me about the sea."}], 8)
    assert out.rstrip("\n") == expected.rstrip("\n")


def test_default_max_new_tokens_fits_a_model_with_n_positions_below_256(exported):
    """No --max-new-tokens on a 128-position model: min(256, 128 // 2) = 64 new tokens, not a crash."""
    tmp, model, tok = exported
    assert model.config.n_positions == 128
    out = _cli(str(tmp / "export"), "--prompt", "Tell me about the sea.", "--temperature", "0", "--device", "cpu")
    expected = _greedy(model, tok, [{"role": "user", "content": "Tell me about the sea."}], 64)
    assert out.rstrip("\n") == expected.rstrip("\n")
    assert resolve_max_new_tokens(None, 128) == 64
    assert resolve_max_new_tokens(None, 1024) == 256
    assert resolve_max_new_tokens(None, None) == 256
    assert resolve_max_new_tokens(127, 128) == 127


@pytest.mark.parametrize("stdin", ["", "Hello\n"])
def test_impossible_max_new_tokens_is_one_line_naming_the_flag(exported, stdin):
    tmp, _, _ = exported
    args = [str(tmp / "export"), "--max-new-tokens", "128", "--device", "cpu"]
    proc = _run(*args, *(["--prompt", "Hello"] if not stdin else []), stdin=stdin)
    assert proc.returncode != 0
    assert proc.stdout == ""  # no "you> bot> " before the error
    assert proc.stderr.strip().splitlines() == [
        ("moechat chat: --max-new-tokens=128 must be < the model's n_positions=128; pass at most 127, or leave "
         "it out for min(256, n_positions // 2) = 64")]


def test_help_shows_the_defaults():
    out = subprocess.run([sys.executable, "-m", "moechat.cli", "chat", "--help"], capture_output=True, text=True,
                         env=ENV, timeout=60, check=True).stdout
    assert "(default: auto)" in out and "(default: 0.8)" in out and "--verbose" in out


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


def test_chat_with_the_quantized_model_on_cpu_prints_only_the_reply(exported):
    tmp, _, tok = exported
    from moechat.eval.generate import generate_reply
    from moechat.model.folder import load_tokenizer
    from moechat.model.gptq import load_quantized

    quiet = _run(str(tmp / "quantized"), "--prompt", "Hi", "--temperature", "0", "--device", "cpu")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    qmodel, qtok = load_quantized(tmp / "quantized", torch.device("cpu"), torch.float32), load_tokenizer(tmp / "quantized")
    expected = generate_reply(qmodel, qtok, [{"role": "user", "content": "Hi"}], 64)  # the default for 128 positions
    assert quiet.stdout.rstrip("\n") == expected.rstrip("\n")  # the reply and nothing else
    assert len(quiet.stderr.splitlines()) <= 3, quiet.stderr  # was ~50 lines of GPTQModel / torchao output
    assert "GPT-QModel" not in quiet.stderr and "torchao" not in quiet.stderr

    verbose = _run(str(tmp / "quantized"), "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "0.8",
                   "--seed", "3", "--device", "cpu", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "GPT-QModel" in verbose.stderr and "Kernel" in verbose.stderr  # GPTQModel's banner and kernel choice
    assert verbose.stdout.endswith("\n") and len(verbose.stdout.strip("\n")) <= 4 * 16
    assert "GPT-QModel" not in verbose.stdout
