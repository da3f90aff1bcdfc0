"""The package is built in floors, each importing only from the floors below it, with no import cycle
anywhere (docs/architecture.md). Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

from pathlib import Path

from tests.support.imports import SRC, imported_modules, module_file

# Bottom to top. A module's floor is its package under src/moechat/; the modules directly in src/moechat/ are
# the base floor.
FLOORS = ("base", "model", "config", "data", "eval", "train", "release", "cli")


def floor_of(path: Path) -> str:
    parts = path.relative_to(SRC / "moechat").parts
    return parts[0] if len(parts) > 1 else "base"


def modules() -> list[Path]:
    return sorted((SRC / "moechat").rglob("*.py"))


def edges() -> dict[Path, set[Path]]:
    """Each module's moechat imports, as files (a package's __init__ excluded: importing `moechat.train.plan`
    runs the empty `moechat/train/__init__.py`, which is no dependency)."""
    graph = {}
    for path in modules():
        targets = {module_file(name) for name in imported_modules(path)}
        graph[path] = {t for t in targets if t is not None and t != path and t.name != "__init__.py"}
    return graph


def test_every_package_is_a_known_floor():
    unknown = sorted({floor_of(p) for p in modules()} - set(FLOORS))
    assert not unknown, f"packages {unknown} have no floor in FLOORS; add them where they belong"


def test_no_module_imports_from_a_floor_above_its_own():
    rank = {name: i for i, name in enumerate(FLOORS)}
    upward = sorted(f"{p.relative_to(SRC)} ({floor_of(p)}) imports {t.relative_to(SRC)} ({floor_of(t)})"
                    for p, targets in edges().items() for t in targets if rank[floor_of(t)] > rank[floor_of(p)])
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph, state, cycles = edges(), {}, []

    def visit(node: Path, stack: list[Path]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(str(p.relative_to(SRC)) for p in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above fail on a planted upward import and a planted cycle (so they can fail at all)."""
    import tests.support.imports as walker

    pkg = tmp_path / "moechat"
    for rel, text in {"__init__.py": "", "errors.py": "from moechat.cli.main import x\n",
                      "cli/__init__.py": "", "cli/main.py": "from moechat.cli import other\n",
                      "cli/other.py": "import moechat.cli.main\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(walker, "SRC", tmp_path)
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    for check, expected in ((test_no_module_imports_from_a_floor_above_its_own, "moechat/errors.py (base) imports"),
                            (test_no_import_cycles, "moechat/cli/main.py -> moechat/cli/other.py")):
        try:
            check()
        except AssertionError as err:
            assert expected in str(err)
        else:
            raise AssertionError(f"{check.__name__} passed on a planted violation")


def test_no_test_module_imports_another():
    """Tests share code through tests/support/ and fixtures through tests/conftest.py, never by importing a
    test module (which would also collect and run its tests twice)."""
    tests = Path(__file__).resolve().parents[1]
    offenders = sorted(f"{path.relative_to(tests)} imports {name}" for path in tests.rglob("test_*.py")
                       for name in imported_modules(path)
                       if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"))
    assert not offenders, "\n".join(offenders)


def test_the_vllm_plugin_imports_nothing_of_moechat():
    """serving/vllm installs into vLLM's environment, which has no moechat (and pins another transformers)."""
    plugin = SRC.parent / "serving" / "vllm" / "moechat_vllm"
    found = sorted(f"{path.name} imports {name}" for path in plugin.rglob("*.py") for name in imported_modules(path)
                   if name == "moechat" or name.startswith("moechat."))
    assert list(plugin.rglob("*.py")) and not found, found
