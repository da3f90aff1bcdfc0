"""`--preset` takes a name or a path, the same for `moechat plan` and `moechat demo`, checked before any write."""

from __future__ import annotations

from pathlib import Path

import pytest

from moechat.cli import demo
from moechat.cli import plan
from moechat.config.presets import PresetError, preset_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_preset_name_and_path_resolve_to_the_same_file(in_root):
    assert preset_path("tiny", ROOT / "presets").resolve() == (ROOT / "presets/tiny.yaml").resolve()
    assert preset_path("presets/tiny.yaml", ROOT / "presets").resolve() == (ROOT / "presets/tiny.yaml").resolve()


def test_unknown_preset_names_the_value_and_the_known_presets(in_root):
    with pytest.raises(PresetError, match=r"--preset tinny: .*known: scratch, tiny\)"):
        preset_path("tinny", ROOT / "presets")


def test_plan_accepts_a_preset_name_or_path_alike(in_root, capsys):
    assert plan.main(["--preset", "tiny", "--json"]) == 0
    by_name = capsys.readouterr().out
    assert plan.main(["--preset", "presets/tiny.yaml", "--json"]) == 0
    assert capsys.readouterr().out == by_name
    assert '"params": 281920' in by_name  # the tiny model, not the reference one


def test_plan_bad_preset_is_one_line_and_exit_2(in_root, capsys):
    assert plan.main(["--preset", "presets/nope.yaml"]) == 2
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "--preset presets/nope.yaml" in out


def test_demo_bad_preset_writes_nothing(in_root, tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert demo.main(["--preset", "presets/nope.yaml", "--workdir", str(workdir)]) == 2
    assert not workdir.exists()
    assert "--preset presets/nope.yaml" in capsys.readouterr().err


def test_demo_invalid_preset_content_fails_before_copying(in_root, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_experts: 2\n  num_experts_per_tok: 3\n")
    workdir = tmp_path / "demo"
    assert demo.main(["--preset", str(bad), "--workdir", str(workdir)]) == 2
    assert not workdir.exists()
    assert "model.num_experts_per_tok=3" in capsys.readouterr().err


def test_demo_non_empty_workdir_is_refused_untouched(in_root, tmp_path, capsys):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    assert demo.main(["--preset", "tiny", "--workdir", str(workdir)]) == 2
    assert [p.name for p in workdir.iterdir()] == ["keep.txt"]
    assert "not an empty folder" in capsys.readouterr().err
