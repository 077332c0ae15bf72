"""The layers below Dagster (client, ledger, emulator, core, media) load no Dagster module:
a script or service built on them pays neither Dagster's import time nor its dependencies."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import kvid_dagster.core
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
