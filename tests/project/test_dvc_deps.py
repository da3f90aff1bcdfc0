"""Every stage's `deps:` in dvc.yaml cover the library modules its script imports, directly or through other
moechat modules (imports inside functions included), so editing any of them reruns the stage."""

from __future__ import annotations

import pytest
import yaml

from tests.support.imports import ROOT, closure

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_imported_library_module(stage):
    deps = [ROOT / d for d in STAGES[stage].get("deps", []) if isinstance(d, str)]
    script = ROOT / "stages" / f"{stage}.py"
    assert script in deps, f"dvc.yaml: stage {stage} does not list its script"
    missing = sorted(str(p.relative_to(ROOT)) for p in closure(script)
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_no_library_module_the_stage_does_not_import(stage):
    """deps that a stage never imports would rerun it for nothing (editing the chat REPL reruns no stage)."""
    deps = {ROOT / d for d in STAGES[stage].get("deps", []) if isinstance(d, str) and d.startswith("src/")}
    extra = sorted(str(d.relative_to(ROOT)) for d in deps - closure(ROOT / "stages" / f"{stage}.py"))
    assert not extra, f"dvc.yaml: stage {stage} lists {extra}, which its script never imports"


@pytest.mark.parametrize("stage, never", [
    ("evaluate", ["src/moechat/cli/chat.py", "src/moechat/release/quantize.py"]),
    ("train", ["src/moechat/model/gptq.py", "src/moechat/config/presets.py", "src/moechat/cli/chat.py"]),
    ("export", ["src/moechat/model/gptq.py", "src/moechat/cli/chat.py"]),
])
def test_stages_do_not_depend_on_the_commands_or_gptq(stage, never):
    reached = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages" / f"{stage}.py")}
    assert not reached & set(never), f"stage {stage} reaches {sorted(reached & set(never))}"
