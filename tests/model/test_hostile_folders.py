"""Hostile model and tokenizer folders, through the entry points users run (`moechat chat`, the stage
scripts): tokenizer code never runs and transformers never prompts for it, no pickle is ever opened, missing /
unexpected / mis-shaped tensors and absurd sizes are refused before anything is allocated, NaN weights,
broken chat templates and the folder's generation settings are handled, each failure in one exact line."""

from __future__ import annotations

import json
import os
import pickle
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moechat.cli.chat import main as chat_main
from moechat.model.folder_checks import INTACT, PIPELINE_NO_CODE
from moechat.model.folder import CHAT_NO_CODE
from tests.support.tiny import export_tiny, tiny_params, write_prepared

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
# Runs a stage script or `moechat` with an audit hook that reports any open() of a file named argv[1].
AUDITED = """
import runpy, sys
watched, target = sys.argv.pop(1), sys.argv.pop(1)
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).endswith(watched)
                 and sys.stderr.write(f"OPENED {args[0]}\\n"))
if target.endswith(".py"):
    sys.argv[0] = target
    runpy.run_path(target, run_name="__main__")
from moechat.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


class Marker:
    """Unpickling it creates `path` (as a pickle from anywhere could run any code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One tiny export (models/export as the export stage writes it), prepared data and a params file."""
    tmp = tmp_path_factory.mktemp("hostile")
    _, tok = export_tiny(tmp)
    write_prepared(tok, tmp / "prepared")
    tiny_params(tmp / "params.yaml", eval={"lm_eval_tasks": []})
    return tmp


@pytest.fixture(scope="module")
def raw(base) -> Path:
    """The download stage's output for the bundled fixture: prepare's input."""
    subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(base / "params.yaml"),
                    "--out", str(base / "raw"), "--metrics", str(base / "m" / "download.json")],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return base / "raw"


def copy_export(base: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(base / "export", tmp_path / name))


def stage(name: str, *args: str, audit: str | None = None) -> subprocess.CompletedProcess:
    script = str(ROOT / "stages" / f"{name}.py")
    cmd = [sys.executable, "-c", AUDITED, audit, script] if audit else [sys.executable, script]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def stage_args(name: str, base: Path, model: Path, out: Path) -> list[str]:
    """The dvc.yaml command line of a model-loading stage, writing under `out`."""
    data, params = str(base / "prepared"), str(base / "params.yaml")
    return {
        "evaluate": ["--model", str(model), "--data", data, "--metrics", str(out / "eval.json"), "--samples",
                     str(out / "samples.json"), "--plots", str(out / "plots"), "--params", params, "--device", "cpu"],
        "export": ["--model", str(model), "--metrics-dir", str(out), "--out", str(out / "export"), "--params", params],
        "quantize": ["--model", str(model), "--data", data, "--out", str(out / "q"), "--metrics", str(out / "q.json"),
                     "--experts", str(out / "experts.json"), "--params", params, "--device", "cpu"],
        "train": ["--params", params, "--data", data, "--init", str(model), "--checkpoints", str(out / "ckpt"),
                  "--out", str(out / "final"), "--live", str(out / "live"), "--metrics", str(out / "train.json")],
    }[name]


def chat(capsys, folder: Path, *flags: str) -> tuple[int, str, str]:
    code = chat_main([str(folder), "--prompt", "Tell me about the sea.", "--max-new-tokens", "4",
                      "--temperature", "0", "--device", "cpu", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------- tokenizer code
def make_tokenizer_hostile(folder: Path, marker: Path) -> str:
    """An auto_map to evil_tok.py (which creates `marker` when imported); returns the refusal's reason."""
    (folder / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil_tok.EvilTok", "evil_tok.EvilTok"]}, tokenizer_class="EvilTok")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return (f"{folder / 'tokenizer_config.json'}: auto_map names the folder's own tokenizer code "
            f'({{"AutoTokenizer": ["evil_tok.EvilTok", "evil_tok.EvilTok"]}}), which would run with your permissions')


def run_in_terminal(cmd: list[str], answer: bytes) -> tuple[int, str, str]:
    """`cmd` with stdin and stdout on a pseudo-terminal (where transformers would ask its y/N question),
    `answer` already typed; returns the exit status, the terminal's text and stderr."""
    master, slave = pty.openpty()
    os.write(master, answer)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    os.close(slave)
    screen = b""
    while proc.poll() is None or select.select([master], [], [], 0.1)[0]:
        if select.select([master], [], [], 0.1)[0]:
            try:
                screen += os.read(master, 65536)
            except OSError:  # the terminal closed with the process
                break
    os.close(master)
    return proc.wait(timeout=300), screen.decode(errors="replace"), proc.stderr.read().decode()


@pytest.mark.slow  # stage scripts as subprocesses
def test_prepare_refuses_tokenizer_code_without_asking_on_a_terminal(base, raw, tmp_path):
    hostile = copy_export(base, tmp_path, "tok")
    marker = tmp_path / "ran"
    reason = make_tokenizer_hostile(hostile, marker)
    params = tiny_params(tmp_path / "params.yaml", tokenizer={"source": str(hostile)})
    code, screen, err = run_in_terminal(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", str(params), "--raw", str(raw),
         "--out", str(tmp_path / "prepared"), "--tokenizer-out", str(tmp_path / "tokenizer"), "--metrics",
         str(tmp_path / "prepare.json")], answer=b"y\n")
    assert not marker.exists() and "[y/N]" not in screen + err
    assert (code, err) == (1, f"prepare: error: {reason}; {PIPELINE_NO_CODE}\n")
    assert not (tmp_path / "tokenizer").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["evaluate", "export", "quantize"])
def test_model_stages_refuse_tokenizer_code(base, tmp_path, name):
    hostile = copy_export(base, tmp_path)
    marker = tmp_path / "ran"
    reason = make_tokenizer_hostile(hostile, marker)
    proc = stage(name, *stage_args(name, base, hostile, tmp_path / "out"))
    assert not marker.exists()
    assert (proc.returncode, proc.stderr) == (1, f"{name}: error: {reason}; {PIPELINE_NO_CODE}\n")


def test_chat_refuses_tokenizer_code_unless_trusted(base, tmp_path, capsys):
    hostile = copy_export(base, tmp_path)
    marker = tmp_path / "ran"
    reason = make_tokenizer_hostile(hostile, marker)
    assert chat(capsys, hostile) == (1, "", f"moechat chat: {reason}; {CHAT_NO_CODE}\n")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ pickle
def pickle_behind_an_index(folder: Path, marker: Path) -> str:
    """model.safetensors replaced by a dummy one and an index mapping every tensor to a pickle."""
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save_file({}, folder / "dummy.safetensors")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({n: Marker(marker) for n in names}))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "pytorch_model.bin" for n in names}}))
    return (f"{folder / 'model.safetensors.index.json'}: maps tensors to pytorch_model.bin, not .safetensors files "
            f"in the folder; moechat reads safetensors only and never unpickles: re-save the model with "
            f"save_pretrained(safe_serialization=True)")


@pytest.mark.slow
def test_a_pickle_behind_an_index_is_never_opened(base, tmp_path):
    folder = copy_export(base, tmp_path)
    marker = tmp_path / "unpickled"
    line = pickle_behind_an_index(folder, marker)
    proc = subprocess.run([sys.executable, "-c", AUDITED, "pytorch_model.bin", "moechat", "chat", str(folder),
                           "--prompt", "Hi", "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode, proc.stderr) == (1, f"moechat chat: {line}\n")
    proc = stage("evaluate", *stage_args("evaluate", base, folder, tmp_path / "out"), audit="pytorch_model.bin")
    assert (proc.returncode, proc.stderr) == (1, f"evaluate: error: {line}\n")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- tensors
def keep_tensors(folder: Path, keep) -> list[str]:
    """Rewrite model.safetensors with the tensors `keep(name)` accepts; returns the dropped names, sorted."""
    tensors = load_file(folder / "model.safetensors")
    save_file({n: t for n, t in tensors.items() if keep(n)}, folder / "model.safetensors", metadata={"format": "pt"})
    return sorted(n for n in tensors if not keep(n))


def listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


@pytest.mark.parametrize("case", ["zero tensors", "no lm_head", "only LayerNorm and wte"])
def test_chat_refuses_missing_tensors(base, tmp_path, capsys, case):
    folder = copy_export(base, tmp_path)
    keep = {"zero tensors": lambda n: False, "no lm_head": lambda n: n != "lm_head.weight",
            "only LayerNorm and wte": lambda n: ".ln_" in n or "wte" in n}[case]
    missing = keep_tensors(folder, keep)
    expected = f"moechat chat: {folder}: the tensors do not match config.json: {len(missing)} missing: " \
               f"{listed(missing)}; {INTACT}\n"
    assert chat(capsys, folder) == (1, "", expected)


def test_unexpected_and_misshaped_tensors_are_named(base, tmp_path, capsys):
    import torch

    folder = copy_export(base, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.mlp.experts.0.c_fc.weight"] = torch.zeros(3, 5)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shape = list(load_file(base / "export" / "model.safetensors")["transformer.h.1.mlp.experts.0.c_fc.weight"].shape)
    assert chat(capsys, folder) == (1, "", (
        f"moechat chat: {folder}: the tensors do not match config.json: 1 unexpected: extra.weight; 1 mis-shaped: "
        f"transformer.h.1.mlp.experts.0.c_fc.weight (transformer.h.1.mlp.experts.0.c_fc.weight is [3, 5] in the "
        f"file, {shape} in the model); {INTACT}\n"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "evaluate", "export", "quantize"])
def test_stages_refuse_a_model_without_its_head(base, tmp_path, name):
    folder = copy_export(base, tmp_path)
    keep_tensors(folder, lambda n: n != "lm_head.weight")
    proc = stage(name, *stage_args(name, base, folder, tmp_path / "out"))
    assert (proc.returncode, proc.stderr) == (
        1, f"{name}: error: {folder}: the tensors do not match config.json: 1 missing: lm_head.weight; {INTACT}\n")
    assert not (tmp_path / "out" / "export").exists() and not (tmp_path / "out" / "q").exists()


def test_a_tied_head_may_be_left_out(base, tmp_path, capsys):
    """tie_word_embeddings: the head is the embedding, so a folder without lm_head is complete."""
    folder = copy_export(base, tmp_path)
    keep_tensors(folder, lambda n: n != "lm_head.weight")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    code, out, err = chat(capsys, folder)
    assert (code, err) == (0, "") and out.endswith("\n")


@pytest.mark.parametrize("key, value, found", [("n_layer", 1_000_000, 2), ("num_experts", 1_000_000, 4),
                                               ("vocab_size", 1_000_000_000, None)])
def test_absurd_sizes_are_refused_before_allocating(base, tmp_path, capsys, key, value, found):
    folder = copy_export(base, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    found = config["vocab_size"] if found is None else found
    (folder / "config.json").write_text(json.dumps(config | {key: value}))
    assert chat(capsys, folder) == (1, "", (
        f"moechat chat: {folder / 'config.json'}: {key}={value} but the weights hold {found}; the config does not "
        f"belong to these weights: re-export the folder\n"))


def test_nan_weights_are_refused(base, tmp_path, capsys):
    import torch

    folder = copy_export(base, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    tensors["transformer.wpe.weight"][1, 1] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(folder / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]).any()
    assert chat(capsys, folder) == (1, "", (
        f"moechat chat: {folder}: 2 weight tensors hold NaN or inf (transformer.h.0.attn.c_attn.weight, "
        f"transformer.wpe.weight); use an intact model (the last checkpoint with finite weights, then dvc repro "
        f"export)\n"))


# ------------------------------------------------------------------------ templates, generation settings
TEMPLATE_FIX = "fix chat_template.jinja in the model folder, or re-export the model (dvc repro export)"


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m['content'] * 100000000 }}{% endfor %}",
     "TemplateTooLarge: `* 100000000` would build 500,000,000 items"),
    ("{{ raise_exception('no chat here') }}", "TemplateError: no chat here"),
    ("{% for m in messages %}{{ m.content", "TemplateSyntaxError: unexpected end of template, expected 'end of print "
                                           "statement'."),
    ("{{ messages.__class__.__mro__ }}", "SecurityError: access to attribute '__class__' of 'list' object is unsafe."),
    ("{% for i in range(99999) %}{% for j in range(99999) %}xx{% endfor %}{% endfor %}",
     "TemplateTooLarge: its output passed 65,546 characters for 5 of messages"),
])
def test_a_broken_chat_template_is_one_line(base, tmp_path, capsys, template, reason):
    folder = copy_export(base, tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    assert chat(capsys, folder) == (1, "", f"moechat chat: the model's chat template fails ({reason}); "
                                           f"{TEMPLATE_FIX}\n")


def test_the_folders_generation_settings_are_named_and_not_used(base, tmp_path, capsys):
    reference = chat(capsys, base / "export")
    folder = copy_export(base, tmp_path)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings.update(num_beams=1000, max_length=3, repetition_penalty=50.0)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    code, out, err = chat(capsys, folder)
    assert (code, out) == (0, reference[1])  # the same greedy reply as the clean folder
    assert err == (f"(ignoring {folder / 'generation_config.json'}: max_length=3, num_beams=1000, "
                   f"repetition_penalty=50.0; chat generates with its own --temperature, --top-p and "
                   f"--max-new-tokens)\n")


@pytest.mark.slow
def test_trusted_folder_code_with_a_syntax_error_is_one_line(base, tmp_path):
    """In a fresh process, as users run it: there the flag makes transformers import the folder's code."""
    folder = copy_export(base, tmp_path)
    with open(folder / "modeling_moechat.py", "a", encoding="utf-8") as f:
        f.write("\ndef broken(:\n")
    line = len((folder / "modeling_moechat.py").read_text().splitlines())
    proc = subprocess.run([sys.executable, "-m", "moechat.cli", "chat", str(folder), "--prompt", "Hi", "--device",
                           "cpu", "--trust-remote-code"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", (
        f"moechat chat: {folder}: modeling_moechat.py line {line}: SyntaxError: invalid syntax; the folder's code "
        f"does not compile: leave out --trust-remote-code to use the installed moechat code\n"))
