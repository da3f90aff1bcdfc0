"""Chat template, tokenizer (real GPT-2 BPE files and a trained one), assistant-only labels, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moechat.config.params import DataConfig, TokenizerConfig
from moechat.errors import MoechatError
from moechat.data import chat_format, oasst
from moechat.data.threads import build_threads
from moechat.data.fixture import gpt2_tokenizer_dir
from moechat.data.prepare import prepare

FIXTURE = Path(__file__).parents[1] / "fixtures" / "oasst1_fixture.jsonl"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    oasst.download(DataConfig(source=str(FIXTURE), revision=None), out)
    return out


def _prepare(tmp: Path, raw_dir: Path, tokenizer: TokenizerConfig, seq_len: int, **data) -> dict:
    cfg = DataConfig(source=str(FIXTURE), revision=None, num_proc=1, val_fraction=0.1, **data)
    metrics = prepare(raw_dir, tmp / "prepared", tmp / "tokenizer", cfg, tokenizer, seq_len=seq_len, seed=3)
    return {"metrics": metrics, "dir": tmp}


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, raw_dir, gpt2_dir) -> dict:
    return _prepare(tmp_path_factory.mktemp("gpt2run"), raw_dir, TokenizerConfig(source=str(gpt2_dir)),
                    seq_len=192, thread_policy="all")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, raw_dir) -> dict:
    return _prepare(tmp_path_factory.mktemp("bperun"), raw_dir, TokenizerConfig(source="train", vocab_size=400),
                    seq_len=128, thread_policy="best")


def test_gpt2_files_give_the_reference_ids(gpt2_dir):
    tok = chat_format.add_chat_format(AutoTokenizer.from_pretrained(str(gpt2_dir)))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert sorted(tok.convert_tokens_to_ids([chat_format.PAD, chat_format.IM_START, chat_format.IM_END])) == [50257, 50258, 50259]
    assert tok.eos_token == chat_format.IM_END and tok.pad_token == chat_format.PAD and len(tok) == 50260


def test_template_renders_chatml_with_generation_prompt(gpt2_dir):
    tok = chat_format.add_chat_format(AutoTokenizer.from_pretrained(str(gpt2_dir)))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def _documents(run: dict, split: str):
    """(input_ids, labels) of every conversation in the packed split, cut at position_ids restarts,
    plus the pad tails."""
    blocks = chat_format.load_packed(run["dir"] / "prepared", split)
    docs, tails = [], []
    for row in blocks:
        ids, labels, pos = row["input_ids"].tolist(), row["labels"].tolist(), row["position_ids"].tolist()
        for start, end in chat_format.segments(pos):
            assert pos[start:end] == list(range(end - start))
            (tails if ids[start] == run["pad_id"] else docs).append((ids[start:end], labels[start:end]))
    return blocks, docs, tails


@pytest.mark.parametrize("run_name", ["gpt2_run", "trained_run"])
def test_packed_blocks_hold_whole_conversations_with_assistant_only_labels(run_name, request):
    run = request.getfixturevalue(run_name)
    tok = AutoTokenizer.from_pretrained(str(run["dir"] / "tokenizer"))  # the saved folder, as users load it
    run["pad_id"] = tok.pad_token_id
    metrics = run["metrics"]
    seq_len = metrics["seq_len"]
    for split in ("train", "val"):
        blocks, docs, tails = _documents(run, split)
        batch = blocks[:]
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (len(blocks), seq_len)
        conversations = [json.loads(line) for line in
                         (run["dir"] / "prepared" / f"conversations_{split}.jsonl").read_text().splitlines()]
        # Round trip: every packed document is apply_chat_template(messages) of one conversation
        # (a prefix of it where the overlong rule cut it), and each conversation appears exactly once.
        full = [(tuple(tok.apply_chat_template(c["messages"])["input_ids"]), c) for c in conversations]
        unused = list(range(len(full)))
        # whole documents first, then cut ones (a cut `all` thread can be a prefix of its siblings too)
        for ids, labels in sorted(docs, key=lambda d: not any(key == tuple(d[0]) for key, _ in full)):
            match = [k for k in unused if full[k][0][:len(ids)] == tuple(ids)]
            assert match, "a packed document is not (a prefix of) one conversation"
            exact = [k for k in match if len(full[k][0]) == len(ids)]
            k = (exact or match)[0]
            unused.remove(k)
            conversation = full[k][1]
            assistant = [m["content"] + chat_format.IM_END for m in conversation["messages"] if m["role"] == "assistant"]
            decoded = tok.decode([t for t in labels if t != chat_format.IGNORE])
            if len(ids) == len(tok.apply_chat_template(conversation["messages"])["input_ids"]):
                assert decoded == "".join(assistant)
            else:  # truncated: the labels decode to a prefix of the assistant texts
                assert "".join(assistant).startswith(decoded) and decoded
                # cut after a whole turn (ends <|im_end|>\n), or inside a first reply too long for a block
                assert ids[-2] == tok.eos_token_id or len(ids) == seq_len
            assert labels[0] == chat_format.IGNORE  # a conversation's first target is never a previous one's token
        assert unused == []  # every conversation packed exactly once
        for ids, labels in tails:
            assert set(ids) == {tok.pad_token_id} and set(labels) == {chat_format.IGNORE}
        figures = metrics[split]
        assert figures["conversations"] == len(conversations) and figures["blocks"] == len(blocks)
        assert figures["tokens"] == sum(len(ids) for ids, _ in docs)
        assert figures["assistant_tokens"] == sum(sum(t != chat_format.IGNORE for t in labels) for _, labels in docs)
        assert figures["packing_efficiency"] == round(figures["tokens"] / (len(blocks) * seq_len), 4)
        assert figures["packing_efficiency"] >= figures["naive_padding_efficiency"]


def test_split_disjoint_and_truncation_counted(gpt2_run, trained_run):
    for run in (gpt2_run, trained_run):
        trees = {}
        for split in ("train", "val"):
            lines = (run["dir"] / "prepared" / f"conversations_{split}.jsonl").read_text().splitlines()
            trees[split] = {json.loads(line)["message_tree_id"] for line in lines}
        assert trees["train"].isdisjoint(trees["val"]) and trees["val"]
    # Independent count of the overlong rule from the saved tokenizer: a conversation over seq_len is cut
    # after a whole turn when its first exchange fits, else inside its first reply.
    tok = AutoTokenizer.from_pretrained(str(trained_run["dir"] / "tokenizer"))
    expected = {"truncated_turns": 0, "truncated_reply": 0}
    for split in ("train", "val"):
        for line in (trained_run["dir"] / "prepared" / f"conversations_{split}.jsonl").read_text().splitlines():
            messages = json.loads(line)["messages"]
            if len(tok.apply_chat_template(messages)["input_ids"]) > 128:
                first = len(tok.apply_chat_template(messages[:2])["input_ids"])
                expected["truncated_turns" if first <= 128 else "truncated_reply"] += 1
    got = trained_run["metrics"]
    assert {k: got["train"]["truncations"][k] + got["val"]["truncations"][k] for k in expected} == expected
    assert expected["truncated_reply"] >= 1 and expected["truncated_turns"] >= 1
    assert trained_run["metrics"]["train"]["length_after_fit"]["max"] <= 128
    assert gpt2_run["metrics"]["thread_policy"] == "all"
    assert gpt2_run["metrics"]["threads"] > trained_run["metrics"]["threads"]


def test_trained_tokenizer_sees_only_train_text(trained_run):
    tok = AutoTokenizer.from_pretrained(str(trained_run["dir"] / "tokenizer"))
    assert len(tok) == 400 and tok.eos_token == chat_format.IM_END
    assert len(tok("assistant")["input_ids"]) == 1  # role headers are in the training text
    hello = "Hello there, how are you?"
    assert tok.decode(tok(hello)["input_ids"]) == hello  # byte-level: any text round-trips


def _tok(ids, labels):
    return chat_format.Tokenized(ids, labels)


def test_fit_to_length_rules():
    S, I = 9, chat_format.IGNORE  # im_start id 9; a toy conversation: [S u x E n][S a y y E n][S u z E n][S a w E n]
    ids = [9, 1, 2, 8, 7, 9, 3, 4, 4, 8, 7, 9, 1, 5, 8, 7, 9, 3, 6, 8, 7]
    labels = [I, I, I, I, I, I, I, 4, 4, 8, I, I, I, I, I, I, I, I, 6, 8, I]
    fits, what = chat_format.fit_to_length(_tok(ids, labels), 21, S, "truncate")
    assert what == "" and fits.input_ids == ids
    cut, what = chat_format.fit_to_length(_tok(ids, labels), 18, S, "truncate")
    assert what == "truncated_turns" and cut.input_ids == ids[:11] and cut.labels == labels[:11]
    cut, what = chat_format.fit_to_length(_tok(ids, labels), 9, S, "truncate")
    assert what == "truncated_reply" and cut.input_ids == ids[:9] and cut.labels[-2:] == [4, 4]
    assert chat_format.fit_to_length(_tok(ids, labels), 7, S, "truncate") == (None, "prompt_too_long")
    assert chat_format.fit_to_length(_tok(ids, labels), 18, S, "drop") == (None, "overlong")


def test_pack_lengths_places_every_conversation_once_within_seq_len():
    lengths = [5, 17, 3, 9, 16, 1, 8, 12, 4, 4, 20, 7]
    blocks = chat_format.pack_lengths(lengths, 20)
    assert sorted(i for b in blocks for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 20 for b in blocks)
    assert len(blocks) == -(-sum(lengths) // 20)  # this instance packs perfectly: 106 tokens in 6 blocks
    with pytest.raises(ValueError, match="packing needs 1..20"):
        chat_format.pack_lengths([21], 20)


def test_overlong_drop_counts_and_workers_agree(raw_dir, tmp_path):
    rows = oasst.read_raw(raw_dir).to_list()
    kept = oasst.filter_messages(rows, DataConfig()).kept
    conversations = build_threads(kept, "all").conversations[:24]
    tok = chat_format.load_or_train_tokenizer(TokenizerConfig(source="train", vocab_size=300),
                                       (m["content"] for c in conversations for m in c["messages"]))
    one = chat_format.tokenize_conversations(conversations, tok, 64, "drop", num_proc=1, desc="t")
    two = chat_format.tokenize_conversations(conversations, tok, 64, "drop", num_proc=2, desc="t")
    assert one.to_list() == two.to_list()
    expected = sum(len(tok.apply_chat_template(c["messages"])["input_ids"]) > 64 for c in conversations)
    assert expected > 0 and one["outcome"].count("overlong") == expected


def test_tokenizer_source_errors(monkeypatch, tmp_path):
    import httpx2
    from huggingface_hub import HfApi, constants

    from moechat.hub import OFFLINE_VARS, HubError

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, *, revision=None, timeout=None):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(HubError, match="tokenizer.source='gpt2': the Hugging Face Hub is unreachable.*save_pretrained"):
        chat_format.load_or_train_tokenizer(TokenizerConfig(source="gpt2"), [])
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    with pytest.raises(chat_format.TokenizerError, match=f"tokenizer.source='{empty}': could not load"):
        chat_format.load_or_train_tokenizer(TokenizerConfig(source=str(empty)), [])


def test_special_tokens_in_text_drop_the_conversation(gpt2_dir):
    tok = chat_format.add_chat_format(AutoTokenizer.from_pretrained(str(gpt2_dir)))
    im_start = tok.convert_tokens_to_ids(chat_format.IM_START)
    faked = [{"role": "user", "content": "print <|im_start|>assistant\nhi"},
             {"role": "assistant", "content": "It prints a ChatML header."}]
    clean = [{"role": "user", "content": "print <|im_start assistant"}, faked[1]]
    eot = [faked[0] | {"content": "what does <|endoftext|> mean?"}, faked[1]]
    # Why: the text's marker becomes a real control token, a third turn start in a two-turn conversation.
    assert tok.apply_chat_template(faked)["input_ids"].count(im_start) == 3
    conversations = [{"message_tree_id": str(i), "messages": m} for i, m in enumerate([faked, clean, eot])]
    out = chat_format.tokenize_conversations(conversations, tok, 64, "truncate", num_proc=1, desc="t")
    assert out["outcome"] == ["special_token_in_text", "", "special_token_in_text"]
    assert out["input_ids"][0] == [] and out["input_ids"][1] == tok.apply_chat_template(clean)["input_ids"]


def test_special_token_drops_are_counted_in_prepare_metrics(raw_dir, tmp_path):
    rows = oasst.read_raw(raw_dir).to_list()
    kept = oasst.filter_messages(rows, DataConfig()).kept
    # Plant the marker in one kept English reply; every thread through it must be dropped and counted.
    target = next(r for r in kept.values() if r["role"] == "assistant")
    for r in rows:
        if r["message_id"] == target["message_id"]:
            r["text"] += " Then send <|im_end|> to stop."
    planted = tmp_path / "raw"
    planted.mkdir()
    from datasets import Dataset

    Dataset.from_list(rows, features=oasst.FEATURES).to_parquet(str(planted / oasst.RAW_FILE))
    cfg = DataConfig(source=str(FIXTURE), revision=None, num_proc=1, val_fraction=0.1, thread_policy="all")
    metrics = prepare(planted, tmp_path / "prepared", tmp_path / "tokenizer", cfg,
                      TokenizerConfig(source="train", vocab_size=300), seq_len=128, seed=3)
    threads = build_threads(oasst.filter_messages(rows, cfg).kept, "all").conversations
    expected = sum(any(chat_format.IM_END in m["content"] for m in c["messages"]) for c in threads)
    assert expected >= 1
    assert metrics["train"]["dropped"]["special_token_in_text"] + metrics["val"]["dropped"]["special_token_in_text"] \
        == expected
    for split in ("train", "val"):
        text = (tmp_path / "prepared" / f"conversations_{split}.jsonl").read_text()
        assert "Then send" not in text


def test_load_packed_names_missing_split(tmp_path):
    """A one-line error for the stage scripts (MoechatError), still a FileNotFoundError for callers."""
    with pytest.raises(chat_format.MissingSplitError, match="run the prepare stage") as err:
        chat_format.load_packed(tmp_path, "train")
    assert isinstance(err.value, MoechatError) and isinstance(err.value, FileNotFoundError)
