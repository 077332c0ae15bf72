"""The Dagster entry point (``dagster dev -w workspace.yaml`` loads ``defs`` from here).

``KVID_PROMPTS`` (a path or an fsspec URL) and ``KVID_DATA_DIR`` choose the table and the data
folder (default: the sample table in ``data/`` beside this file); ``KVID_API_KEY`` and
``KVID_BASE_URL`` choose the service.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.project import KvidProject

ROOT = Path(__file__).resolve().parent

defs = build_kvid_definitions(
    KvidProject(
        prompts=os.environ.get("KVID_PROMPTS") or ROOT / "data" / "prompts.csv",
        data_dir=os.environ.get("KVID_DATA_DIR") or ROOT / "data",
    )
)
