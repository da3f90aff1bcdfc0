"""`moechat chat` edges a first session meets: sampling flags generate would misuse, output piped into
`head`, the loading notice on a terminal, /help, and `moechat` without a command."""

from __future__ import annotations

import io
import os
import pty
import select
import shutil
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moechat.cli.chat import MAX_SEED, main as chat_main
from moechat.cli.main import main as cli_main
from tests.support.tiny import export_tiny

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
MOECHAT = [sys.executable, "-m", "moechat.cli"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("flags")
    export_tiny(tmp)
    return tmp / "export"


@pytest.mark.parametrize("flags, line", [
    (["--temperature", "nan"], "--temperature=nan must be a finite number >= 0 (0 = greedy)"),
    (["--temperature", "inf"], "--temperature=inf must be a finite number >= 0 (0 = greedy)"),
    (["--temperature", "-0.5"], "--temperature=-0.5 must be a finite number >= 0 (0 = greedy)"),
    (["--top-p", "nan"], "--top-p=nan must be in (0, 1]"),
    (["--seed", "99999999999999999999999"], f"--seed=99999999999999999999999 must be an integer from 0 to {MAX_SEED}"),
    (["--seed", "-1"], f"--seed=-1 must be an integer from 0 to {MAX_SEED}"),
])
def test_sampling_flags_generate_would_misuse_are_one_line(export, capsys, flags, line):
    assert chat_main([str(export), "--prompt", "Hi", *flags]) == 1
    assert capsys.readouterr().err == f"moechat chat: {line}\n"


def test_the_largest_seed_samples(export, capsys):
    assert chat_main([str(export), "--prompt", "Hi", "--seed", str(MAX_SEED), "--max-new-tokens", "3",
                      "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""


def test_help_command_is_not_sent_to_the_model(export, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/help\n/exit\n")))
    assert chat_main([str(export), "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "bot> " not in out  # nothing went to the model
    assert out.splitlines()[1:4] == ["you>   /help   list these commands",
                                     "  /reset  clear the conversation and start over",
                                     "  /exit   quit (so do end of input and Ctrl-C)"]
    help_text = subprocess.run([*MOECHAT, "chat", "--help"], capture_output=True, text=True, env=ENV, timeout=60,
                               check=True).stdout
    assert help_text.endswith("commands in a session:\n  /help   list these commands\n  /reset  clear the "
                              "conversation and start over\n  /exit   quit (so do end of input and Ctrl-C)\n")


@pytest.mark.slow  # the CLI in subprocesses
@pytest.mark.parametrize("mode", ["--prompt", "interactive"])
def test_output_piped_into_head_exits_quietly(export, mode):
    args = ["--prompt", "Tell me about the sea."] if mode == "--prompt" else []
    cmd = shlex.join([*MOECHAT, "chat", str(export), "--device", "cpu", "--max-new-tokens", "20", *args])
    stdin = b"Tell me about the sea.\nMore?\n" if mode == "interactive" else b""
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -c 1"], input=stdin, capture_output=True,
                          env=ENV, timeout=300)
    assert (proc.returncode, len(proc.stdout), proc.stderr) == (141, 1, b"")  # one byte (maybe half a character)


@pytest.mark.slow
def test_a_terminal_sees_the_loading_notice_at_once(export):
    """stderr on a terminal shows `loading <folder> …` before the imports, erased once the model is loaded."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*MOECHAT, "chat", str(export), "--prompt", "Hi", "--device", "cpu", "--max-new-tokens",
                             "2"], stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    first = b""
    while select.select([master], [], [], 60)[0] and b"\xe2\x80\xa6" not in first:
        first += os.read(master, 1024)
    seen_running = proc.poll() is None  # the notice came while the model was still loading
    rest = b""
    while True:
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        rest += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    assert seen_running and first.decode() == f"loading {export} …"
    assert rest == b"\r\x1b[K"


def test_moechat_without_a_command_fails_with_usage(capsys):
    assert cli_main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("usage: moechat [--version] <command> [options]")


def test_a_reply_starting_with_a_space_token_is_shown_without_it(export, tmp_path, capsys):
    """A model whose every next token is ` sea` (the final norm outputs a constant, the head favours one
    row): the reply streams as `sea sea sea`, not ` sea sea sea`, and the history holds the same text."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(export, tmp_path / "spacey"))
    space_token = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False).encode(" sea")[0]
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.ln_f.weight"].zero_()
    tensors["transformer.ln_f.bias"].fill_(1.0)
    tensors["lm_head.weight"].zero_()
    tensors["lm_head.weight"][space_token] = 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert chat_main([str(folder), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "3",
                      "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "sea sea sea\n"
