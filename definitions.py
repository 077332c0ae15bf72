"""The Dagster entry point of this repository (``dagster dev -w workspace.yaml`` loads ``defs``).

``KVID_PROMPTS`` (a path or an fsspec URL) and ``KVID_DATA_DIR`` choose the table and the data
folder (default: the sample table in ``data/`` beside this file); ``KVID_API_KEY`` and
``KVID_BASE_URL`` choose the service. ``kvid-dagster dev`` serves the same definitions from any
folder (``kvid_dagster.dev_definitions``).
"""

from __future__ import annotations

from pathlib import Path

from kvid_dagster.definitions import definitions_from_env

ROOT = Path(__file__).resolve().parent

defs = definitions_from_env(ROOT / "data" / "prompts.csv", ROOT / "data")
