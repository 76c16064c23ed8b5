"""eetool's layers, read from its imports (every import statement, at module level, inside functions and under
TYPE_CHECKING): no import cycle among its modules; the core (eetool.core) imports no task package; nothing below
the command line imports eetool.commands; and every registered name resolves to its implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eetool"
TASKS = ("eetool.classification", "eetool.segmentation", "eetool.lm")
COMMAND_LINE = ("eetool.cli", "eetool.commands", "eetool.completion_scripts", "eetool.cli_reference", "eetool.__main__")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The eetool modules ``module`` imports: ``from a.b import c`` names a.b, and a.b.c where that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = module_names()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def inside(module: str, packages: tuple[str, ...] | str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ((packages,) if isinstance(packages, str)
                                                                   else packages))


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    known = {"eetool.core": Path(), "eetool.core.errors": Path(), "eetool.segmentation": Path(),
             "eetool.segmentation.model": Path(), "eetool.lm.class_aware_head": Path()}
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom eetool.core import errors\nif TYPE_CHECKING:\n"
                      "    from eetool.segmentation import IGNORE\ndef f():\n    import eetool.lm.class_aware_head\n"
                      "    from .model import x\n")
    assert imports_of("eetool.segmentation.m", source, known) == {
        "eetool.core", "eetool.core.errors", "eetool.segmentation", "eetool.lm.class_aware_head",
        "eetool.segmentation.model"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_core_imports_no_task(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() if inside(m, "eetool.core") for t in ts
                    if inside(t, TASKS) or inside(t, COMMAND_LINE))
    assert upward == []


def test_only_the_command_line_imports_the_commands(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() if not inside(m, COMMAND_LINE) for t in ts
                    if inside(t, COMMAND_LINE))
    assert upward == []


def test_no_private_name_is_imported_from_another_package() -> None:
    known = module_names()
    crossing = []
    for module, path in known.items():
        package = module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eetool."):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and node.module.rpartition(".")[0] != package:
                    crossing.append(f"{module}: from {node.module} import {', '.join(private)}")
    assert crossing == []


def test_every_registered_name_resolves() -> None:
    from eetool.core.architectures import ARCHITECTURES
    from eetool.core.exit_methods import EXIT_METHODS
    from eetool.core.sources import DATA_SOURCES

    for registry in (ARCHITECTURES, DATA_SOURCES, EXIT_METHODS):
        for entry in registry:
            assert callable(entry.load()), f"{registry.kind} {entry.name}: {entry.target}"


def test_no_two_modules_share_a_name() -> None:
    by_name: dict[str, list[str]] = {}
    for module in module_names():
        by_name.setdefault(module.rpartition(".")[2], []).append(module)
    assert {leaf: ms for leaf, ms in by_name.items() if len(ms) > 1} == {}
