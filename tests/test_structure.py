"""The packages' shape: every module imports on its own, and trainer's imports point one way (no cycles)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports each named module after forgetting every module of our packages, so a module that only
# imports because another one ran first fails here. DALI's backend is left out where DALI is not
# installed (it is the one module that needs it).
IMPORT_EACH = """
import importlib, importlib.util, json, sys
dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("trainer", "dali_pipes")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if dali or not (exc.name or "").startswith("nvidia"):
            failures[name] = repr(exc)
    except Exception as exc:
        failures[name] = repr(exc)
print(json.dumps(failures))
"""


def _modules(package: str) -> list[str]:
    return sorted(f"{package}.{path.stem}" for path in (ROOT / package).glob("*.py") if path.stem != "__main__")


def test_every_module_imports_on_its_own() -> None:
    modules = _modules("trainer") + _modules("dali_pipes")
    assert "trainer.run" in modules and "trainer.cli" in modules
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(modules)], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


def imported_modules(path: Path, package: str) -> set[str]:
    """The modules of `package` that the file at `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == package:  # `from trainer import run`
                found |= {f"{package}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith(package + ".")}


def import_graph(package: str) -> dict[str, set[str]]:
    return {name: imported_modules(ROOT / package / f"{name.split('.')[-1]}.py", package) for name in _modules(package)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_trainer_imports_have_no_cycle() -> None:
    graph = import_graph("trainer")
    assert "trainer.inference" in graph["trainer.evaluation"]  # the graph sees imports at all
    assert "trainer.validation" in graph["trainer.run"]
    assert find_cycle(graph) is None


def test_inference_commands_do_not_import_each_other() -> None:
    graph = import_graph("trainer")
    commands = {"trainer.evaluation", "trainer.embedding", "trainer.export"}
    for name in commands:
        assert not (graph[name] & (commands - {name})), name
    assert "trainer.run" not in graph["trainer.inference"]


def test_dali_pipes_never_imports_trainer() -> None:
    for path in (ROOT / "dali_pipes").glob("*.py"):
        assert not imported_modules(path, "trainer"), path.name
