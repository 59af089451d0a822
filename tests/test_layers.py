"""Dependencies point one way: the pure core at the bottom, the listener and the Airflow
provider above it (neither importing the other), the ``raddeploy`` application on top.

Read from the source (every import, lazy ones inside functions included), so a new arrow
the wrong way fails here, not in a clinic whose listener host has no Airflow installed.
``python tests/test_layers.py`` prints the package graph (docs/architecture.md shows it).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("raddeploy_provider", "listener", "raddeploy", "dags")

#: Module prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "raddeploy_provider": "core",  # its __init__: the version, nothing else
    "raddeploy_provider.config": "core",
    "raddeploy_provider.units": "core",
    "raddeploy_provider.flows": "core",
    "raddeploy_provider.store": "core",
    "raddeploy_provider.completion": "core",
    "raddeploy_provider.gpu": "core",
    "raddeploy_provider.notices": "core",
    "raddeploy_provider.airflow_client": "core",
    "raddeploy_provider.dicom": "core",
    "raddeploy_provider.previews": "core",
    "raddeploy_provider.hooks": "provider",
    "raddeploy_provider.operators": "provider",
    "raddeploy_provider.sensors": "provider",
    "raddeploy_provider.triggers": "provider",
    "raddeploy_provider.utils": "provider",
    "raddeploy_provider.dag_factory": "provider",
    "raddeploy_provider.notifications": "provider",
    "raddeploy_provider.exceptions": "provider",
    "raddeploy_provider.get_provider_info": "provider",
    "raddeploy_provider.plugins": "provider",
    "dags": "provider",
    "listener": "listener",
    "raddeploy": "app",
}
#: Which layers each layer may import (itself included).
ALLOWED = {
    "core": {"core"},
    "provider": {"core", "provider"},
    "listener": {"core", "listener"},
    "app": {"core", "provider", "listener", "app"},
}
#: Third-party packages a layer must not import: the listener host and the CLI's checks run
#: without Airflow; the core has no Docker SDK either.
FORBIDDEN_THIRD_PARTY = {"core": {"airflow", "docker"}, "listener": {"airflow", "docker"}}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")),
               key=len, default=None)
    return LAYERS[best] if best else None


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports, relative imports resolved, at any depth of the file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import module``: the module is what is imported.
            found.update(f"{target}.{alias.name}" for alias in node.names
                         if layer_of(f"{target}.{alias.name}") and _is_module(f"{target}.{alias.name}", root))
    return found


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def source_files() -> list[Path]:
    return sorted(p for top in SOURCES for p in (REPO / top).rglob("*.py"))


def package_of(module: str) -> str:
    """The unit of the graph: ``raddeploy_provider.flows``, ``listener``, ``raddeploy``, ..."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "raddeploy_provider" and len(parts) > 1 else parts[0]


def edges() -> dict[str, set[str]]:
    """Package -> the packages of ours it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in source_files():
        here = package_of(module_name(path))
        for target in imports_of(path):
            if layer_of(target) and package_of(target) != here and target != "raddeploy_provider":
                graph[here].add(package_of(target))
    return graph


def test_every_module_has_a_layer() -> None:
    assert [module_name(p) for p in source_files() if layer_of(module_name(p)) is None] == []


def test_dependencies_point_one_way() -> None:
    wrong = []
    for path in source_files():
        here = layer_of(module_name(path))
        for target in sorted(imports_of(path)):
            there = layer_of(target)
            if there is not None and there not in ALLOWED[here]:
                wrong.append(f"{module_name(path)} ({here}) imports {target} ({there})")
            top = target.split(".")[0]
            if top in FORBIDDEN_THIRD_PARTY.get(here, ()):
                wrong.append(f"{module_name(path)} ({here}) imports {target}")
    assert wrong == []


def test_the_package_graph_has_no_cycle() -> None:
    graph = edges()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_checks_see_a_wrong_arrow(tmp_path: Path) -> None:
    """The reader resolves relative and lazy imports: a listener importing the provider is caught."""
    (tmp_path / "listener").mkdir()
    (tmp_path / "listener" / "__init__.py").write_text("")
    (tmp_path / "listener" / "other.py").write_text("")
    bad = tmp_path / "listener" / "bad.py"
    bad.write_text("def f():\n    from raddeploy_provider.operators import model\n    from . import other\n")
    found = imports_of(bad, tmp_path)
    assert {"raddeploy_provider.operators", "listener.other"} <= found
    assert layer_of("raddeploy_provider.operators") not in ALLOWED[layer_of(module_name(bad, tmp_path))]


if __name__ == "__main__":
    graph = edges()
    for package in sorted(graph, key=lambda p: (list(LAYERS.values()).index(layer_of(p)), p)):
        print(f"{package} ({layer_of(package)}) -> {', '.join(sorted(graph[package]))}")
    sys.exit(0)
