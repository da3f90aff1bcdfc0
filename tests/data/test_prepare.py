"""The prepare stage refuses what cannot train, says why, and still writes its counts; the BPE trainer is
bounded whatever one message holds."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from moechat.config.params import DataConfig, TokenizerConfig
from moechat.data import chat_format, fixture, oasst
from moechat.data.threads import max_messages_for
from moechat.data.prepare import EmptySplitError, prepare

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "oasst1_fixture.jsonl"
DATA = DataConfig(source=str(FIXTURE), revision=None, num_proc=1, val_fraction=0.1)
BPE = TokenizerConfig(source="train", vocab_size=300)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return oasst.load_messages(str(FIXTURE))[0].to_list()


def write_raw(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    Dataset.from_list(rows, features=oasst.FEATURES).to_parquet(str(folder / oasst.RAW_FILE))
    return folder


def test_seq_len_below_every_prompt_is_refused_with_the_drop_counts(tmp_path, rows):
    raw = write_raw(tmp_path / "raw", rows)
    with pytest.raises(EmptySplitError) as err:
        prepare(raw, tmp_path / "prepared", tmp_path / "tok", DATA, BPE, seq_len=8, seed=3)
    message = str(err.value)
    assert message.startswith("train.seq_len=8: the train split has 0 conversations left, all dropped "
                              "(prompt_too_long=")
    assert message.endswith("raise train.seq_len (and model.n_positions) above the first user turns")
    metrics = err.value.metrics
    assert metrics["train"]["conversations"] == 0 and metrics["train"]["dropped"]["prompt_too_long"] > 0
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "tok").exists()


@pytest.mark.slow  # a subprocess through the entry point users run
def test_prepare_stage_writes_its_counts_when_it_refuses(tmp_path, rows):
    raw = write_raw(tmp_path / "raw", rows)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    for section, values in tiny.items():
        params[section].update(values)
    params["train"]["seq_len"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py"), "--params", str(tmp_path / "params.yaml"),
                           "--raw", str(raw), "--out", str(tmp_path / "prepared"), "--tokenizer-out",
                           str(tmp_path / "tok"), "--metrics", str(tmp_path / "prepare.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("prepare: error: train.seq_len=8: the train split has 0 ")
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["train"]["conversations"] == 0 and metrics["messages"] == len(rows)


def test_every_assistant_reply_deleted_says_so_not_widen_langs(tmp_path, rows):
    rows = copy.deepcopy(rows)
    for r in rows:
        r["deleted"] = r["deleted"] or r["role"] == "assistant"
    raw = write_raw(tmp_path / "raw", rows)
    with pytest.raises(EmptySplitError) as err:
        prepare(raw, tmp_path / "prepared", tmp_path / "tok", DATA, BPE, seq_len=256, seed=3)
    message = str(err.value)
    assert "none of the 324 assistant replies is left (removed: deleted=" in message
    assert "data.langs" not in message and "include_synthetic" not in message
    assert err.value.metrics["threads"] == 0 and err.value.metrics["filtered"]["deleted"] > 300


def test_bpe_trainer_sees_no_run_longer_than_the_cap_and_loses_no_text():
    text = "intro " + "x" * 1000 + " middle " + "ab" * 700 + " end"
    pieces = list(chat_format.bpe_training_pieces([text]))
    assert "".join(pieces) == text
    assert max(len(run) for piece in pieces for run in piece.split()) <= chat_format.BPE_MAX_RUN_CHARS
    huge = "word " * 40_000
    assert "".join(chat_format.bpe_training_pieces([huge])) == huge[:chat_format.BPE_MAX_MESSAGE_CHARS]


@pytest.mark.slow  # a subprocess through the entry point users run
def test_a_2mb_message_without_whitespace_does_not_hang_bpe_training():
    # In a child process so that a hang (the uncapped trainer takes > 300 s here) is killed, not waited for.
    code = ("from moechat.data.chat_format import train_bpe\n"
            "tok = train_bpe(['hello world', 'a' * 2_000_000], vocab_size=300)\n"
            "print(tok.decode(tok('hello world')['input_ids']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "hello world"


def comb_rows(depth: int, tree: str) -> list[dict]:
    return [oasst.canonical_row(row) for row in fixture.comb_tree(depth, tree)]


@pytest.mark.slow  # a subprocess through the entry point users run
def test_a_6000_deep_comb_prepares_quickly_and_reports_what_was_cut(tmp_path):
    """The issue's shape: a 6,000-deep chain, every user turn with an assistant leaf (9,000 rows), with
    thread_policy all ran > 400 s at 3.6 GB; the paths are now cut at what seq_len can hold."""
    rows = comb_rows(6000, "comb") + comb_rows(40, "small")
    raw = write_raw(tmp_path / "raw", rows)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()).items():
        params[section].update(values)
    params["data"]["val_fraction"] = 0.5
    assert params["data"]["thread_policy"] == "all" and params["train"]["seq_len"] == 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py"), "--params", str(tmp_path / "params.yaml"),
                           "--raw", str(raw), "--out", str(tmp_path / "prepared"), "--tokenizer-out",
                           str(tmp_path / "tok"), "--metrics", str(tmp_path / "prepare.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    cap = max_messages_for(256)  # 130 messages: the leaves of the first 65 user turns, then one cut thread
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["threads_cut"] == {"paths_cut": 3001 - cap // 2, "paths_merged": 3000 - cap // 2}
    assert metrics["threads"] == cap // 2 + 1 + 21
    assert done.stdout.startswith(f"prepare: {cap // 2 + 22} threads (all) ({3001 - cap // 2} paths longer than "
                                  f"{cap} messages cut there, {3000 - cap // 2} of them merged as the same "
                                  f"conversation) from {len(rows)}/{len(rows)} messages;")
