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
import stat
import sys
import zlib
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from moechat.config.params import DataConfig
from moechat.errors import MoechatError
from moechat.data.threads import Threads
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
# `empty_text` = whitespace-only text: an empty reply would teach the model to answer with nothing.
REASONS = ("tree_state", "lang", "synthetic", "deleted", "review", "empty_text", "orphan")

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
    Hub commit actually read, when the Hub says, and for local sources the files read and skipped)."""
    kind = source_kind(source)
    info: dict[str, Any] = {"source": source, "kind": kind, "revision": revision, "resolved_revision": None}
    if kind == "hub":
        raw_rows, info["resolved_revision"] = _rows_from_hub(source, revision)
        located = [(None, row) for row in raw_rows]
    else:
        files, skipped = data_files(Path(source))
        info["files"] = [str(f) for f in files]
        info["skipped"] = [str(f) for f in skipped]
        located = [item for file in files for item in _rows_from_file(file)]
    if not located:
        raise DataError(f"data.source={source!r}: 0 message rows read"
                        + (f" from {', '.join(info['files'])}" if info.get("files") else "")
                        + "; point data.source at a non-empty export")
    origins = [origin for origin, _ in located]
    canonical = [_canonical_at(row, origin) for origin, row in tqdm(located, desc="canonical rows", unit="row",
                                                                   disable=None)]
    validate_rows(canonical, source, origins)
    return Dataset.from_list(canonical, features=FEATURES), info


def _canonical_at(row: Any, origin: str | None) -> dict[str, Any]:
    """canonical_row, with the file and line of a row that cannot be converted in the error."""
    try:
        return canonical_row(row)
    except DataError as err:
        raise DataError(f"{origin}: {err}" if origin else str(err)) from None


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
DOC_SUFFIXES = (".md", ".txt", ".rst")  # a dataset folder's README/SCHEMA/LICENSE: skipped, listed in download.json


def data_files(path: Path) -> tuple[list[Path], list[Path]]:
    """The message-row or trees files of a source path and the files skipped (hidden ones, documentation).

    A folder is read whole or refused: a file of any other type, a dangling symlink, a device or a pipe is an
    error naming it, not silently left out (it would drop its rows without a word); hidden entries (a `.` in
    the path) are skipped and listed."""
    if not path.is_dir():
        if not path.name.endswith(DATA_SUFFIXES):
            raise DownloadError(f"data.source={str(path)!r}: not a .jsonl, .jsonl.gz or .parquet file; point it at "
                                f"message-row files or at a *.trees.jsonl[.gz] export")
        if not path.is_file():
            raise DataError(f"data.source={str(path)!r}: {_not_a_file(path)}, not a file of rows; point "
                            f"data.source at the export itself")
        return [path], []
    files, skipped, unknown, not_files = [], [], [], []
    for file in sorted(p for p in path.rglob("*") if not p.is_dir()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            skipped.append(file)
        elif not file.is_file():
            not_files.append(f"{relative}: {_not_a_file(file)}")
        elif file.name.endswith(DATA_SUFFIXES):
            files.append(file)
        elif file.name.endswith(DOC_SUFFIXES) or file.name.upper().startswith(("README", "LICENSE")):
            skipped.append(file)
        else:
            unknown.append(file)
    if not_files:  # a link whose rows would be lost without a word, or a device or pipe that reads forever
        entries = "1 entry is not a readable file" if len(not_files) == 1 else \
            f"{len(not_files)} entries are not readable files"
        raise DataError(f"data.source={str(path)!r}: {entries} ({'; '.join(not_files[:5])}); remove such entries "
                        f"or point the links at the export's files")
    if unknown:
        raise DataError(f"data.source={str(path)!r}: {len(unknown)} file(s) of a type moechat does not read "
                        f"({', '.join(str(f.relative_to(path)) for f in unknown[:5])}); the folder may hold only "
                        f"{', '.join(DATA_SUFFIXES)} files (plus documentation): convert or move those out")
    if not files:
        raise DownloadError(f"data.source={str(path)!r}: no .jsonl, .jsonl.gz or .parquet files found; point it "
                            f"at message-row files or at a *.trees.jsonl[.gz] export")
    return files, skipped


def _not_a_file(path: Path) -> str:
    """What a data-folder entry that is not a regular file is: a dangling link, a device, a pipe."""
    if path.is_symlink() and not path.exists():
        return f"a dangling symlink to {os.readlink(path)}"
    mode = path.stat().st_mode
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"{kind} (via a symlink to {os.readlink(path)})" if path.is_symlink() else kind


def _rows_from_file(file: Path) -> list[tuple[str, Any]]:
    """(origin "file:line" or "file row N", raw row) of one local file; an empty file is an error."""
    if file.name.endswith((".trees.jsonl", ".trees.jsonl.gz")):
        located = list(_rows_from_trees(file))
    elif file.suffix == ".parquet":
        located = [(f"{file} row {i + 1}", row) for i, row in enumerate(_read_parquet(file))]
    else:
        located = [(f"{file}:{line_no}", row) for line_no, row in _read_jsonl(file)]
    if not located:
        raise DataError(f"{file}: holds no rows (empty or whitespace only); remove it or write the export again")
    return located


def _read_parquet(file: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable parquet file ({type(err).__name__}: {err}); "
                        f"download or write it again") from None


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


# A JSON line nests two levels per reply (object, `replies` list); Python's parser counts each against the
# recursion limit, which the default 1000 makes a 500-deep reply chain. This bound parses chains ~12,000
# deep and stays far from the C stack.
JSON_NESTING_LIMIT = 25_000


@contextmanager
def _deep_json():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, JSON_NESTING_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; unreadable bytes or JSON are errors naming file:line.
    Lines are decoded one by one, so an invalid UTF-8 byte is reported on its own line."""
    try:
        with _open_bytes(path) as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid UTF-8 ({err.reason} at byte {err.start} of the "
                                    f"line); save the file as UTF-8") from None
                if line.strip():
                    yield line_no, _parse_line(path, line_no, line)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({type(err).__name__}: {err}); download it again, "
                        f"or drop the .gz suffix if it is plain text") from None


def _parse_line(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        with _deep_json():
            obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one object") from None
    except RecursionError:
        raise DataError(f"{path}:{line_no}: nested deeper than {JSON_NESTING_LIMIT} levels; split the tree "
                        f"or export it as message rows") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
    return obj


def _rows_from_trees(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Flatten an Open-Assistant trees export (iteratively: a reply chain may run thousands deep): the tree's
    id and state go onto every message, the parent id comes from the nesting."""
    if not path.exists():
        raise DownloadError(f"data.source={str(path)!r}: no such file; point data.source at an existing "
                            f"*.trees.jsonl[.gz] export")
    for line_no, tree in _read_jsonl(path):
        if not isinstance(tree.get("prompt"), dict) or "message_tree_id" not in tree:
            raise DataError(f"{path}:{line_no}: a trees export line needs `message_tree_id` and a `prompt` "
                            f"object; is this a message-row file? (rename it so it does not end in .trees.jsonl)")
        stack = [(tree["prompt"], None)]
        while stack:
            message, parent_id = stack.pop()
            if not isinstance(message, dict):
                raise DataError(f"{path}:{line_no}: a reply of message {parent_id!r} is "
                                f"{type(message).__name__}, not an object; fix the export")
            row = {k: v for k, v in message.items() if k != "replies"}
            row.setdefault("parent_id", parent_id)
            row.setdefault("message_tree_id", tree["message_tree_id"])
            row.setdefault("tree_state", tree.get("tree_state"))
            yield f"{path}:{line_no}", row
            replies = message.get("replies")
            if replies is not None and not isinstance(replies, list):
                raise DataError(f"{path}:{line_no}: message {message.get('message_id')!r} has \"replies\" = "
                                f"{type(replies).__name__} {replies!r:.60}; it must be a list of message objects "
                                f"(or absent): fix the export")
            stack.extend((reply, message.get("message_id")) for reply in reversed(replies or []))


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
        return {"name": _names(value["name"], "emojis"),
                "count": [_int32(c, "emojis count") for c in value["count"]]}
    if isinstance(value, dict):
        return {"name": _names(value, "emojis"),
                "count": [_int32(c, f"emojis count of {k!r}") for k, c in value.items()]}
    raise TypeError(f"emojis must be a mapping or null, got {value!r}")


def _labels(value: Any) -> dict[str, list] | None:
    """Hub form {"name","value","count"} lists, or trees-export form {"spam": {"value", "count"}, ...}."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"name", "value", "count"}:
        return {"name": _names(value["name"], "labels"),
                "value": [_float(v, "labels value") for v in value["value"]],
                "count": [_int32(c, "labels count") for c in value["count"]]}
    if isinstance(value, dict):
        return {"name": _names(value, "labels"), "value": [_float(v["value"], f"labels value of {k!r}")
                                                           for k, v in value.items()],
                "count": [_int32(v["count"], f"labels count of {k!r}") for k, v in value.items()]}
    raise TypeError(f"labels must be a mapping or null, got {value!r}")


INT32 = (-2**31, 2**31 - 1)  # the Hub schema's int32 columns (rank, review_count, emoji and label counts)


def _int32(value: Any, what: str) -> int:
    """`value` as an int of the int32 range; beyond it Arrow fails with an error naming no row."""
    number = int(value)
    if not INT32[0] <= number <= INT32[1]:
        raise ValueError(f"{what} {number} is outside int32 ({INT32[0]}..{INT32[1]})")
    return number


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{what} {value!r:.40} does not fit a float64") from None


def _names(names: Iterable[Any], what: str) -> list[str]:
    """Emoji or label names: valid Unicode strings (a JSON "\\ud800" escape gives a lone surrogate)."""
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not _is_unicode(name):
            raise ValueError(f"{what} name {name!r} is not a valid Unicode string")
    return names


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone UTF-16 surrogate, which no UTF-8 file or Arrow column can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _detoxify(value: Any) -> dict[str, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"detoxify must be a mapping of floats or null, got {value!r}")
    return {key: (None if value.get(key) is None else _float(value[key], f"detoxify {key}")) for key in DETOXIFY_KEYS}


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
    except (TypeError, KeyError, ValueError, OverflowError) as err:
        raise DataError(f"message {row.get('message_id')!r}: {err}; fix the row or drop the field") from None
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def validate_rows(rows: list[dict[str, Any]], source: str, origins: list[str | None] | None = None) -> None:
    """Named errors for rows that cannot be used: which field, how many rows, one example id and, when
    `origins` (file:line per row) is given, where that example is."""
    def first(bad: list[int]) -> str:
        where = origins[bad[0]] if origins is not None and origins[bad[0]] else None
        return f"first: message_id={rows[bad[0]].get('message_id')!r}" + (f" at {where}" if where else "")

    problems = []
    for name in REQUIRED + REQUIRED_NULLABLE:
        bad = [i for i, r in enumerate(rows) if r[name] is _MISSING or (name in REQUIRED and r[name] is None)]
        if bad:
            what = "missing" if any(rows[i][name] is _MISSING for i in bad) else "null"
            problems.append(f"field {name!r} {what} in {len(bad)} of {len(rows)} rows ({first(bad)})")
    if problems:
        raise DataError(f"data.source={source!r}: " + "; ".join(problems) +
                        f". Required fields: {', '.join(REQUIRED + REQUIRED_NULLABLE)} (SCHEMA.md); "
                        f"fix the export or point data.source at a complete one")
    # Arrow would cast silently ("false" -> True, 1.7 -> 1, 42 -> "42"): check Python types first.
    for name, feature in FEATURES.items():
        if not isinstance(feature, Value):
            continue  # nested fields are converted, with named errors, by canonical_row
        bad = [i for i, r in enumerate(rows) if not _has_type(r[name], feature.dtype)]
        if bad:
            nullable = " or null" if name not in REQUIRED else ""
            value = rows[bad[0]][name]
            problems.append(f"field {name!r} must be {_PY_TYPES[feature.dtype]}{nullable}, got "
                            f"{type(value).__name__} {value!r} in {len(bad)} of {len(rows)} rows ({first(bad)})")
    if problems:
        raise DataError(f"data.source={source!r}: " + "; ".join(problems) +
                        " (types as in SCHEMA.md: JSON true/false, numbers and strings, not quoted values); "
                        "fix the export")
    problems = _value_problems(rows, first)
    if problems:
        raise DataError(f"data.source={source!r}: " + "; ".join(problems) + "; fix the export")
    bad_roles = [i for i, r in enumerate(rows) if r["role"] not in ROLES]
    if bad_roles:
        raise DataError(f"data.source={source!r}: field 'role' must be prompter|assistant, got "
                        f"{rows[bad_roles[0]]['role']!r} in {len(bad_roles)} rows ({first(bad_roles)})")
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["message_id"] in seen:
            n = sum(1 for x in rows if x["message_id"] == r["message_id"])
            where = f" (at {origins[seen[r['message_id']]]} and {origins[i]})" if origins is not None and origins[i] \
                else ""
            raise DataError(f"data.source={source!r}: message_id {r['message_id']!r} appears {n} times{where}; "
                            f"each message must appear once")
        seen[r["message_id"]] = i


def _value_problems(rows: list[dict[str, Any]], first: Callable[[list[int]], str]) -> list[str]:
    """Values of the right Python type that Arrow still cannot store: ints beyond int32, strings with a lone
    surrogate (a JSON "\\ud800" escape); Arrow would fail on them naming no row."""
    problems = []
    for name, feature in FEATURES.items():
        if not isinstance(feature, Value) or feature.dtype not in ("int32", "string"):
            continue
        if feature.dtype == "int32":
            bad = [i for i, r in enumerate(rows) if r[name] is not None and not INT32[0] <= r[name] <= INT32[1]]
            what = f"outside int32 ({INT32[0]}..{INT32[1]})"
        else:
            bad = [i for i, r in enumerate(rows) if r[name] is not None and not _is_unicode(r[name])]
            what = "not valid Unicode (a lone UTF-16 surrogate, as from a JSON \\ud800 escape)"
        if bad:
            problems.append(f"field {name!r}={rows[bad[0]][name]!r:.60} is {what} in {len(bad)} of {len(rows)} rows "
                            f"({first(bad)})")
    return problems


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
    if not row["text"].strip():
        return "empty_text"
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




















def split_trees(tree_ids: Iterable[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Train/val by message tree: trees sorted by sha256(seed:tree_id), the first round(n*fraction)
    (at least 1) go to val. Same seed and trees give the same split on every machine."""
    ids = sorted(set(tree_ids), key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    if len(ids) < 2:
        raise DataError(f"only {len(ids)} message tree(s) left after filtering; need at least 2 for a train/val "
                        f"split: widen data.langs, set data.include_synthetic: true, or use a larger source")
    n_val = min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    return set(ids[n_val:]), set(ids[:n_val])


# What to change when a filter or thread rule leaves too little, by the reason that removed the most.
ADVICE = {
    "tree_state": "no tree is ready_for_export in the source; use a complete export",
    "lang": "widen data.langs (metrics/download.json lists the source's languages)",
    "synthetic": "set data.include_synthetic: true",
    "deleted": "the source's messages are marked deleted; use an export with live messages",
    "review": "the source's messages failed or lack review (review_result); use a reviewed export",
    "empty_text": "the source's texts are empty or whitespace; fix the export",
    "orphan": "replies whose parent is filtered or absent are dropped; use a source with whole trees",
    "tree_without_assistant_reply": "no assistant reply survives the filters; use a source with assistant replies",
    "roles_not_alternating": "user and assistant turns do not alternate in the source's trees; fix the export",
    "overlong": "set data.overlong: truncate, or raise train.seq_len",
    "root_not_prompter": "the source's trees start with an assistant message; fix the export",
}


def too_few_trees(rows: list[dict[str, Any]], cfg: DataConfig, filtered: Filtered, threads: Threads) -> str:
    """Why fewer than 2 trees have a conversation (a train/val split needs 2): the counts and the advice for
    the reason that removed the most; about the assistant replies alone when none of them is left."""
    trees = len({c["message_tree_id"] for c in threads.conversations})
    head = f"only {trees} message tree(s) have a conversation, a train/val split needs 2"
    replies = [r for r in rows if r["role"] == "assistant"]
    if not any(r["role"] == "assistant" for r in filtered.kept.values()):
        causes = Counter(own_reason(r, cfg) or "orphan" for r in replies)
        if not causes:
            return f"{head}: the source holds no assistant reply at all; use an export with replies"
        return (f"{head}: none of the {len(replies)} assistant replies is left (removed: {_counts(causes)}); "
                f"{ADVICE[causes.most_common(1)[0][0]]}")
    causes = Counter({**filtered.dropped, **threads.skipped})
    advice = ADVICE[causes.most_common(1)[0][0]] if +causes else "use a larger source"
    return (f"{head}: of {len(rows)} messages {len(filtered.kept)} passed the filters (removed or skipped: "
            f"{_counts(causes)}); {advice}")


def _counts(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.most_common() if v) or "nothing"
