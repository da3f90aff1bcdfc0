"""Every stage's `deps:` in dvc.yaml cover the library modules its script imports, directly or through other
moechat modules (imports inside functions included), so editing any of them reruns the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """src/ path of a `moechat...` module (package __init__ or module file), None outside the package."""
    if name != "moechat" and not name.startswith("moechat."):
        return None
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1]) if path.is_relative_to(SRC) else ""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            path = module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.append(path)
    return {p for p in seen if p.name != "__init__.py"}  # package markers and the version string


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_imported_library_module(stage):
    deps = [ROOT / d for d in STAGES[stage].get("deps", []) if isinstance(d, str)]
    script = ROOT / "stages" / f"{stage}.py"
    assert script in deps, f"dvc.yaml: stage {stage} does not list its script"
    missing = sorted(str(p.relative_to(ROOT)) for p in closure(script)
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not list them in deps"
