"""`moechat --version` prints the package version, the one pyproject.toml declares."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_project_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for flag in ("--version", "-V"):
        proc = subprocess.run([sys.executable, "-m", "moechat.cli", flag], capture_output=True, text=True,
                              env=dict(os.environ), timeout=60, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"moechat {version}\n", "")
