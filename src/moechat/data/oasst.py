"""OASST1 message rows: load from any published form, filter, rebuild trees, pick threads, split by tree.

OASST1 comes in two shapes. The Hub dataset (and any local .jsonl/.parquet dump of it) is one row per
message (columns in tests/fixtures/oasst1_en_100/SCHEMA.md); the Open-Assistant `*.trees.jsonl[.gz]` exports nest
each tree's replies. `load_messages` turns either into one canonical row schema (`FEATURES`), so everything
downstream (filters, threads, split) sees one shape whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from moechat.config import DataConfig, MoechatError
from moechat.hub import HUB_LOAD_ERRORS, looks_like_path, require_hub_repo

DETOXIFY_KEYS = ("toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat",
                 "sexual_explicit")

# The canonical message row: the Hub dataset's columns and types (SCHEMA.md).
FEATURES = Features({
    "message_id": Value("string"),
    "parent_id": Value("string"),
    "user_id": Value("string"),
    "created_date": Value("string"),
    "text": Value("string"),
    "role": Value("string"),
    "lang": Value("string"),
    "review_count": Value("int32"),
    "review_result": Value("bool"),
    "deleted": Value("bool"),
    "rank": Value("int32"),
    "synthetic": Value("bool"),
    "model_name": Value("string"),
    "detoxify": {key: Value("float64") for key in DETOXIFY_KEYS},
    "message_tree_id": Value("string"),
    "tree_state": Value("string"),
    "emojis": {"name": List(Value("string")), "count": List(Value("int32"))},
    "labels": {"name": List(Value("string")), "value": List(Value("float64")), "count": List(Value("int32"))},
})

# Fields a row must carry with a non-null value, and fields that must be present but may be null.
REQUIRED = ("message_id", "message_tree_id", "text", "role", "lang", "deleted", "synthetic", "tree_state")
REQUIRED_NULLABLE = ("parent_id", "review_result")
ROLES = ("prompter", "assistant")
READY = "ready_for_export"

# Filter reasons in the order they are tested; a message is counted under the first that applies.
# `orphan` = the message passes every own test but its parent is not kept (dropped above, or absent).
REASONS = ("tree_state", "lang", "synthetic", "deleted", "review", "orphan")

RAW_FILE = "messages.parquet"


class DataError(MoechatError, ValueError):
    """Input data that cannot be used; the message names the source, the field or row, and the fix."""


class DownloadError(MoechatError, RuntimeError):
    """`data.source` could not be read (path missing, Hub dataset not loadable); the message says what to
    set. An unreachable or unknown Hub id raises `moechat.hub.HubError` before any download starts."""


# --------------------------------------------------------------------------------------------- loading
def source_kind(source: str) -> Literal["trees", "messages", "hub"]:
    """A local `*.trees.jsonl[.gz]` export, a local message-row file or folder, or a Hub dataset id."""
    path = Path(source)
    if path.name.endswith((".trees.jsonl", ".trees.jsonl.gz")):
        return "trees"
    if path.exists():
        return "messages"
    if path.suffix in (".jsonl", ".gz", ".parquet", ".json") or looks_like_path(source):
        raise DownloadError(f"data.source={source!r}: no such file or folder; fix the path (relative paths are "
                            f"read from the project root) or use a Hub dataset id such as OpenAssistant/oasst1")
    return "hub"


def load_messages(source: str, revision: str | None = None) -> tuple[Dataset, dict[str, Any]]:
    """Read `source` into canonical message rows; returns the rows and where they came from (incl. the
    Hub commit actually read, when the Hub says)."""
    kind = source_kind(source)
    info: dict[str, Any] = {"source": source, "kind": kind, "revision": revision, "resolved_revision": None}
    if kind == "trees":
        rows = list(_rows_from_trees(Path(source)))
    elif kind == "messages":
        rows = list(_rows_from_message_files(Path(source)))
    else:
        raw_rows, info["resolved_revision"] = _rows_from_hub(source, revision)
        rows = list(raw_rows)
    canonical = [canonical_row(row) for row in tqdm(rows, desc="canonical rows", unit="row", disable=None)]
    validate_rows(canonical, source)
    return Dataset.from_list(canonical, features=FEATURES), info


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one object")
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
            yield obj


def _rows_from_trees(path: Path) -> Iterator[dict[str, Any]]:
    """Flatten an Open-Assistant trees export: the tree's id and state go onto every message, the parent
    id comes from the nesting."""
    if not path.exists():
        raise DownloadError(f"data.source={str(path)!r}: no such file; point data.source at an existing "
                            f"*.trees.jsonl[.gz] export")
    for line_no, tree in enumerate(_read_jsonl(path), 1):
        if not isinstance(tree.get("prompt"), dict) or "message_tree_id" not in tree:
            raise DataError(f"{path}:{line_no}: a trees export line needs `message_tree_id` and a `prompt` "
                            f"object; is this a message-row file? (rename it so it does not end in .trees.jsonl)")
        stack = [(tree["prompt"], None)]
        while stack:
            message, parent_id = stack.pop()
            row = {k: v for k, v in message.items() if k != "replies"}
            row.setdefault("parent_id", parent_id)
            row.setdefault("message_tree_id", tree["message_tree_id"])
            row.setdefault("tree_state", tree.get("tree_state"))
            yield row
            stack.extend((reply, message.get("message_id")) for reply in reversed(message.get("replies") or []))


def _rows_from_message_files(path: Path) -> Iterator[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))]
    if not files:
        raise DownloadError(f"data.source={str(path)!r}: no .jsonl, .jsonl.gz or .parquet files found; point it "
                            f"at message-row files or at a *.trees.jsonl[.gz] export")
    for file in files:
        if file.name.endswith(".trees.jsonl") or file.name.endswith(".trees.jsonl.gz"):
            yield from _rows_from_trees(file)
        elif file.suffix == ".parquet":
            yield from Dataset.from_parquet(str(file)).to_list()
        else:
            yield from _read_jsonl(file)


def _rows_from_hub(source: str, revision: str | None) -> tuple[Iterable[dict[str, Any]], str | None]:
    """All splits of a Hub dataset (we re-split by tree ourselves) and the commit sha read (None when
    HF_HUB_OFFLINE reads the local cache)."""
    from datasets import concatenate_datasets, load_dataset
    from datasets.exceptions import DatasetNotFoundError

    hint = ("point data.source at a local export instead, e.g. data.source: path/to/oasst1.trees.jsonl "
            "(an Open-Assistant trees export) or a folder of the dataset's .parquet/.jsonl files")
    resolved = require_hub_repo("data.source", source, "dataset", revision, hint=hint)
    try:
        # Load the commit just checked, so `resolved_revision` is what was read even if a branch moves.
        loaded = load_dataset(source, revision=resolved or revision)
    except (DatasetNotFoundError, *HUB_LOAD_ERRORS) as err:
        where = "in the local cache (HF_HUB_OFFLINE is set)" if resolved is None else "from the Hub"
        raise DownloadError(f"data.source={source!r}: could not be loaded {where} ({type(err).__name__}: {err}); "
                            f"{hint}") from err
    splits = list(loaded.values()) if hasattr(loaded, "values") else [loaded]
    return concatenate_datasets(splits), resolved


# ------------------------------------------------------------------------------------------ canonical
def _emojis(value: Any) -> dict[str, list] | None:
    """Hub form {"name": [...], "count": [...]} or trees-export form {"+1": 3, ...}."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"name", "count"}:
        return {"name": list(value["name"]), "count": [int(c) for c in value["count"]]}
    if isinstance(value, dict):
        return {"name": list(value), "count": [int(c) for c in value.values()]}
    raise TypeError(f"emojis must be a mapping or null, got {value!r}")


def _labels(value: Any) -> dict[str, list] | None:
    """Hub form {"name","value","count"} lists, or trees-export form {"spam": {"value", "count"}, ...}."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"name", "value", "count"}:
        return {"name": list(value["name"]), "value": [float(v) for v in value["value"]],
                "count": [int(c) for c in value["count"]]}
    if isinstance(value, dict):
        return {"name": list(value), "value": [float(v["value"]) for v in value.values()],
                "count": [int(v["count"]) for v in value.values()]}
    raise TypeError(f"labels must be a mapping or null, got {value!r}")


def _detoxify(value: Any) -> dict[str, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"detoxify must be a mapping of floats or null, got {value!r}")
    return {key: (None if value.get(key) is None else float(value[key])) for key in DETOXIFY_KEYS}


def canonical_row(row: dict[str, Any]) -> dict[str, Any]:
    """One message in the canonical schema: missing optional fields become null, nested fields take the
    Hub's layout. Missing required fields are kept missing here and reported by `validate_rows`."""
    out = {name: row.get(name) for name in FEATURES}
    for name in REQUIRED + REQUIRED_NULLABLE:
        if name not in row:
            out[name] = _MISSING
    try:
        out["emojis"] = _emojis(row.get("emojis"))
        out["labels"] = _labels(row.get("labels"))
        out["detoxify"] = _detoxify(row.get("detoxify"))
    except (TypeError, KeyError, ValueError) as err:
        raise DataError(f"message {row.get('message_id')!r}: {err}; fix the row or drop the field") from err
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def validate_rows(rows: list[dict[str, Any]], source: str) -> None:
    """Named errors for rows that cannot be used: which field, how many rows, one example id."""
    problems = []
    for name in REQUIRED + REQUIRED_NULLABLE:
        bad = [r for r in rows if r[name] is _MISSING or (name in REQUIRED and r[name] is None)]
        if bad:
            what = "missing" if any(r[name] is _MISSING for r in bad) else "null"
            problems.append(f"field {name!r} {what} in {len(bad)} of {len(rows)} rows "
                            f"(first: message_id={bad[0].get('message_id')!r})")
    if problems:
        raise DataError(f"data.source={source!r}: " + "; ".join(problems) +
                        f". Required fields: {', '.join(REQUIRED + REQUIRED_NULLABLE)} (SCHEMA.md); "
                        f"fix the export or point data.source at a complete one")
    # Arrow would cast silently ("false" -> True, 1.7 -> 1, 42 -> "42"): check Python types first.
    for name, feature in FEATURES.items():
        if not isinstance(feature, Value):
            continue  # nested fields are converted, with named errors, by canonical_row
        bad = [r for r in rows if not _has_type(r[name], feature.dtype)]
        if bad:
            nullable = " or null" if name not in REQUIRED else ""
            problems.append(f"field {name!r} must be {_PY_TYPES[feature.dtype]}{nullable}, got "
                            f"{type(bad[0][name]).__name__} {bad[0][name]!r} in {len(bad)} of {len(rows)} rows "
                            f"(first: message_id={bad[0]['message_id']!r})")
    if problems:
        raise DataError(f"data.source={source!r}: " + "; ".join(problems) +
                        " (types as in SCHEMA.md: JSON true/false, numbers and strings, not quoted values); "
                        "fix the export")
    bad_roles = [r for r in rows if r["role"] not in ROLES]
    if bad_roles:
        raise DataError(f"data.source={source!r}: field 'role' must be prompter|assistant, got "
                        f"{bad_roles[0]['role']!r} in {len(bad_roles)} rows "
                        f"(first: message_id={bad_roles[0]['message_id']!r})")
    counts = Counter(r["message_id"] for r in rows)
    dup = [mid for mid, n in counts.items() if n > 1]
    if dup:
        raise DataError(f"data.source={source!r}: message_id {dup[0]!r} appears {counts[dup[0]]} times "
                        f"({len(dup)} duplicated ids); each message must appear once")


_PY_TYPES = {"string": "str", "bool": "bool", "int32": "int"}


def _has_type(value: Any, dtype: str) -> bool:
    """Whether `value` is of the FEATURES `dtype` (nulls pass: required ones were reported already).
    Integral floats pass as ints: pandas writes an int column with nulls as floats (1.0)."""
    if value is None:
        return True
    if dtype == "bool":
        return isinstance(value, bool)
    if dtype == "string":
        return isinstance(value, str)
    if dtype == "int32":
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                            and value.is_integer())
    raise ValueError(f"no type check for FEATURES dtype {dtype!r}")


def download(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Read `cfg.source` and write `out_dir/messages.parquet` (canonical rows); return counts and hash."""
    messages, info = load_messages(cfg.source, cfg.revision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{RAW_FILE}.tmp"
    messages.to_parquet(str(tmp))
    os.replace(tmp, out_dir / RAW_FILE)
    return {**info, **message_counts(messages), "sha256": content_hash(out_dir)}


def message_counts(messages: Dataset) -> dict[str, Any]:
    cols = messages.select_columns(["message_tree_id", "lang", "role", "tree_state", "deleted"]).to_dict()
    return {
        "rows": len(messages),
        "trees": len(set(cols["message_tree_id"])),
        "langs": dict(Counter(cols["lang"]).most_common()),
        "roles": dict(Counter(cols["role"]).most_common()),
        "tree_states": dict(Counter(cols["tree_state"]).most_common()),
        "deleted": sum(cols["deleted"]),
    }


def content_hash(folder: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under `folder`, in sorted order."""
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_raw(raw_dir: str | Path) -> Dataset:
    path = Path(raw_dir) / RAW_FILE
    if not path.exists():
        raise DataError(f"{path}: not found; run the download stage first (dvc repro download)")
    return Dataset.from_parquet(str(path), features=FEATURES)


# ------------------------------------------------------------------------------------ filters, trees
@dataclass
class Filtered:
    """Messages kept after filtering, indexed by id, and the count dropped per reason."""

    kept: dict[str, dict[str, Any]]
    dropped: dict[str, int]
    orphans_parent_absent: int = 0  # orphans whose parent id is not in the data at all


def own_reason(row: dict[str, Any], cfg: DataConfig) -> str | None:
    """The first filter a message fails on its own (not counting its ancestors), or None."""
    if row["tree_state"] != READY:
        return "tree_state"
    if cfg.langs and row["lang"] not in cfg.langs:
        return "lang"
    if row["synthetic"] and not cfg.include_synthetic:
        return "synthetic"
    if row["deleted"]:
        return "deleted"
    if row["review_result"] is not True:
        return "review"
    return None


def filter_messages(rows: Iterable[dict[str, Any]], cfg: DataConfig) -> Filtered:
    """Apply the filters in `REASONS` order; a message survives only if it and every ancestor pass,
    so a deleted (or unreviewed, or wrong-language) message removes every thread through it."""
    by_id = {row["message_id"]: row for row in rows}
    dropped = dict.fromkeys(REASONS, 0)
    status: dict[str, bool] = {}  # message_id -> kept

    def kept(mid: str) -> bool:
        # Iterative walk up to the first ancestor with a known status (trees run ~20 deep, cheap).
        path: list[str] = []
        on_path: set[str] = set()
        while mid not in status:
            if mid in on_path:
                loop = path[path.index(mid):] + [mid]
                raise DataError(f"message_id {mid!r}: parent chain loops back to itself ({' -> '.join(loop)}); "
                                f"every parent_id chain must end at a root (parent_id null): fix the export")
            path.append(mid)
            on_path.add(mid)
            row = by_id[mid]
            if own_reason(row, cfg) is not None:
                status[mid] = False
                path.pop()
                break
            parent = row["parent_id"]
            if parent is None:
                status[mid] = True
                path.pop()
                break
            if parent not in by_id:
                status[mid] = False
                path.pop()
                break
            mid = parent
        ok = status[mid]
        for m in path:
            status[m] = ok
        return ok

    absent = 0
    for mid, row in by_id.items():
        if kept(mid):
            continue
        reason = own_reason(row, cfg)
        if reason is None:
            reason = "orphan"
            absent += row["parent_id"] is not None and row["parent_id"] not in by_id
        dropped[reason] += 1
    return Filtered({mid: by_id[mid] for mid, ok in status.items() if ok}, dropped, absent)


def _sibling_key(row: dict[str, Any]) -> tuple:
    """Best first: ranked replies by rank (0 = best), then unranked ones; ties broken by message id, so
    the choice is deterministic and independent of row order."""
    return (row["rank"] is None, row["rank"] if row["rank"] is not None else 0, row["message_id"])


@dataclass
class Threads:
    conversations: list[dict[str, Any]]  # {"message_tree_id", "messages": [{"role", "content"}]}
    skipped: dict[str, int] = field(default_factory=dict)


def build_threads(kept: dict[str, dict[str, Any]], policy: Literal["best", "all"]) -> Threads:
    """Turn kept messages into conversations that start with a user turn and end with an assistant turn.

    best: from the root, follow the best sibling (`_sibling_key`) at every branch; the thread stops at a
          leaf and is cut after its last assistant message (Guanaco-style, one thread per tree).
    all:  every assistant message with no assistant below it ends one thread (its root path), so every
          assistant reply is trained on and no thread is a prefix of another.
    Texts are stripped of surrounding whitespace (the chat template adds the separators).
    """
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for row in kept.values():
        if row["parent_id"] is None:
            roots.append(row)
        else:
            children.setdefault(row["parent_id"], []).append(row)
    for siblings in children.values():
        siblings.sort(key=_sibling_key)
    roots.sort(key=lambda r: r["message_id"])

    skipped = Counter()
    paths: list[list[dict[str, Any]]] = []
    for root in roots:
        if root["role"] != "prompter":
            skipped["root_not_prompter"] += 1
            continue
        if policy == "best":
            path = [root]
            while children.get(path[-1]["message_id"]):
                path.append(children[path[-1]["message_id"]][0])
            candidates = [path]
        else:
            candidates = list(_assistant_ends(root, children))
        found = False
        for path in candidates:
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            if not path:
                continue
            if any(a["role"] == b["role"] for a, b in zip(path, path[1:])):
                skipped["roles_not_alternating"] += 1
                continue
            paths.append(path)
            found = True
        if not found:
            skipped["tree_without_assistant_reply"] += 1
    conversations = [{
        "message_tree_id": path[0]["message_tree_id"],
        "messages": [{"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"].strip()}
                     for m in path],
    } for path in paths]
    return Threads(conversations, dict(skipped))


def _assistant_ends(root: dict[str, Any], children: dict[str, list[dict[str, Any]]]) -> Iterator[list]:
    """Root paths of every assistant message that has no assistant message anywhere below it."""
    def has_assistant_below(mid: str) -> bool:
        return any(c["role"] == "assistant" or has_assistant_below(c["message_id"]) for c in children.get(mid, []))

    stack = [[root]]
    while stack:
        path = stack.pop()
        node = path[-1]
        if node["role"] == "assistant" and not has_assistant_below(node["message_id"]):
            yield path
        for child in reversed(children.get(node["message_id"], [])):
            stack.append(path + [child])


def split_trees(tree_ids: Iterable[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Train/val by message tree: trees sorted by sha256(seed:tree_id), the first round(n*fraction)
    (at least 1) go to val. Same seed and trees give the same split on every machine."""
    ids = sorted(set(tree_ids), key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    if len(ids) < 2:
        raise DataError(f"only {len(ids)} message tree(s) left after filtering; need at least 2 for a train/val "
                        f"split: widen data.langs, set data.include_synthetic: true, or use a larger source")
    n_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    return set(ids[n_val:]), set(ids[:n_val])
