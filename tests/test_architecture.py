"""The package graph of docs/architecture.md ("Dependency rules"), checked on every import
of every module (read with `ast`, so nothing is imported): the layers import only down, so
that no cycle and no upward import can come in unnoticed.

    redis_plumbing      nothing of ours
    service_registry    redis_plumbing
    session_store       redis_plumbing
    balancer            redis_plumbing, service_registry
      balancer.datapath itself and balancer._exceptions (the compiled part: mypyc)
    demo_app            session_store, service_registry, redis_plumbing, balancer.transport
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("redis_plumbing", "service_registry", "session_store", "balancer", "demo_app")

# Which of our packages each may import, besides itself.
ALLOWED: dict[str, set[str]] = {
    "redis_plumbing": set(),
    "service_registry": {"redis_plumbing"},
    "session_store": {"redis_plumbing"},
    "balancer": {"redis_plumbing", "service_registry"},
    "demo_app": {"redis_plumbing", "service_registry", "session_store", "balancer"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Each module of ours that `path` imports, relative imports resolved to full names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                assert node.module is not None
                target = node.module
            # `from PACKAGE import name` may name a submodule: count it as one.
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
            if not node.module:
                names = names[1:]
        else:
            continue
        for name in names:
            if name.partition(".")[0] in PACKAGES:
                yield name


def _edges() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, over every package's every module."""
    edges: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            edges[_module_name(path)] = set(_imports(path))
    return edges


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_the_scan_sees_the_imports() -> None:
    edges = _edges()
    assert "redis_plumbing" in edges["session_store._redis"]
    assert "service_registry" in edges["balancer.control._discovery"]
    assert "balancer.datapath._backend" in edges["balancer.datapath._pool"]
    assert "balancer._exceptions" in edges["balancer.datapath._pool"]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    upward = {
        module: sorted(
            target
            for target in targets
            if target.partition(".")[0] not in ALLOWED[package] | {package}
        )
        for module, targets in _edges().items()
        if module.partition(".")[0] == package
    }
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_the_data_path_imports_only_itself_and_the_balancer_exceptions() -> None:
    outside = {
        module: sorted(
            target
            for target in targets
            if not target.startswith("balancer.datapath")
            and target != "balancer._exceptions"
            and not (target.startswith("balancer.") and not _is_module(target))
        )
        for module, targets in _edges().items()
        if module.startswith("balancer.datapath")
    }
    assert {module: targets for module, targets in outside.items() if targets} == {}


def test_the_demo_uses_only_the_balancers_public_transport() -> None:
    private = {
        module: sorted(
            target
            for target in targets
            if target.startswith("balancer")
            and target != "balancer.transport"
            and not target.startswith("balancer.transport.")
        )
        for module, targets in _edges().items()
        if module.startswith("demo_app")
    }
    assert {module: targets for module, targets in private.items() if targets} == {}


def test_the_package_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for module, targets in _edges().items():
        source = module.partition(".")[0]
        graph[source] |= {target.partition(".")[0] for target in targets} - {source}
    # Kahn's algorithm: a package leaves once everything it imports has left.
    left = dict(graph)
    while True:
        ready = [package for package, needs in left.items() if not needs & left.keys()]
        if not ready:
            break
        for package in ready:
            del left[package]
    assert left == {}, f"an import cycle among {sorted(left)}"
