"""Presets: YAML overrides merged over params.yaml, named (`tiny` = presets/tiny.yaml) or given as a path.

`moechat plan --preset` and `moechat demo --preset` share this one convention, and both resolve and
validate the preset before they compute or write anything, so a typo costs one line, not a half-built
scratch repo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moechat.errors import ConfigError
from moechat.config.params import Params, merge, params_from_dict, read_yaml


class PresetError(ConfigError):
    """A --preset that names no preset file, or one that is not a YAML mapping."""


def preset_path(preset: str, presets_dir: Path) -> Path:
    """`preset` as a file: an existing path as given, else `presets_dir/<preset>.yaml` for a bare name."""
    as_path = Path(preset)
    if as_path.is_file():
        return as_path
    named = presets_dir / f"{preset}.yaml"
    if as_path.name == preset and not as_path.suffix and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in presets_dir.glob("*.yaml"))) or "none"
    raise PresetError(f"--preset {preset}: no such file and no preset of that name in {presets_dir} "
                      f"(known: {known}); pass a name such as tiny or a path such as presets/tiny.yaml")


def read_preset(path: Path) -> dict[str, Any]:
    """The preset's overrides; an empty file is no override. Read as params.yaml is (moechat.config.read_yaml):
    no aliases, no merge keys, names as keys."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: a preset must be a mapping of params.yaml sections, got {type(raw).__name__}")
    return raw


def merged_params(params_path: Path, preset: str, presets_dir: Path) -> tuple[dict[str, Any], Params, Path]:
    """params.yaml merged with the preset: the raw mapping, its validated `Params`, and the preset file."""
    path = preset_path(preset, presets_dir)
    if not params_path.is_file():
        raise ConfigError(f"{params_path}: not found; run from the project root or pass --params PATH")
    raw = merge(read_yaml(params_path), read_preset(path))
    return raw, params_from_dict(raw, source=f"{params_path} + {path}"), path
