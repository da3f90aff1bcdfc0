"""Message rows -> canonical schema, filters (counted by reason), threads, split by tree."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import pytest

from moechat.errors import ConfigError
from moechat.config.params import DataConfig, load_params
from moechat.data import fixture, oasst
from moechat.data.threads import _sibling_key, build_threads, max_messages_for

FIXTURE = Path(__file__).parents[1] / "fixtures" / "oasst1_fixture.jsonl"
PARAMS = Path(__file__).parents[2] / "params.yaml"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    messages, _ = oasst.load_messages(str(FIXTURE))
    return messages.to_list()


def test_fixture_file_is_the_generator_output():
    # The shipped file is exactly what fixture.py generates: regenerating it is reproducible.
    shipped = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert shipped == fixture.generate()


def test_canonical_schema_keeps_nulls_and_hub_layout(rows):
    assert len(rows) == len(fixture.generate())
    assert set(rows[0]) == set(oasst.FEATURES)
    for column in ("rank", "labels", "emojis", "detoxify", "review_result"):
        assert any(r[column] is None for r in rows), column
    with_emojis = next(r for r in rows if r["emojis"] is not None)
    assert set(with_emojis["emojis"]) == {"name", "count"}


def _reference_reasons(rows: list[dict], cfg: DataConfig) -> dict[str, int]:
    """Independent, naive reference: walk each message's ancestor chain from scratch."""
    by_id = {r["message_id"]: r for r in rows}
    counts = dict.fromkeys(oasst.REASONS, 0)
    for row in rows:
        own = oasst.own_reason(row, cfg)
        if own:
            counts[own] += 1
            continue
        node, ok = row, True
        while node["parent_id"] is not None:
            parent = by_id.get(node["parent_id"])
            if parent is None or oasst.own_reason(parent, cfg):
                ok = False
                break
            node = parent
        counts["orphan"] += not ok
    return counts


def test_filter_counts_on_fixture(rows):
    cfg = DataConfig(langs=("en",))
    filtered = oasst.filter_messages(rows, cfg)
    # Hand count from fixture.py: 2 growing; 21 in 7 foreign trees + Spanish root + German reply;
    # 2 synthetic-tree rows + 1 synthetic sibling; 1 deleted; review false + null; orphans: 4 under the
    # Spanish root, 2 under the deleted answer, 1 under the unreviewed prompt, 1 German-parented, 1 absent.
    assert filtered.dropped == {"tree_state": 2, "lang": 23, "synthetic": 3, "deleted": 1, "review": 2,
                                "empty_text": 0, "orphan": 9}
    assert filtered.orphans_parent_absent == 1
    assert filtered.dropped == _reference_reasons(rows, cfg)
    assert len(filtered.kept) + sum(filtered.dropped.values()) == len(rows)


def test_filters_follow_params(rows):
    everything = DataConfig(langs=(), include_synthetic=True)
    filtered = oasst.filter_messages(rows, everything)
    assert filtered.dropped["lang"] == 0 and filtered.dropped["synthetic"] == 0
    assert filtered.dropped == _reference_reasons(rows, everything)
    # The Spanish root's English replies are kept once Spanish is allowed.
    spanish = oasst.filter_messages(rows, DataConfig(langs=("en", "es")))
    assert spanish.dropped["orphan"] == 9 - 4


def _hand_tree_threads(rows, policy):
    kept = oasst.filter_messages(rows, DataConfig()).kept
    hand = {mid: r for mid, r in kept.items() if r["message_tree_id"] == fixture.tree_id(fixture.HAND_TREE)}
    return build_threads(hand, policy).conversations


def test_best_thread_follows_rank_zero_at_each_branch(rows):
    (best,) = _hand_tree_threads(rows, "best")
    assert [m["content"] for m in best["messages"]] == [
        "How do I reverse a list in Python?",
        "Call numbers.reverse() to reverse it in place, or use numbers[::-1] for a reversed copy.",
        "Which one is faster?",
        "reverse() is a little faster because it makes no copy.",
    ]
    assert [m["role"] for m in best["messages"]] == ["user", "assistant", "user", "assistant"]


def test_all_threads_end_at_every_assistant_without_assistant_below(rows):
    threads = _hand_tree_threads(rows, "all")
    last = sorted(t["messages"][-1]["content"] for t in threads)
    assert last == sorted([
        "reverse() is a little faster because it makes no copy.",          # A3
        "Both are fast for small lists.",                                  # A4
        "Slicing works on strings; reverse() exists only on lists.",       # A5
        "Use reversed(numbers) to get an iterator.",                       # A1 (its prompter reply is a leaf)
        "Slice it with a negative step.",                                  # A2 (unranked)
    ])
    assert all(t["messages"][-1]["role"] == "assistant" for t in threads)


def test_unranked_sibling_comes_after_ranked_and_deleted_best_is_skipped(rows):
    kept = oasst.filter_messages(rows, DataConfig()).kept
    siblings = [kept[mid] for mid in kept if kept[mid]["parent_id"] == fixture.tree_id(fixture.HAND_TREE)]
    ordered = sorted(siblings, key=_sibling_key)
    assert [r["rank"] for r in ordered] == [0, 1, None]
    deleted_tree = {m: r for m, r in kept.items() if r["message_tree_id"] == fixture.tree_id("deleted-mid")}
    (thread,) = build_threads(deleted_tree, "best").conversations
    assert thread["messages"][1]["content"].startswith("It is a function")  # the rank-1 answer


def test_split_is_disjoint_by_tree_and_deterministic(rows):
    kept = oasst.filter_messages(rows, DataConfig()).kept
    threads = build_threads(kept, "all").conversations
    tree_ids = [t["message_tree_id"] for t in threads]
    train, val = oasst.split_trees(tree_ids, 0.1, seed=7)
    assert train.isdisjoint(val) and train | val == set(tree_ids)
    assert len(val) == round(len(set(tree_ids)) * 0.1)
    assert oasst.split_trees(reversed(tree_ids), 0.1, seed=7) == (train, val)
    assert oasst.split_trees(tree_ids, 0.1, seed=8)[1] != val
    with pytest.raises(oasst.DataError, match="at least 2"):
        oasst.split_trees(tree_ids[:1], 0.1, seed=7)


def test_trees_export_and_message_rows_give_the_same_canonical_rows(tmp_path, rows):
    # Write the fixture as an Open-Assistant trees export (nested replies, trees-export emoji layout).
    by_parent: dict = {}
    for r in rows:
        by_parent.setdefault(r["parent_id"], []).append(r)

    def nest(r):
        out = {k: v for k, v in r.items() if k not in ("message_tree_id", "tree_state", "parent_id")}
        if r["emojis"] is not None:
            out["emojis"] = dict(zip(r["emojis"]["name"], r["emojis"]["count"]))
        out["replies"] = [nest(c) for c in by_parent.get(r["message_id"], [])]
        return out

    roots = [r for r in rows if r["parent_id"] is None]
    path = tmp_path / "export.trees.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for root in roots:
            f.write(json.dumps({"message_tree_id": root["message_tree_id"], "tree_state": root["tree_state"],
                                "prompt": nest(root)}) + "\n")
    loaded, info = oasst.load_messages(str(path))
    assert info["kind"] == "trees"
    reachable = {r["message_id"] for r in rows if r["parent_id"] is None}
    expected = [r for r in rows if _reaches_root(r, {x["message_id"]: x for x in rows})]
    assert sorted(loaded.to_list(), key=lambda r: r["message_id"]) == sorted(expected, key=lambda r: r["message_id"])
    assert reachable <= {r["message_id"] for r in loaded.to_list()}


def _reaches_root(row, by_id):
    while row["parent_id"] is not None:
        if row["parent_id"] not in by_id:
            return False  # a trees export cannot hold a message whose parent is absent
        row = by_id[row["parent_id"]]
    return True


def test_parquet_folder_source(tmp_path, rows):
    from datasets import Dataset

    folder = tmp_path / "oasst"
    folder.mkdir()
    Dataset.from_list(rows[:200], features=oasst.FEATURES).to_parquet(str(folder / "a.parquet"))
    Dataset.from_list(rows[200:], features=oasst.FEATURES).to_parquet(str(folder / "b.parquet"))
    loaded, info = oasst.load_messages(str(folder))
    assert info["kind"] == "messages" and loaded.to_list() == rows


def test_missing_required_field_is_a_named_error(tmp_path, rows):
    bad = copy.deepcopy(rows[:10])
    for r in bad[:3]:
        del r["lang"]
    bad[5]["text"] = None
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(oasst.DataError, match=r"'text' null in 1 of 10 rows.*'lang' missing in 3 of 10 rows"):
        oasst.load_messages(str(path))


def test_bad_role_duplicate_id_and_bad_json_are_named(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    bad = copy.deepcopy(rows[:4])
    bad[1]["role"] = "system"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(oasst.DataError, match="'role' must be prompter|assistant, got 'system' in 1 rows"):
        oasst.load_messages(str(path))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + rows[:1]))
    with pytest.raises(oasst.DataError, match="appears 2 times"):
        oasst.load_messages(str(path))
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(oasst.DataError, match=r"bad.jsonl:2: not valid JSON"):
        oasst.load_messages(str(path))


def test_missing_local_path_and_unreachable_hub_fail_fast(monkeypatch):
    import httpx2
    from huggingface_hub import HfApi, constants

    from moechat.hub import HubError

    with pytest.raises(oasst.DownloadError, match="no such file or folder"):
        oasst.load_messages("data/nowhere.jsonl")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, *, revision=None, timeout=None):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    with pytest.raises(HubError, match=r"data.source='OpenAssistant/oasst1' \(revision 'main'\).*unreachable.*"
                                       r"local export"):
        oasst.load_messages("OpenAssistant/oasst1", "main")


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("field, value, expected", [
    ("review_result", "false", "bool or null"),   # arrow would cast "false" to True: an unreviewed row kept
    ("deleted", "false", "bool"),
    ("text", 42, "str"),
    ("rank", 1.7, "int or null"),                  # arrow would truncate to 1
    ("rank", "first", "int or null"),
    ("synthetic", 0, "bool"),
    ("parent_id", 7, "str or null"),
])
def test_field_types_are_checked_before_arrow_casts(tmp_path, rows, field, value, expected):
    bad = copy.deepcopy(rows[:6])
    for r in bad[2:4]:
        r[field] = value
    path = _write_rows(tmp_path / "bad.jsonl", bad)
    got = type(value).__name__
    where = rf"\(first: message_id='{bad[2]['message_id']}' at {re.escape(path)}:3\)"
    with pytest.raises(oasst.DataError, match=rf"field '{field}' must be {expected}, got {got} {value!r} in 2 of 6 "
                                              rf"rows {where}"):
        oasst.load_messages(path)


def test_integral_float_ranks_and_nulls_pass_the_type_check(tmp_path, rows):
    # pandas writes an int column with nulls as floats: 1.0 is rank 1, not an error.
    good = copy.deepcopy(rows[:6])
    good[0]["rank"], good[1]["rank"], good[2]["review_result"] = 1.0, None, None
    loaded, _ = oasst.load_messages(_write_rows(tmp_path / "ok.jsonl", good))
    assert [r["rank"] for r in loaded.to_list()[:2]] == [1, None]


def test_parent_cycle_is_a_named_error_not_a_hang(rows):
    passing = [r for r in rows if r["parent_id"] is not None and oasst.own_reason(r, DataConfig()) is None]
    cycle = copy.deepcopy(passing[:2])
    a, b = cycle
    a["parent_id"], b["parent_id"] = b["message_id"], a["message_id"]
    # Runs the real filter; without the check the walk up from `a` alternates a, b, a, ... forever.
    with pytest.raises(oasst.DataError, match=rf"message_id '{a['message_id']}': parent chain loops back to itself "
                                              rf"\({a['message_id']} -> {b['message_id']} -> {a['message_id']}\)"):
        oasst.filter_messages(cycle, DataConfig())
    self_parent = copy.deepcopy(a)
    self_parent["parent_id"] = self_parent["message_id"]
    with pytest.raises(oasst.DataError, match="loops back"):
        oasst.filter_messages([self_parent], DataConfig())


def test_bad_data_params_are_named_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.thread_policy='longest' is not one of best | all"):
        load_params(PARAMS, overrides={"data": {"thread_policy": "longest"}})
    with pytest.raises(ConfigError, match="data.val_fraction=1.5 must lie strictly between 0 and 1"):
        load_params(PARAMS, overrides={"data": {"val_fraction": 1.5}})
    with pytest.raises(ConfigError, match="data.overlong='wrap' is not one of truncate | drop"):
        load_params(PARAMS, overrides={"data": {"overlong": "wrap"}})
    with pytest.raises(ConfigError, match="unknown key data.lang"):
        load_params(PARAMS, overrides={"data": {"lang": ["en"]}})


# ----------------------------------------------------------------------------------------------------
# Issue 12: unreadable files and data folders are named errors; nothing is dropped without a word


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_jsonl_is_named_as_holding_no_rows(tmp_path, content):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(oasst.DataError, match=rf"^{re.escape(str(path))}: holds no rows \(empty or whitespace only\)"):
        oasst.load_messages(str(path))


def test_invalid_utf8_names_file_and_line(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_bytes((json.dumps(rows[0]) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(oasst.DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        oasst.load_messages(str(path))


@pytest.mark.parametrize("kind", ["plain text named .gz", "truncated gzip"])
def test_unreadable_gzip_is_named(tmp_path, rows, kind):
    path = tmp_path / "rows.jsonl.gz"
    text = "".join(json.dumps(r) + "\n" for r in rows[:50]).encode()
    path.write_bytes(text if kind == "plain text named .gz" else gzip.compress(text)[:200])
    with pytest.raises(oasst.DataError, match=rf"^{re.escape(str(path))}: not a readable gzip file"):
        oasst.load_messages(str(path))


def test_corrupt_parquet_is_named(tmp_path, rows):
    from datasets import Dataset

    path = tmp_path / "rows.parquet"
    Dataset.from_list(rows[:20], features=oasst.FEATURES).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(oasst.DataError, match=rf"^{re.escape(str(path))}: not a readable parquet file"):
        oasst.load_messages(str(path))


def test_data_folder_refuses_unknown_files_and_reports_hidden_and_docs(tmp_path, rows):
    folder = tmp_path / "oasst"
    (folder / ".cache").mkdir(parents=True)
    _write_rows(folder / "a.jsonl", rows[:300])
    _write_rows(folder / "b.jsonl", rows[300:])
    _write_rows(folder / ".cache" / "old.jsonl", rows[:5])  # would be duplicate ids if read
    (folder / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    (folder / "README.md").write_text("# oasst1\n")
    loaded, info = oasst.load_messages(str(folder))
    assert loaded.to_list() == rows
    assert info["files"] == [str(folder / "a.jsonl"), str(folder / "b.jsonl")]
    assert info["skipped"] == [str(folder / ".cache/old.jsonl"), str(folder / ".gitattributes"),
                               str(folder / "README.md")]
    (folder / "extra.json").write_text(json.dumps(rows[:3]))
    with pytest.raises(oasst.DataError, match=r"1 file\(s\) of a type moechat does not read \(extra.json\)"):
        oasst.load_messages(str(folder))


def test_row_errors_in_a_folder_name_the_file_and_line(tmp_path, rows):
    folder = tmp_path / "oasst"
    folder.mkdir()
    bad = copy.deepcopy(rows[300:310])
    bad[3]["role"] = "system"
    _write_rows(folder / "a.jsonl", rows[:300])
    _write_rows(folder / "b.jsonl", bad)
    with pytest.raises(oasst.DataError, match=rf"got 'system' in 1 rows \(first: message_id='{bad[3]['message_id']}' "
                                              rf"at {re.escape(str(folder / 'b.jsonl'))}:4\)"):
        oasst.load_messages(str(folder))
    bad[3]["role"], bad[5]["emojis"] = "assistant", ["+1"]
    _write_rows(folder / "b.jsonl", bad)
    with pytest.raises(oasst.DataError, match=rf"^{re.escape(str(folder / 'b.jsonl'))}:6: message .*emojis must be"):
        oasst.load_messages(str(folder))
    _write_rows(folder / "b.jsonl", rows[:1])
    with pytest.raises(oasst.DataError, match=rf"appears 2 times \(at {re.escape(str(folder / 'a.jsonl'))}:1 and "
                                              rf"{re.escape(str(folder / 'b.jsonl'))}:1\)"):
        oasst.load_messages(str(folder))


def _chain(n: int, tree: str = "deep") -> list[dict]:
    """One tree of n messages, each the only reply to the one before, roles alternating from a prompt."""
    out = []
    for i in range(n):
        out.append({"message_id": f"{tree}-{i}", "parent_id": f"{tree}-{i - 1}" if i else None,
                    "message_tree_id": tree, "text": f"message {i}", "role": ("prompter", "assistant")[i % 2],
                    "lang": "en", "deleted": False, "synthetic": False, "review_result": True, "rank": 0,
                    "tree_state": "ready_for_export"})
    return out


def test_a_5000_deep_trees_export_loads(tmp_path):
    n = 5000
    rows = _chain(n)
    opening = "".join(json.dumps({k: v for k, v in r.items() if k not in ("parent_id", "message_tree_id",
                                                                          "tree_state")})[:-1] + ', "replies": ['
                      for r in rows)
    path = tmp_path / "deep.trees.jsonl"
    path.write_text(json.dumps({"message_tree_id": "deep", "tree_state": "ready_for_export"})[:-1]
                    + ', "prompt": ' + opening + "]}" * n + "}\n")
    loaded, _ = oasst.load_messages(str(path))
    assert len(loaded) == n and loaded[n - 1]["parent_id"] == f"deep-{n - 2}"


def test_a_3000_deep_reply_chain_gives_its_threads():
    rows = _chain(3000)
    kept = oasst.filter_messages(rows, DataConfig(thread_policy="all")).kept
    threads = build_threads(kept, "all")
    assert len(threads.conversations) == 1 and len(threads.conversations[0]["messages"]) == 3000
    assert build_threads(kept, "best").conversations == threads.conversations
    # below the first reply, 2,998 user messages without an answer: the walk that looks for an assistant
    # below each reply must not recurse 3,000 deep
    for row in rows[2:]:
        row["role"] = "prompter"
    kept = oasst.filter_messages(rows, DataConfig(thread_policy="all")).kept
    for policy in ("all", "best"):
        (thread,) = build_threads(kept, policy).conversations
        assert [m["content"] for m in thread["messages"]] == ["message 0", "message 1"]


def test_whitespace_only_messages_are_filtered_and_counted(rows):
    rows = copy.deepcopy(rows)
    kept = oasst.filter_messages(rows, DataConfig()).kept
    leaf = next(r for r in rows if r["message_id"] in kept and r["role"] == "assistant"
                and not any(c["parent_id"] == r["message_id"] for c in rows))
    leaf["text"] = " \n\t "
    filtered = oasst.filter_messages(rows, DataConfig())
    assert filtered.dropped["empty_text"] == 1 and leaf["message_id"] not in filtered.kept
    for policy in ("best", "all"):
        threads = build_threads(filtered.kept, policy).conversations
        assert all(m["content"] for c in threads for m in c["messages"])


# ----------------------------------------------------------------------------------------------------
# Issue 21: values Arrow cannot store, malformed trees and entries that are not files, each one line


@pytest.mark.parametrize("field, value, what", [
    ("rank", 3_000_000_000, "outside int32 (-2147483648..2147483647)"),
    ("review_count", 10**30, "outside int32 (-2147483648..2147483647)"),
    ("text", "caf\ud800", "not valid Unicode (a lone UTF-16 surrogate, as from a JSON \\ud800 escape)"),
    ("message_id", "\ud800", "not valid Unicode (a lone UTF-16 surrogate, as from a JSON \\ud800 escape)"),
])
def test_values_arrow_cannot_store_name_field_row_and_value(tmp_path, rows, field, value, what):
    bad = copy.deepcopy(rows[:6])
    bad[2][field] = value
    path = _write_rows(tmp_path / "bad.jsonl", bad)  # json.dumps writes the surrogate as the escape \ud800
    assert "\\ud800" in Path(path).read_text() or field in ("rank", "review_count")
    with pytest.raises(oasst.DataError) as err:
        oasst.load_messages(path)
    assert str(err.value) == (f"data.source={path!r}: field {field!r}={value!r:.60} is {what} in 1 of 6 rows "
                              f"(first: message_id={bad[2]['message_id']!r} at {path}:3); fix the export")


@pytest.mark.parametrize("field, value, expected", [
    ("emojis", {"+1": 2**32}, "emojis count of '+1' 4294967296 is outside int32 (-2147483648..2147483647)"),
    ("emojis", {"name": ["+1"], "count": [-2**40]}, "emojis count -1099511627776 is outside int32"),
    ("labels", {"spam": {"value": 0.5, "count": 2**31}}, "labels count of 'spam' 2147483648 is outside int32"),
    ("labels", {"spam": {"value": 10**400, "count": 1}}, "labels value of 'spam' 1000000000000000000000000000000000000"
                                                         "000 does not fit a float64"),
    ("emojis", {"\ud800": 1}, "emojis name '\\ud800' is not a valid Unicode string"),
])
def test_nested_values_arrow_cannot_store_name_file_line_and_message(tmp_path, rows, field, value, expected):
    bad = copy.deepcopy(rows[:6])
    bad[3][field] = value
    path = _write_rows(tmp_path / "bad.jsonl", bad)
    with pytest.raises(oasst.DataError) as err:
        oasst.load_messages(path)
    assert str(err.value).startswith(f"{path}:4: message {bad[3]['message_id']!r}: {expected}")
    assert str(err.value).endswith("; fix the row or drop the field")


@pytest.mark.parametrize("replies, shown", [(5, "int 5"), ({"a": {"text": "hi"}}, "dict {'a': {'text': 'hi'}}")])
def test_trees_export_replies_that_are_not_a_list_are_named(tmp_path, replies, shown):
    prompt = {k: v for k, v in _chain(1)[0].items() if k not in ("parent_id", "message_tree_id", "tree_state")}
    path = tmp_path / "x.trees.jsonl"
    ok = {"message_tree_id": "deep", "tree_state": "ready_for_export", "prompt": prompt}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "prompt": {**prompt, "replies": replies}}) + "\n")
    with pytest.raises(oasst.DataError) as err:
        oasst.load_messages(str(path))
    assert str(err.value) == (f"{path}:2: message 'deep-0' has \"replies\" = {shown}; it must be a list of message "
                              f"objects (or absent): fix the export")


def test_dangling_links_and_devices_in_a_data_folder_are_refused_hidden_ones_listed(tmp_path, rows):
    folder = tmp_path / "oasst"
    folder.mkdir()
    _write_rows(folder / "a.jsonl", rows)
    (folder / ".old.jsonl").symlink_to(tmp_path / "gone.jsonl")  # hidden: skipped and listed, as other hidden files
    _, info = oasst.load_messages(str(folder))
    assert info["skipped"] == [str(folder / ".old.jsonl")]
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (folder / "c.jsonl").symlink_to("/dev/null")
    with pytest.raises(oasst.DataError) as err:
        oasst.load_messages(str(folder))
    assert str(err.value) == (f"data.source={str(folder)!r}: 2 entries are not readable files (b.jsonl: a dangling "
                              f"symlink to {tmp_path / 'gone.jsonl'}; c.jsonl: a character device (via a symlink to "
                              f"/dev/null)); remove such entries or point the links at the export's files")
    with pytest.raises(oasst.DataError, match=r"c.jsonl': a character device \(via a symlink to /dev/null\), not a "
                                              r"file of rows; point data.source at the export itself$"):
        oasst.load_messages(str(folder / "c.jsonl"))


@pytest.mark.slow  # a subprocess through the entry point users run
@pytest.mark.parametrize("case", ["rank beyond int32", "a .jsonl linked to /dev/null"])
def test_download_stage_prints_the_data_error_as_one_line(tmp_path, rows, case):
    import subprocess
    import sys

    bad = copy.deepcopy(rows[:6])
    bad[4]["rank"] = 3_000_000_000
    if case == "rank beyond int32":
        source = _write_rows(tmp_path / "rows.jsonl", bad)
        expected = (f"data.source={source!r}: field 'rank'=3000000000 is outside int32 (-2147483648..2147483647) "
                    f"in 1 of 6 rows (first: message_id={bad[4]['message_id']!r} at {source}:5); fix the export")
    else:
        (tmp_path / "oasst").mkdir()
        source = _write_rows(tmp_path / "oasst" / "a.jsonl", rows)
        source = str(tmp_path / "oasst")
        (tmp_path / "oasst" / "b.jsonl").symlink_to("/dev/null")
        expected = (f"data.source={source!r}: 1 entry is not a readable file (b.jsonl: a character device (via a "
                    f"symlink to /dev/null)); remove such entries or point the links at the export's files")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("source: OpenAssistant/oasst1", f"source: {source}", 1))
    done = subprocess.run([sys.executable, str(PARAMS.parent / "stages" / "download.py"), "--params", str(params),
                           "--out", str(tmp_path / "raw"), "--metrics", str(tmp_path / "download.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"download: error: {expected}\n"
    assert not (tmp_path / "raw").exists()


# ----------------------------------------------------------------------------------------------------
# Issue 21: a comb-shaped tree (a deep chain with an assistant leaf on every user turn)


def test_comb_paths_grow_quadratically_without_the_bound_and_not_with_it():
    for depth in (400, 800):
        kept = oasst.filter_messages(fixture.comb_tree(depth), DataConfig()).kept
        whole = build_threads(kept, "all")
        # one thread per leaf (2k + 2 messages) and the chain's own end: the work is ~depth^2 / 4
        assert sum(len(c["messages"]) for c in whole.conversations) == sum(2 * k + 2 for k in range(depth // 2)) \
            + depth
        bounded = build_threads(kept, "all", max_messages=max_messages_for(256))
        cap = max_messages_for(256)  # 130
        assert cap == 130 and max(len(c["messages"]) for c in bounded.conversations) <= cap
        # the leaves above the cap, then one thread for everything cut (every cut path ends on the same reply)
        assert len(bounded.conversations) == cap // 2 + 1
        assert sum(len(c["messages"]) for c in bounded.conversations) == sum(2 * k + 2 for k in range(cap // 2)) \
            + cap
        assert bounded.cut == {"max_messages": cap, "paths_cut": depth // 2 + 1 - cap // 2,
                               "paths_merged": depth // 2 - cap // 2}
        dropped = build_threads(kept, "all", max_messages=cap, overlong="drop")
        assert dropped.conversations == bounded.conversations[:-1]
        assert dropped.skipped == {"overlong": depth // 2 + 1 - cap // 2}


def test_cutting_at_max_messages_keeps_exactly_the_tokens_the_whole_paths_kept():
    """The cut is exact: the overlong rule keeps the same tokens from a cut path as from the whole one, and
    the whole paths' kept conversations collapse to the cut ones (duplicates merged)."""
    from moechat.data import chat_format

    kept = oasst.filter_messages(fixture.comb_tree(80) + fixture.comb_tree(7, "short"), DataConfig()).kept
    texts = [f"{r['role']}\n{r['text']}" for r in kept.values()]
    tokenizer = chat_format.load_or_train_tokenizer(chat_format.TokenizerConfig(source="train", vocab_size=300), texts)
    im_start = tokenizer.convert_tokens_to_ids(chat_format.IM_START)
    tokenized: dict[str, chat_format.Tokenized] = {}

    def fitted(threads):
        out = []
        for c in threads.conversations:
            key = json.dumps(c["messages"])
            if key not in tokenized:
                tokenized[key] = chat_format.tokenize_conversation(tokenizer, c["messages"])
            tokens, _ = chat_format.fit_to_length(tokenized[key], seq_len, im_start, overlong)
            if tokens is not None and (tokens.input_ids, tokens.labels) not in out:
                out.append((tokens.input_ids, tokens.labels))
        return out

    whole = build_threads(kept, "all")
    for seq_len in (24, 40, 64):
        for overlong in ("truncate", "drop"):
            cut = build_threads(kept, "all", max_messages_for(seq_len), overlong)
            assert cut.cut["paths_cut"] > 0 or overlong == "drop"
            assert fitted(cut) == fitted(whole), (seq_len, overlong)
            best = build_threads(kept, "best", max_messages_for(seq_len), overlong)
            assert fitted(best) == fitted(build_threads(kept, "best"))
