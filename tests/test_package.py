"""The ``kvid_dagster`` package: lazy names that editors resolve too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvid_dagster

INIT = Path(kvid_dagster.__file__)


def _type_checking_imports() -> dict[str, str]:
    """name -> module of every import under ``if TYPE_CHECKING:`` in ``__init__.py``."""
    found: dict[str, str] = {}
    for node in ast.parse(INIT.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                found |= {alias.name: statement.module for alias in statement.names}
    return found


def test_every_lazy_name_is_imported_for_editors_from_the_module_that_defines_it() -> None:
    """``from kvid_dagster import KvidClient`` resolves in an editor (the TYPE_CHECKING
    imports) and at run time (``_EXPORTS``) to the same object: the two lists cannot drift."""
    exports = kvid_dagster._EXPORTS
    assert _type_checking_imports() == exports
    for name in exports:
        assert getattr(kvid_dagster, name) is getattr(sys.modules[exports[name]], name)
    assert sorted(kvid_dagster.__all__) == sorted(exports)


def test_importing_the_client_from_the_package_does_not_import_dagster() -> None:
    code = "import sys\nfrom kvid_dagster import KvidClient\nprint('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
