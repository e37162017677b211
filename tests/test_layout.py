"""The package's data flow runs one way: no difflab module imports, even inside a function, a
module that imports it back (directly or through others), and the library's core (methods,
networks, samplers, trainer) never imports its edges (the command line, the Python API, the
report), where what varies per call is bound."""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

SOURCE = Path(difflab.__file__).parent

#: The modules users call; everything else is the core they bind and call.
EDGES = {
    "difflab",
    "difflab.__main__",
    "difflab.api",
    "difflab.cli",
    "difflab.cli_distill",
    "difflab.cli_eval",
    "difflab.cli_train",
    "difflab.config_reference",
    "difflab.report",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The difflab modules ``path`` names in any import statement, deferred ones included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("difflab"):
            for alias in node.names:  # from difflab.train import distributed: that module
                inner = f"{node.module}.{alias.name}"
                names.add(inner if _is_module(inner) else node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("difflab")}
    return names


def _is_module(name: str) -> bool:
    path = SOURCE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in SOURCE.rglob("*.py")}
    return {name: (_imports(path) & set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first = last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_difflab_module_imports_one_that_imports_it():
    graph = import_graph()
    assert {"difflab.api", "difflab.registry", "difflab.plans", "difflab.train.trainer"} <= set(
        graph
    )
    assert "difflab.registry" in graph["difflab.plans"]  # the graph sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_core_never_imports_the_edges():
    graph = import_graph()
    assert set(graph) >= EDGES
    upward = {m: sorted(graph[m] & EDGES) for m in sorted(graph) if m not in EDGES}
    assert not {m: e for m, e in upward.items() if e}, "core modules importing edges"
