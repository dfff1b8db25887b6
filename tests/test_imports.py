"""The import graph of ``lavit/``, read with ``ast``: no circles, and every import points down.

Layers, bottom up: ``models`` (torch + timm only) ← ``analysis`` ← ``training`` ← ``dense``
(detection and segmentation, which reuse training's checkpoint reading) ← ``tools`` and ``cli``;
the top-level helpers (``errors``, ``runtime``, ``tables``, ``units``) import no layer. Imports
inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lavit"
# layer → the layers it must not import
FORBIDDEN = {
    "models": ("analysis", "training", "dense", "tools", "cli"),
    "analysis": ("training", "dense", "tools", "cli"),
    "training": ("dense", "tools", "cli"),
    "dense": ("tools", "cli"),
    "errors": ("models", "analysis", "training", "dense", "tools", "cli"),
    "runtime": ("models", "analysis", "training", "dense", "tools", "cli"),
    "tables": ("models", "analysis", "training", "dense", "tools", "cli"),
    "units": ("models", "analysis", "training", "dense", "tools", "cli"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lavit_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``lavit`` modules that ``path`` imports (``from a import b``: ``a.b`` if a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from lavit.x import Class` → lavit.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: lavit_imports(path, set(files)) for name, path in files.items()}


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "lavit"


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "lavit.models.lavit" in graph["lavit.models"]
    assert "lavit.training.module" in graph["lavit.cli"]
    assert "lavit.analysis.flops" in graph["lavit.training.callbacks"]
    assert "lavit.models.lavit" in graph["lavit.models.factory"]  # a relative import


def test_no_module_imports_a_layer_above_it():
    bad = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) in FORBIDDEN.get(layer(module), ())
    ]
    assert not bad, "\n".join(bad)


def test_there_is_no_import_circle():
    graph = import_graph()
    state: dict[str, str] = {}  # "active" while on the path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "active"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "active":
                return [*path[path.index(target) :], target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module)
            assert circle is None, " → ".join(circle)
