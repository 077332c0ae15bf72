"""``KvidProject``: where a kvid pipeline's table, ledger, catalogs and videos live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import DynamicPartitionsDefinition

from kvid_dagster.client import ApiDialect, dialect_for
from kvid_dagster.ledger import Ledger, PublishStats, publish
from kvid_dagster.prompts import PromptTable, checked_param_defaults, load_prompt_table
from kvid_dagster.storage import Storage, StoragePath

DATABASE_URL_ENV = "KVID_DATABASE_URL"
DIALECT_ENV = "KVID_API_DIALECT"


def dialect_from_env(dialect: ApiDialect | str | None = None) -> ApiDialect:
    """``dialect``, else ``$KVID_API_DIALECT``, else the video dialect (an unknown name is a
    ``KvidValidationError`` naming the allowed ones)."""
    return dialect_for(dialect or os.environ.get(DIALECT_ENV, "").strip() or ApiDialect.VIDEO).api


class KvidProject:
    """One prompt table and one data folder: the unit a set of kvid definitions is built for.

    The ledger is ``database_url`` (else ``$KVID_DATABASE_URL``, else the SQLite file
    ``<data_dir>/kvid.db``); ``<data_dir>/catalog/`` holds the Parquet catalogs published from
    it, ``<data_dir>/videos/`` the downloaded videos; ``storage_url`` (else
    ``$KVID_STORAGE_URL``: a local path or an fsspec URL such as ``s3://bucket/prefix``) moves
    ``catalog/`` and ``videos/`` there (see :mod:`kvid_dagster.storage`; the ledger stays in
    its database). The partitions definition is named after
    ``partitions_name`` so two projects can share a Dagster instance. ``dialect`` (else
    ``$KVID_API_DIALECT``, else ``video``) is the API dialect the table's rows are requests of.
    ``param_defaults`` (``{"resolution": "720p", "model": "v2"}``) fill each row's empty kvid
    cells: a row's request, and so its hash, includes them, so changing one is a new request.
    """

    def __init__(
        self,
        prompts_path: str | Path,
        data_dir: str | Path,
        *,
        database_url: str | None = None,
        table_prefix: str = "kvid_",
        partitions_name: str = "kvid_prompts",
        dialect: ApiDialect | str | None = None,
        param_defaults: Mapping[str, Any] | None = None,
        storage_url: str | None = None,
    ) -> None:
        self.prompts_path = Path(prompts_path).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.database_url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        self.table_prefix = table_prefix
        self.dialect = dialect_from_env(dialect)
        # a bad default is refused here, before any table is read
        self.param_defaults = checked_param_defaults(param_defaults or {})
        self.partitions_def = DynamicPartitionsDefinition(name=partitions_name)
        self.storage = Storage.from_setting(storage_url, self.data_dir)
        self._ledger: tuple[int, Ledger] | None = None

    @property
    def partitions_name(self) -> str:
        assert self.partitions_def.name is not None
        return self.partitions_def.name

    @property
    def catalog_dir(self) -> StoragePath:
        return self.storage.catalog_dir

    @property
    def videos_dir(self) -> StoragePath:
        return self.storage.videos_dir

    def ledger(self) -> Ledger:
        """This process's ledger (opened once per process: a forked child opens its own)."""
        if self._ledger is None or self._ledger[0] != os.getpid():
            ledger = Ledger.for_data_dir(
                self.data_dir, self.database_url, table_prefix=self.table_prefix
            )
            self._ledger = (os.getpid(), ledger)
        return self._ledger[1]

    def load_table(self) -> PromptTable:
        """The prompt table, its rows read as requests of this project's dialect."""
        return load_prompt_table(
            self.prompts_path, dialect=self.dialect, defaults=self.param_defaults
        )

    def publish(self) -> PublishStats:
        """Republish ``catalog/videos`` and ``catalog/submissions`` from the ledger."""
        return publish(self.ledger(), self.catalog_dir)

    def __repr__(self) -> str:
        return f"KvidProject(prompts_path={self.prompts_path!s}, data_dir={self.data_dir!s})"
