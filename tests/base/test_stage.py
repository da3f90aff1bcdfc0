"""Stage entry points: one shape for every script, a fixable error is one line naming the fix, third-party
warnings are filtered by run_stage (importing moechat.stage does nothing)."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import yaml

import pytest

from moechat.quiet import QUIET_ENV, quiet_third_party
from moechat.stage import run_stage
from moechat.train.loop import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[2]
STAGE_SCRIPTS = sorted((ROOT / "stages").glob("*.py"))
QUIET_KEYS = (*QUIET_ENV, "TQDM_DISABLE")


def test_bad_params_give_one_line_and_exit_1(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["thread_policy"] = "longest"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(params),
                           "--out", str(tmp_path / "raw"), "--metrics", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"download: error: {params}: data.thread_policy='longest' is not one of best | all; pick one of those")


@pytest.mark.parametrize("stage, args", [
    ("evaluate", ["--samples", "s.json", "--plots", "plots"]),
    ("quantize", ["--out", "q", "--experts", "e.json"]),
])
@pytest.mark.slow  # a subprocess through the entry point users run
def test_unknown_device_is_one_line_before_any_work(tmp_path, stage, args):
    """evaluate and quantize resolve --device with chat's one function, before params, model or data."""
    done = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--model", "m", "--data", "d",
                           "--metrics", "m.json", "--device", "tpu", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{stage}: error: --device tpu: expected auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("stage, args, line", [
    ("export", ["--model", "m", "--metrics-dir", "metrics", "--out", "e"],
     "export: error: m: no such folder; run the stage that writes it (dvc repro)"),
    ("quantize", ["--model", "m", "--data", "d", "--out", "q", "--metrics", "q.json", "--experts", "e.json",
                  "--device", "cpu"],
     "quantize: error: d/val: no packed split 'val'; run the prepare stage (dvc repro prepare)"),
], ids=["export-model", "quantize-split"])
@pytest.mark.slow  # a subprocess through the entry point users run
def test_a_missing_model_folder_or_prepared_split_is_one_line(tmp_path, stage, args, line):
    done = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args, "--params",
                           str(ROOT / "params.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == line


def test_third_party_warnings_are_dropped_and_errors_kept(monkeypatch, caplog):
    monkeypatch.delenv("MOECHAT_VERBOSE", raising=False)
    quiet_third_party()
    logger = logging.getLogger("DeepSpeed")
    logger.setLevel(logging.WARNING)  # what DeepSpeed does to its logger on import: the filter must survive it
    with caplog.at_level(logging.WARNING):
        logger.warning("Setting accelerator to CPU")
        logger.error("a real failure")
    messages = [r.getMessage() for r in caplog.records if r.name == "DeepSpeed"]
    assert messages == ["a real failure"]


@pytest.mark.parametrize("raised, line", [
    (TrainingInterrupted("interrupted after step 5/12; `dvc repro` resumes from step 4 (checkpoint c/s)"),
     "train: error: interrupted after step 5/12; `dvc repro` resumes from step 4 (checkpoint c/s)"),
    (KeyboardInterrupt(),
     "train: interrupted; outputs are written atomically, so `dvc repro` starts this stage again"),
])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, raised, line):
    monkeypatch.setattr(sys, "argv", ["stages/train.py"])

    def main():
        raise raised

    with pytest.raises(SystemExit) as done, mock.patch.dict(os.environ):  # run_stage's quieting is undone after
        run_stage(main)
    assert done.value.code == 130
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.slow  # a subprocess through the entry point users run
def test_stage_output_is_the_summary_line_without_library_progress_bars(tmp_path):
    """Off a terminal (a log, `moechat demo`) a stage prints its summary line and no tqdm bar of any library."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    fixture = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())["data"]
    raw["data"].update(fixture, source=str(ROOT / fixture["source"]))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("MOECHAT_VERBOSE", "TQDM_DISABLE")}
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(params),
                           "--out", str(tmp_path / "raw"), "--metrics", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120, env=dict(env, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("download: 517 messages in 108 trees")
    assert "Creating parquet" not in done.stderr and "%|" not in done.stderr, done.stderr


@pytest.mark.slow  # a subprocess through the entry point users run
def test_importing_the_model_prints_nothing():
    """`import moechat.model.auto` in a user's Python: no torchao kernel or pytree deprecation lines."""
    env = {k: v for k, v in os.environ.items() if k != "MOECHAT_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", "import moechat.model.auto"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr[-2000:]


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.stem)
def test_every_stage_script_has_one_shape(script):
    """Module level: the standard library and moechat.stage only (the libraries import inside `main`, after
    run_stage quieted them); `main(argv) -> int` builds `parser`; `run_stage(main)` under __main__."""
    tree = ast.parse(script.read_text())
    imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)
                 and node.module not in ("__future__", "moechat.stage")}
    assert imported <= set(sys.stdlib_module_names), f"{script.name} imports {imported} at module level"
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert [a.arg for a in main.args.args] == ["argv"] and ast.unparse(main.returns) == "int"
    assert ast.unparse(main.body[0]) == "parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])"
    assert ast.unparse(tree.body[-1]) == "if __name__ == '__main__':\n    run_stage(main)"


def test_importing_the_stage_module_quiets_nothing():
    env = {k: v for k, v in os.environ.items() if k not in ("MOECHAT_VERBOSE", *QUIET_KEYS)}
    code = (f"import logging, os, moechat.stage; print([k for k in os.environ if k in {QUIET_KEYS!r}], "
            f"logging.getLogger('torchao').level)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "[] 0", done.stdout + done.stderr[-2000:]


def test_run_stage_quiets_third_party_output_before_main(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stages/download.py"])
    monkeypatch.delenv("MOECHAT_VERBOSE", raising=False)
    seen = {}

    def main():
        seen.update({key: os.environ.get(key) for key in QUIET_KEYS})
        return 0

    with pytest.raises(SystemExit) as done, mock.patch.dict(os.environ):
        for key in QUIET_KEYS:
            os.environ.pop(key, None)
        run_stage(main)
    assert done.value.code == 0
    # library progress bars off before main imports the libraries (TQDM_DISABLE too, off a terminal)
    assert {key: seen[key] for key in QUIET_ENV} == QUIET_ENV
