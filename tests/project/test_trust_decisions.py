"""Every load in src/ states its trust decision: a `from_pretrained` / `from_quantized` call without an
explicit `trust_remote_code=` lets transformers decide, and on a terminal it asks `[y/N]` and runs the
folder's code on `y`."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LOADERS = {"from_pretrained", "from_quantized"}


def loads_without_a_decision(path: Path, root: Path = SRC) -> list[str]:
    """`file:line name` for each loader call in `path` without a trust_remote_code keyword."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
            if not any(k.arg == "trust_remote_code" for k in node.keywords):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.func.attr}")
    return found


def test_every_load_in_src_passes_trust_remote_code():
    files = sorted(SRC.rglob("*.py"))
    calls = sum(1 for f in files for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in LOADERS)
    assert calls >= 5  # the loaders are found at all: model, tokenizer, prepare's tokenizer, GPT-2 parent, GPTQ
    assert [hit for f in files for hit in loads_without_a_decision(f)] == []


def test_the_check_finds_a_call_without_a_decision(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained('x')\n"
                   "AutoTokenizer.from_pretrained('x', trust_remote_code=False)\n")
    assert loads_without_a_decision(bad, tmp_path) == ["probe.py:2 from_pretrained"]
