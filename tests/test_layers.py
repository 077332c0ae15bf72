"""The layers below Dagster (client, ledger, emulator, core, media) load no Dagster module:
a script or service built on them pays neither Dagster's import time nor its dependencies."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvid_dagster.cli
import kvid_dagster.client
import kvid_dagster.core
import kvid_dagster.ledger
import kvid_dagster.media


def _modules_of(package: object) -> list[str]:
    """Every module of ``package`` (imported each on its own: one could hide another's import)."""
    name: str = package.__name__  # type: ignore[attr-defined]
    paths: list[str] = list(package.__path__)  # type: ignore[attr-defined]
    return [name] + [f"{name}.{info.name}" for info in pkgutil.iter_modules(paths)]


DAGSTER_FREE = [
    "kvid_dagster.client",
    "kvid_dagster.ledger",
    "kvid_dagster.emulator",
    *_modules_of(kvid_dagster.core),
    *_modules_of(kvid_dagster.media),
]

#: prints the Dagster modules importing the module loaded, one a line
CODE = """
import importlib, sys
importlib.import_module(sys.argv[1])
print("\\n".join(m for m in sys.modules if m == "dagster" or m.startswith("dagster.")))
"""


@pytest.mark.parametrize("module", DAGSTER_FREE)
def test_module_loads_no_dagster(module: str) -> None:
    """Each in a fresh interpreter: in this one, Dagster is loaded already."""
    out = subprocess.run(
        [sys.executable, "-c", CODE, module], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [], f"{module} loads Dagster"


def _imports_within(package: object) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in it, deferred too)."""
    name: str = package.__name__  # type: ignore[attr-defined]
    folder = Path(package.__file__).parent  # type: ignore[attr-defined]
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module if node.level == 0 else f"{name}.{node.module}"
                if module.startswith(f"{name}."):
                    found.add(module.removeprefix(f"{name}.").split(".")[0])
        graph[path.stem] = found - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` (its modules in order), or [] when it has none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported, [*path, module]):
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return []


@pytest.mark.parametrize(
    "package",
    [
        kvid_dagster.client,
        kvid_dagster.ledger,
        kvid_dagster.core,
        kvid_dagster.media,
        kvid_dagster.cli,
    ],
    ids=lambda p: p.__name__,
)
def test_modules_import_each_other_one_way(package: object) -> None:
    """No import cycle inside a layer (a deferred import that hides one counts)."""
    assert _cycle(_imports_within(package)) == []
