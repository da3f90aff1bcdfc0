"""`moechat chat` with bad input: each failure is one line naming the flag, file or stdin line (a traceback
only with --verbose); an over-long conversation keeps whole turns; Ctrl-C leaves quietly; quiet loading;
no heavy import before the checks that need none; sampling defaults shared with the evaluate stage."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moechat.cli.chat import Chat, PromptTooLong, build_parser, encode_chat, interactive
from moechat.config.params import EvalConfig

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_release):
    """A folder of this module's own holding a copy of the session's tiny export (the tests add broken ones)."""
    tmp = tmp_path_factory.mktemp("robust")
    shutil.copytree(tiny_release["export"], tmp / "export")
    return tmp, tiny_release["model"], tiny_release["tok"]


def _run(*args: str, stdin: bytes = b"", code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "moechat.cli", "chat", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=ENV, timeout=300, check=False)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def _broken_folder(tmp: Path, name: str, config: str | None, weights: bool = True) -> Path:
    folder = tmp / name
    shutil.copytree(tmp / "export", folder)
    if config is not None:
        (folder / "config.json").write_text(config)
    if not weights:
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


@pytest.mark.slow  # a subprocess through the entry point users run
def test_bad_folders_are_one_line_naming_the_file(exported):
    tmp, _, _ = exported
    cases = {
        "list": (_broken_folder(tmp, "list", "[1, 2]"), "config.json: expected a JSON object with the model's "
                                                        "settings, got a list"),
        "invalid": (_broken_folder(tmp, "invalid", '{"n_positions": 128,'), "config.json: invalid JSON "
                                                                           "(Expecting property name"),
        "no weights": (_broken_folder(tmp, "pickled", None, weights=False), "weights only in pickle files "
                                                                            "(pytorch_model.bin)"),
        "other model": (_broken_folder(tmp, "gpt2", json.dumps({"model_type": "gpt2"})),
                        "model_type='gpt2', not 'moechat'"),
    }
    for name, (folder, expected) in cases.items():
        line = _one_line_error(_run(str(folder), "--prompt", "Hi"))
        assert line.startswith(f"moechat chat: {folder}") and expected in line, (name, line)
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "moechat"}))
    assert "no weights (*.safetensors)" in _one_line_error(_run(str(empty), "--prompt", "Hi"))
    corrupt = _broken_folder(tmp, "corrupt", None)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    line = _one_line_error(_run(str(corrupt), "--prompt", "Hi", "--device", "cpu"))
    assert line.startswith(f"moechat chat: {corrupt / 'model.safetensors'}: not a readable safetensors file (")
    assert line.endswith("); re-save the model")  # its header is read before any loader sees the file
    verbose = _run(str(tmp / "list"), "--prompt", "Hi", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr.decode()


@pytest.mark.slow  # a subprocess through the entry point users run
def test_device_errors_come_before_the_heavy_imports(exported):
    tmp, _, _ = exported
    line = _one_line_error(_run(str(tmp / "export"), "--device", "tpu", "--prompt", "Hi"))
    assert line == "moechat chat: --device tpu: expected auto, cpu, cuda or cuda:N"
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    code = ("import sys; from moechat.cli.chat import main; code = main(sys.argv[1:]); "
            "heavy = [m for m in ('transformers', 'gptqmodel') if m in sys.modules]; print(heavy); sys.exit(code)")
    proc = _run(str(tmp / "export"), "--device", "cuda", "--prompt", "Hi", code=code)
    assert _one_line_error(proc) == ("moechat chat: --device cuda: no CUDA GPU is visible here; use --device cpu "
                                     "or auto")
    assert proc.stdout.decode().strip() == "[]"


@pytest.mark.slow  # a subprocess through the entry point users run
def test_full_precision_chat_is_quiet_and_never_imports_gptqmodel(exported):
    tmp, _, _ = exported
    code = ("import sys; from moechat.cli.chat import main; code = main(sys.argv[1:]); "
            "print('gptqmodel' in sys.modules); sys.exit(code)")
    proc = _run(str(tmp / "export"), "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu", code=code)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().splitlines()[-1] == "False"
    assert proc.stderr.decode() == ""  # no weight-loading bar, no library warnings
    verbose = _run(str(tmp / "export"), "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu", "--verbose")
    assert "Loading weights" in verbose.stderr.decode()


@pytest.mark.slow  # a subprocess through the entry point users run
def test_non_utf8_stdin_is_one_line_naming_the_line(exported):
    tmp, _, _ = exported
    proc = _run(str(tmp / "export"), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu",
                stdin=b"Hi\ncaf\xe9\nnever read\n")
    assert _one_line_error(proc) == ("moechat chat: stdin line 2 is not UTF-8 text (invalid continuation byte at "
                                     "byte 3); send UTF-8, e.g. through `iconv -f latin1 -t utf-8`")
    assert proc.stdout.decode().count("bot> ") == 1  # the first line was answered
    argv = [os.fsencode(sys.executable), b"-m", b"moechat.cli", b"chat", os.fsencode(tmp / "export"), b"--prompt",
            b"caf\xe9"]  # a Latin-1 argument reaches Python as a surrogate escape
    proc = subprocess.run(argv, capture_output=True, env=ENV, timeout=300, check=False)
    assert _one_line_error(proc) == ("moechat chat: --prompt is not UTF-8 text (surrogates not allowed at "
                                     "character 3); pass UTF-8")


@pytest.mark.slow  # a subprocess through the entry point users run
def test_ctrl_c_at_the_prompt_exits_quietly(exported):
    tmp, _, _ = exported
    proc = subprocess.Popen([sys.executable, "-m", "moechat.cli", "chat", str(tmp / "export"), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    seen = b""
    while not seen.endswith(b"you> "):
        chunk = proc.stdout.read(1)
        assert chunk, proc.stderr.read().decode()[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.decode() == "" and out == b"\n"


def test_long_conversation_drops_whole_oldest_turns_and_says_so(exported):
    _, model, tok = exported
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(model, tok, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None, out=out, err=err)
    turns = ["Tell me about the sea. " * 6, "Tell me about the moon. " * 6, "More?"]
    for text in turns:
        chat.reply(text)
    limit = model.config.n_positions
    kept = [m["content"] for m in chat.history if m["role"] == "user"]
    assert kept == turns[-len(kept):] and len(kept) < len(turns)
    assert err.getvalue().startswith(f"(dropped the oldest {2 * (len(turns) - len(kept))} turns to fit the model's "
                                     f"{limit} positions")
    prompt = encode_chat(tok, chat.history[:-1])
    assert len(prompt) + 8 <= limit
    assert prompt[0] == tok.convert_tokens_to_ids("<|im_start|>")  # a turn's header, never a cut one


@pytest.mark.slow  # a subprocess through the entry point users run
def test_a_turn_too_long_for_the_model_is_refused_whole(exported):
    tmp, model, tok = exported
    chat = Chat(model, tok, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None, out=io.StringIO(),
                err=io.StringIO())
    chat.reply("Hi")
    before = list(chat.history)
    with pytest.raises(PromptTooLong, match="your message is .* tokens .* at most 120 fit"):
        chat.reply("the sea " * 200)
    assert chat.history == before  # the earlier exchange stays, nothing of the refused turn
    out, err = io.StringIO(), io.StringIO()
    interactive(chat, stdin=io.StringIO("the sea " * 200 + "\nHi\n"), out=out, err=err)
    assert "shorten it or lower --max-new-tokens" in err.getvalue() and out.getvalue().count("bot> ") == 2
    line = _one_line_error(_run(str(tmp / "export"), "--prompt", "the sea " * 200, "--device", "cpu"))
    assert line.startswith("moechat chat: your message is")


def test_sampling_defaults_are_the_evaluate_stage_defaults():
    args = build_parser().parse_args(["models/export"])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["eval"]
    assert (args.temperature, args.top_p) == (EvalConfig().temperature, EvalConfig().top_p)
    assert (args.temperature, args.top_p) == (params["temperature"], params["top_p"])
