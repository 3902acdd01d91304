"""sslpipe's imports run one way. Every import in the source (module level and inside functions)
is an edge between two units; the test fails on an edge the layering does not allow, naming the
file and line, and on any circle between units, printing it.

Layers, lowest first (a unit may import the units listed for it, and itself):
    core            -
    models          core
    pretext         models, core
    pipeline.data   core
    pipeline.config core, models, pretext (task option and backbone checks)
    pipeline.train  pipeline.data, pipeline.config, pretext, models, core
    eval            pipeline.data, pipeline.train (checkpoints, run records, the task factory),
                    pipeline.config, models, core; never pretext
    pipeline.cli    anything
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "pretext", "pipeline", "eval")
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "pretext": {"models", "core"},
    "pipeline.data": {"core"},
    "pipeline.config": {"core", "models", "pretext"},
    "pipeline.train": {"pipeline.data", "pipeline.config", "pretext", "models", "core"},
    "eval": {"pipeline.data", "pipeline.train", "pipeline.config", "models", "core"},
    "pipeline.cli": {"pipeline.data", "pipeline.config", "pipeline.train", "pretext", "models", "core", "eval"},
}


def unit_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not sslpipe's)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] != "pipeline":
        return parts[0]
    if len(parts) == 1:
        return "pipeline.cli"  # `import pipeline` alone: the package's __init__, nothing in it
    return {"data": "pipeline.data", "train": "pipeline.train", "config": "pipeline.config", "cli": "pipeline.cli"}.get(parts[1], f"pipeline.{parts[1]}")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, with its line: `import a.b`, `from a.b import c` (a.b, and
    a.b.c when that is a module), relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here[: len(here) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(package + ([base] if base else []))
            found.append((base, node.lineno))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file() or (ROOT / Path(*candidate.split("."))).is_dir():
                    found.append((candidate, node.lineno))
    return found


def unit_edges() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> ["file:line", ...] over every source file of the packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = unit_of(module_name(path))
            for module, line in imports_of(path):
                target = unit_of(module)
                if target and target != source:
                    edges.setdefault((source, target), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def find_cycle(edges) -> list[str] | None:
    """A circle in the directed graph of `edges` ((a, b) pairs), as [a, b, ..., a], or None."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_import_between_units_is_allowed_by_the_layering():
    edges = unit_edges()
    assert edges, "no imports found: the scan is broken"
    unknown = sorted({unit for edge in edges for unit in edge if unit not in ALLOWED})
    assert not unknown, f"modules outside the known units (add them to ALLOWED): {unknown}"
    bad = {f"{a} -> {b}": places for (a, b), places in edges.items() if b not in ALLOWED[a]}
    assert not bad, "imports against the layering:\n" + "\n".join(f"  {e}: {', '.join(p)}" for e, p in sorted(bad.items()))


def test_there_is_no_circle_between_units():
    edges = unit_edges()
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(edges[(a, b)][:3])}" for a, b in zip(cycle, cycle[1:]))


def test_eval_never_imports_pretext():
    places = unit_edges().get(("eval", "pretext"), [])
    assert not places, f"eval imports pretext at {places}: what eval needs from a task comes through pipeline.train.tasks"


@pytest.mark.parametrize("edges, circle", [
    ({("a", "b"), ("b", "c"), ("c", "a")}, ["a", "b", "c", "a"]),
    ({("a", "b"), ("b", "c")}, None),
    ({("pipeline.train", "eval"), ("eval", "pipeline.train"), ("eval", "core")}, ["eval", "pipeline.train", "eval"]),
])
def test_the_circle_finder_finds_circles_and_only_circles(edges, circle):
    assert find_cycle(edges) == circle


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    package = tmp_path / "eval"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lazy.py").write_text("def f():\n    from pretext.base import PretextTask\n    from . import sibling\n")
    import tests.test_import_graph as graph

    monkeypatch.setattr(graph, "ROOT", tmp_path)
    found = graph.imports_of(package / "lazy.py")
    assert ("pretext.base", 2) in found and ("eval", 3) in found
