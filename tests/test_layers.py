"""The import graph of sparsecc (module-level and lazy imports, read from the source): no cycles,
and no module imports a layer above its own (the layers of ARCHITECTURE.md)."""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparsecc"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    """module -> the sparsecc modules it imports, anywhere in its code (`from . import x` counts as x)."""
    mods = {_name(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs or [target]
            else:
                continue
            g.add_edges_from((mod, t) for t in targets if t in mods and t != mod)
    return g


def test_the_scan_sees_the_imports(graph):
    assert ("sparsecc.api", "sparsecc.passes.pipeline") in graph.edges and graph.number_of_nodes() > 50


def test_no_import_cycles(graph):
    cycles = [c for c in nx.simple_cycles(graph) if "sparsecc" not in c]  # the package root re-exports all
    assert not cycles, f"import cycles: {sorted(cycles, key=len)[:5]}"


#: the layers, lowest first (ARCHITECTURE.md); tools and zoo share the top layer
LAYERS = [("sparsecc.errors",), ("sparsecc.prune",), ("sparsecc.codegen",), ("sparsecc.ops",), ("sparsecc.graph",),
          ("sparsecc.techniques",), ("sparsecc.passes",), ("sparsecc.io",), ("sparsecc.api", "sparsecc.finetune"),
          ("sparsecc.backend",), ("sparsecc.tools", "sparsecc.zoo", "sparsecc.__main__")]


def _layer(module: str) -> int:
    return next(i for i, prefixes in enumerate(LAYERS)
                if any(module == p or module.startswith(p + ".") for p in prefixes))


def test_every_module_has_a_layer_and_the_top_holds_few_modules(graph):
    for mod in graph.nodes:
        if mod != "sparsecc":
            _layer(mod)  # raises StopIteration for a module outside every layer
    files = sorted(p.name for p in ROOT.glob("*.py"))  # the rest of the top are the layers' packages
    assert len(files) <= 6, files


def test_no_module_imports_a_layer_above_its_own(graph):
    wrong = sorted((m, t) for m, t in graph.edges if "sparsecc" not in (m, t) and _layer(t) > _layer(m))
    assert not wrong, f"imports upward: {wrong[:5]}"


@pytest.mark.parametrize("layer, allowed", [
    ("sparsecc.prune", ("sparsecc.prune", "sparsecc.errors")),  # pure per-matrix math
    # kernels beside their references; the integer weight layout is the quantization grids' (prune)
    ("sparsecc.codegen", ("sparsecc.codegen", "sparsecc.errors", "sparsecc.prune.int_format")),
    ("sparsecc.ops", ("sparsecc.ops", "sparsecc.codegen", "sparsecc.errors", "sparsecc.prune.int_format")),  # the ops
])
def test_the_lowest_layers_import_only_what_they_need(graph, layer, allowed):
    wrong = sorted((m, t) for m, t in graph.edges if m.startswith(layer) and not t.startswith(allowed)
                   and t != "sparsecc")
    assert not wrong, f"{layer} imports upward: {wrong[:5]}"
