"""`moechat demo`: the whole DAG, offline, on the bundled fixture with the tiny preset.

The demo is not a special code path: it copies the project into a scratch git + DVC repo, writes
`params.yaml` merged with `presets/tiny.yaml`, and runs plain `dvc repro` there. The end-to-end test
uses the same `make_demo_repo`, so what the README promises is what CI runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from moechat.errors import MoechatError
from moechat.config.presets import merged_params

# What a pipeline run needs from the project; everything else (venv, caches, outputs) stays behind.
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml")
PROJECT_DIRS = ("stages", "src", "presets", "tests/fixtures", "dvc_templates")
DVC_FILES = (".dvc/config", ".dvcignore")  # copied over what `dvc init` writes
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "moechat demo",
    "GIT_AUTHOR_EMAIL": "demo@moechat.invalid",
    "GIT_COMMITTER_NAME": "moechat demo",
    "GIT_COMMITTER_EMAIL": "demo@moechat.invalid",
}


class DemoError(MoechatError):
    """The demo cannot start (no checkout to copy, a --workdir that is not empty, a missing extra) or a
    command it runs failed; the message names it and where the full output is."""


# Every stage runs in the demo: quantize needs GPTQModel (the `gptq` extra) and the tiny preset's evaluate runs
# a local lm-eval task (`eval` extra); checked before two minutes are spent on the stages before them.
DEMO_EXTRAS = (("gptq", "gptqmodel", "the quantize stage"),
               ("eval", "lm_eval", "the tiny preset's eval.lm_eval_tasks (a local lm-eval task)"))


def missing_extra() -> str | None:
    """One line naming the first extra the demo needs that is not installed, or None."""
    for extra, module, needed_by in DEMO_EXTRAS:
        if importlib.util.find_spec(module) is None:
            return (f"the demo runs every stage and needs the `{extra}` extra for {needed_by}: "
                    f"pip install -e \".[{extra}]\" (or the README's install line), then run it again")
    return None


def project_root() -> Path:
    """The checkout this package was installed from (editable install), or the current directory."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "dvc.yaml").exists() and (candidate / "presets").is_dir():
            return candidate
    raise DemoError("no project checkout found (dvc.yaml + presets/); run it from the moechat "
                    "repository root after `pip install -e .`")


def demo_env(workdir: Path) -> dict[str, str]:
    """Environment for the scratch repo: offline Hub, a git identity for dvc exp / dvclive, the repo's
    own copy of the library first on the path, so the code that runs is the code DVC hashed, and this
    interpreter's bin folder first on PATH, so `dvc` and the stages' `python` are this environment's
    even when the venv is not activated."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(workdir).resolve() / "src"),
                                                            env.get("PYTHONPATH")])),
                "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))})
    for key, value in GIT_IDENTITY.items():
        env.setdefault(key, value)
    return env


def make_demo_repo(workdir: Path, root: Path | None = None, preset: str = "tiny") -> Path:
    """Copy the project into `workdir`, apply the preset to params.yaml, and make it a git + DVC repo.

    The preset (a name under presets/ or a YAML path) and the workdir are checked before anything is
    written, so a bad `--preset` or a non-empty `--workdir` leaves no half-made repo behind.
    """
    root = root or project_root()
    merged, _, preset_file = merged_params(root / "params.yaml", preset, root / "presets")
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise DemoError(f"--workdir {workdir}: not an empty folder; pass an empty or new one")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        if (root / name).exists():
            shutil.copy2(root / name, workdir / name)
    for name in PROJECT_DIRS:
        if (root / name).is_dir():
            shutil.copytree(root / name, workdir / name, ignore=IGNORED)
    (workdir / "params.yaml").write_text(
        f"# params.yaml merged with {preset_file.name} by `moechat demo`\n" + yaml.safe_dump(merged, sort_keys=False)
    )

    env = demo_env(workdir)
    run(["git", "init", "-q", "-b", "main"], workdir, env)
    run(["dvc", "init", "-q"], workdir, env)
    for name in DVC_FILES:
        if (root / name).exists():
            shutil.copy2(root / name, workdir / name)
    # DVC stages dvc.lock and the .gitignore files it writes itself (no "git add dvc.lock" hint): the demo commits
    run(["dvc", "config", "core.autostage", "true"], workdir, env)
    ignore = (root / ".gitignore").read_text() if (root / ".gitignore").exists() else "__pycache__/\n"
    (workdir / ".gitignore").write_text(ignore + "/demo.log\n")  # checkpoints and plots pages stay out of git
    run(["git", "add", "-A"], workdir, env)
    run(["git", "commit", "-q", "-m", f"moechat demo ({preset} preset)"], workdir, env)
    return workdir


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command, streaming its output; a failure raises with the command named."""
    result = subprocess.run(cmd, cwd=cwd, env=env)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(cmd)}` failed with exit code {result.returncode} in {cwd}")
    return result


STAGE_NAMES = ("download", "prepare", "init", "train", "evaluate", "export", "quantize")
SUMMARY_PREFIXES = tuple(f"{name}: " for name in STAGE_NAMES)  # each stage ends with one such line
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm bars share the `train: ` prefix


def repro_quietly(workdir: Path, log_path: Path) -> None:
    """`dvc repro` with its full output in `log_path`; the terminal gets each stage's summary line.

    On failure the log's tail is printed and the error names the log, so nothing is hidden.
    """
    env = demo_env(workdir)
    with log_path.open("w") as log:
        proc = subprocess.Popen(["dvc", "repro"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            log.write(line)
            summary = line.rsplit("\r", 1)[-1]
            if summary.startswith(SUMMARY_PREFIXES) and not PROGRESS_BAR.search(summary):
                print(summary.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise DemoError(f"`dvc repro` failed with exit code {code}; full output in {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moechat demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="empty folder for the scratch repo (default: a new temporary folder, kept)")
    parser.add_argument("--preset", default="tiny",
                        help="preset merged over params.yaml: a name under presets/ (tiny) or a YAML path")
    args = parser.parse_args(argv)

    try:
        root = project_root()
        merged_params(root / "params.yaml", args.preset, root / "presets")  # before a temporary folder exists
        missing = missing_extra()
        if missing:
            raise DemoError(missing)
        workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="moechat-demo-"))).resolve()
        make_demo_repo(workdir, root, preset=args.preset)
    except MoechatError as err:
        print(f"moechat demo: error: {err}", file=sys.stderr)
        return 2
    try:
        minutes = run_and_commit(workdir)
    except DemoError as err:  # the failing stage's own line and the log's tail are already on the terminal
        print(f"moechat demo: error: {err}", file=sys.stderr)
        return 1
    print(f"\nmoechat demo: whole DAG in {minutes:.1f} min in {workdir}")
    print(f"  metrics:     cd {workdir} && dvc metrics show metrics/eval.json metrics/quantize.json")
    print(f"  plots:       cd {workdir} && dvc plots show   (open dvc_plots/index.html)")
    print(f"  chat:        moechat chat {workdir}/models/quantized --prompt 'Hello!'")
    print(f"  experiment:  cd {workdir} && dvc exp run -n e8 -S model.num_experts=8 && dvc metrics diff   (README)")
    return 0


def run_and_commit(workdir: Path) -> float:
    """`dvc repro` in the scratch repo, then commit its results, so `dvc metrics diff` and `dvc exp show`
    compare experiments against this run; returns the minutes the DAG took."""
    print(f"moechat demo: running the whole DAG in {workdir} (full log: {workdir / 'demo.log'})", flush=True)
    start = time.perf_counter()
    repro_quietly(workdir, workdir / "demo.log")
    minutes = (time.perf_counter() - start) / 60
    env = demo_env(workdir)
    run(["git", "add", "-A"], workdir, env)
    run(["git", "commit", "-q", "-m", "moechat demo: results of dvc repro"], workdir, env)
    return minutes


if __name__ == "__main__":
    sys.exit(main())
