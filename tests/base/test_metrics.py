"""Stage reports split into DVC metrics (compared across experiments) and run facts (everything else)."""

from __future__ import annotations

import json

import pytest

from moechat.metrics import facts_path_for, split_report, write_stage_report

REPORT = {"loss": 2.5, "fingerprint": "abc", "seconds": 3.2, "filtered": {},
          "router": {"mean_cv": 0.1, "dead_experts": 0}, "train": {"blocks": 7, "tokens": 99}}


def test_every_key_lands_in_exactly_one_file():
    metrics, facts = split_report(REPORT, ["loss", "router.mean_cv", "router.dead_experts", "train.blocks"])
    assert metrics == {"loss": 2.5, "router": {"mean_cv": 0.1, "dead_experts": 0}, "train": {"blocks": 7}}
    # router emptied by the move disappears; filtered was empty in the report and stays
    assert facts == {"fingerprint": "abc", "seconds": 3.2, "filtered": {}, "train": {"tokens": 99}}
    assert REPORT["router"] == {"mean_cv": 0.1, "dead_experts": 0}  # the report itself is untouched


def test_a_listed_key_the_report_lacks_is_an_error():
    with pytest.raises(KeyError):
        split_report(REPORT, ["perplexity"])


def test_write_stage_report_puts_facts_under_run(tmp_path):
    write_stage_report(REPORT, ["loss"], tmp_path / "eval.json")
    assert facts_path_for(tmp_path / "eval.json") == tmp_path / "run" / "eval.json"
    assert json.loads((tmp_path / "eval.json").read_text()) == {"loss": 2.5}
    assert "fingerprint" in json.loads((tmp_path / "run" / "eval.json").read_text())
