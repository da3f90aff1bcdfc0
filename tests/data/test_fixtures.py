"""The data the repository ships: the real OASST1 sample is complete and readable by the download code, and the
synthetic fixture is what its generator writes."""

from __future__ import annotations

from pathlib import Path

from moechat.data import fixture
from moechat.data.oasst import load_messages

SAMPLE_DIR = Path(__file__).parents[1] / "fixtures" / "oasst1_en_100"


def test_real_oasst1_sample_ships_with_its_licence_and_schema():
    for name in ("oa_export_en_100.trees.jsonl", "LICENSE.oasst1-apache-2.0.txt", "SCHEMA.md", "README.md"):
        assert (SAMPLE_DIR / name).is_file(), name
    assert "Apache License" in (SAMPLE_DIR / "LICENSE.oasst1-apache-2.0.txt").read_text()


def test_real_oasst1_sample_loads_as_100_english_trees():
    rows, _ = load_messages(str(SAMPLE_DIR / "oa_export_en_100.trees.jsonl"))
    assert len(rows) == 1167  # SCHEMA.md: 100 English trees, 1,167 messages
    assert len(set(rows["message_tree_id"])) == 100
    assert {row["lang"] for row in rows} == {"en"}


def test_the_synthetic_fixture_is_what_its_generator_writes(tmp_path):
    """tests/fixtures/oasst1_fixture.jsonl byte for byte = `python -m moechat.data.fixture` (the tree builders
    run in a fixed order: the builder's random draws depend on it)."""
    out = tmp_path / "fixture.jsonl"
    assert fixture.main([str(out)]) == 0
    assert out.read_bytes() == (Path(__file__).parents[1] / "fixtures" / "oasst1_fixture.jsonl").read_bytes()
