"""The repository's params.yaml as a raw mapping, with one key changed: the starting point of every
params-validation case."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def reference() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(section: str, key: str, value) -> dict:
    raw = reference()
    raw[section][key] = value
    return raw


