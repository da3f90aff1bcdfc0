"""Read a model or tokenizer folder's files before any loader does, and refuse the hostile ones in one line.

transformers decides on its own what a folder makes it do: an `auto_map` in tokenizer_config.json imports the
folder's Python (after asking `Do you wish to run the custom code? [y/N]` on a terminal), a
`model.safetensors.index.json` may point at pickle shards that it opens with `torch.load`, and tensors the
files lack become random weights with a log line. Each check here reads only JSON and safetensors headers
(bytes, not tensors), so a refusal costs milliseconds and happens before anything is imported, allocated or
unpickled:
- `check_tokenizer_code`: a tokenizer whose class is the folder's own code (or not a transformers class);
- `weight_shards`: the safetensors files transformers will read, every one a `.safetensors` file in the folder;
- `check_sizes` / `check_tensors`: config.json against the tensors in the files (names and shapes).
This module imports no model code: the data floor uses it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moechat.errors import MoechatError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHOWN = 3  # names listed in a message before "+N more"
# How the installed moechat model names what config.json sizes: n_layer blocks, num_experts experts.
BLOCK = re.compile(r"transformer\.h\.(\d+)\.")
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
# A count the files show none of (all blocks missing) is left to check_tensors up to this size, for which
# building the model on the meta device stays quick.
MAX_UNSEEN = 1024
# GPTQ stores a quantized Linear's `weight` as these tensors (shapes set by bits and group size).
QUANTIZED_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
# The fix for weights that do not match the model: transformers would make a missing tensor random.
INTACT = "a missing tensor would be random weights: re-export the folder from an intact model"
# The pipeline stages never run a folder's code (chat does with --trust-remote-code): how to proceed.
PIPELINE_NO_CODE = ("the pipeline never runs a folder's code: save the tokenizer with a transformers class "
                    "(tokenizer.json + tokenizer_class PreTrainedTokenizerFast) or set tokenizer.source: train, "
                    "then dvc repro")


class FolderCheckError(MoechatError, ValueError):
    """A folder's files would make a loader run code, unpickle, allocate absurdly or invent weights."""


def listed(names: Iterable[str]) -> str:
    """`a, b, c (+4 more)`: the first few names of a sorted list and how many were left out."""
    names = sorted(names)
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file's object, {} when the file is absent; one line for a file that is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FolderCheckError(f"{path}: not valid JSON text ({err}); re-save the folder") from None
    if not isinstance(data, dict):
        raise FolderCheckError(f"{path}: expected a JSON object, got a {type(data).__name__}; re-save the folder")
    return data


# ------------------------------------------------------------------------------------ tokenizer code
def tokenizer_code(folder: Path) -> str | None:
    """What in `folder` would make AutoTokenizer import the folder's Python, as `file: reason`, or None."""
    folder = Path(folder)
    for name in ("tokenizer_config.json", "config.json"):
        auto_map = _json_object(folder / name).get("auto_map")
        if name == "config.json" and isinstance(auto_map, dict):
            auto_map = auto_map.get("AutoTokenizer")
        if auto_map:
            return f"{folder / name}: auto_map names the folder's own tokenizer code ({json.dumps(auto_map)})"
    tokenizer_class = _json_object(folder / "tokenizer_config.json").get("tokenizer_class")
    if tokenizer_class is not None and not _is_transformers_tokenizer(tokenizer_class):
        return (f"{folder / 'tokenizer_config.json'}: tokenizer_class={tokenizer_class!r} is not a transformers "
                f"tokenizer class")
    return None


def _is_transformers_tokenizer(name: Any) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(name, str):
        return False
    return any(tokenizer_class_from_name(n) is not None for n in (name, name + "Fast", name.removesuffix("Fast")))


def check_tokenizer_code(folder: Path, trust_remote_code: bool, fix: str) -> None:
    """Refuse a tokenizer folder that carries its own code unless `trust_remote_code`; `fix` ends the line."""
    reason = None if trust_remote_code else tokenizer_code(folder)
    if reason:
        raise FolderCheckError(f"{reason}, which would run with your permissions; {fix}")


# ------------------------------------------------------------------------------------ weight files
def weight_shards(folder: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file holding it, as transformers would read them with
    `use_safetensors=True`: model.safetensors, or the shards model.safetensors.index.json names. An index
    naming anything but a `.safetensors` file inside the folder (a pickle, a path elsewhere) is refused."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        if not (folder / SINGLE).is_file():
            raise FolderCheckError(f"{folder}: no {SINGLE} or {INDEX}; re-save the model with "
                                   f"save_pretrained(safe_serialization=True)")
        return {name: folder / SINGLE for name in _tensor_shapes(folder / SINGLE)}
    weight_map = _json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FolderCheckError(f"{index}: no weight_map object of tensor names to safetensors files; re-save the model")
    files = {str(f) for f in weight_map.values()}
    bad = sorted(f for f in files if not f.endswith(".safetensors") or Path(f).name != f)
    if bad:
        raise FolderCheckError(f"{index}: maps tensors to {listed(bad)}, not .safetensors files in the folder; "
                               f"moechat reads safetensors only and never unpickles: re-save the model with "
                               f"save_pretrained(safe_serialization=True)")
    missing = sorted(f for f in files if not (folder / f).is_file())
    if missing:
        raise FolderCheckError(f"{index}: names {listed(missing)}, missing from {folder}; copy the whole folder")
    return {name: folder / str(file) for name, file in weight_map.items()}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise FolderCheckError(f"{path}: not a readable safetensors file ({err}); re-save the model") from None


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the folder's weights -> its shape; an index whose names disagree with its shards'
    headers is refused (transformers would miss or never load some)."""
    shards = weight_shards(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(shards.values())):
        shapes.update(_tensor_shapes(path))
    if (folder / INDEX).is_file() and set(shapes) != set(shards):
        differ = set(shapes) ^ set(shards)
        raise FolderCheckError(f"{folder / INDEX}: its weight_map and the shards' tensors differ in {len(differ)} "
                               f"names ({listed(differ)}); re-save the model")
    return shapes


# ------------------------------------------------------------------------------------ sizes and names
def check_sizes(folder: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """config.json's sizes against the tensors the files hold, before any model is built: a config asking for
    a million layers or a billion-token vocabulary the files do not have is refused without allocating."""
    found = {"n_layer": len({m.group(1) for n in shapes if (m := BLOCK.match(n))}),
             "num_experts": max((int(m.group(1)) + 1 for n in shapes if (m := EXPERT.search(n))), default=None)}
    for name, key, axis in (("transformer.wte.weight", "vocab_size", 0), ("transformer.wte.weight", "n_embd", 1),
                            ("transformer.wpe.weight", "n_positions", 0)):
        if name in shapes and len(shapes[name]) == 2:
            found[key] = shapes[name][axis]
    for key, value in found.items():
        wanted = config.get(key)
        if not value and isinstance(wanted, int) and 0 < wanted <= MAX_UNSEEN:
            continue  # the files hold no block or expert: check_tensors names what is missing
        if value is not None and wanted is not None and wanted != value:
            raise FolderCheckError(f"{folder / 'config.json'}: {key}={wanted!r} but the weights hold {value}; "
                                   f"the config does not belong to these weights: re-export the folder")


def check_tensors(folder: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """The files hold exactly the tensors the model has, each in its shape; a GPTQ-quantized Linear's weight
    counts as present when its qweight/qzeros/scales are (their shapes depend on bits and group size)."""
    quantized = {n[:-len(".qweight")] for n in found if n.endswith(".qweight")}
    expected = dict(expected)
    for prefix in quantized:
        if expected.pop(prefix + ".weight", None) is not None:
            expected.update({prefix + part: found.get(prefix + part) for part in QUANTIZED_PARTS[:3]})
    optional = {prefix + ".g_idx" for prefix in quantized}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - optional)
    misshaped = sorted(n for n in set(expected) & set(found) if expected[n] is not None and expected[n] != found[n])
    problems = [f"{len(names)} {label}: {listed(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if misshaped:
        problems[-1] += f" ({misshaped[0]} is {list(found[misshaped[0]])} in the file, " \
                        f"{list(expected[misshaped[0]])} in the model)"
    if problems:
        raise FolderCheckError(f"{folder}: the tensors do not match config.json: {'; '.join(problems)}; "
                               f"{INTACT}")
