from __future__ import annotations

import ast
import inspect
from pathlib import Path

import balancer
import balancer.transport


def test_all_is_sorted_and_holds_exactly_the_public_names() -> None:
    # Less the subpackages and the public module (`balancer.transport`), imported by name.
    public = {
        name
        for name in dir(balancer)
        if not name.startswith("_") and not inspect.ismodule(getattr(balancer, name))
    } - {"annotations"}
    assert set(balancer.__all__) == public
    # ruff's RUF022 order: constants, then classes, then functions.
    assert balancer.__all__ == sorted(balancer.__all__, key=lambda n: (not n.isupper(), n))


def test_exported_classes_and_functions_come_from_private_modules() -> None:
    for name in balancer.__all__:
        value = getattr(balancer, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            module = value.__module__.split(".")
            assert module[0] == "balancer", name
            assert module[-1].startswith("_"), name


def test_the_transport_module_exports_the_client_side_balancing() -> None:
    assert {"BalancedTransport", "BalancedSyncTransport", "StaticInstances"} <= set(
        balancer.transport.__all__
    )
    for name in balancer.transport.__all__:
        assert getattr(balancer.transport, name) is not None


def test_what_tests_and_benchmarks_need_is_public_and_the_supervisors_are_not() -> None:
    exported = set(balancer.__all__)
    assert {"ProxyServer", "ProxyOptions", "Router", "Pool", "create_admin_app"} <= exported
    # Driven by the command line, or translated at the proxy: no caller meets them.
    assert not {n for n in exported if n.startswith(("Supervisor", "Upstream", "Worker"))}


def test_tests_benchmarks_and_the_demo_import_public_names_from_balancer() -> None:
    # A name `balancer` exports, imported from a private module instead.
    root = Path(__file__).resolve().parents[2]
    exported = set(balancer.__all__)
    private: list[str] = []
    for folder in ("tests", "benchmarks", "demo_app"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("balancer.")
                    and node.module != "balancer.transport"
                ):
                    private += [
                        f"{path.relative_to(root)}: {a.name} from {node.module}"
                        for a in node.names
                        if a.name in exported
                    ]
    assert private == []
