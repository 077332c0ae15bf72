"""``KvidProject``: where a kvid pipeline's table, ledger, catalogs and videos live."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DynamicPartitionsDefinition

from kvid_dagster.client import ApiDialect, dialect_for
from kvid_dagster.ledger import Ledger, PublishStats, publish
from kvid_dagster.prompts import PromptTable, load_prompt_table

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
    it, ``<data_dir>/videos/`` the downloaded videos. The partitions definition is named after
    ``partitions_name`` so two projects can share a Dagster instance. ``dialect`` (else
    ``$KVID_API_DIALECT``, else ``video``) is the API dialect the table's rows are requests of.
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
    ) -> None:
        self.prompts_path = Path(prompts_path).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.database_url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        self.table_prefix = table_prefix
        self.dialect = dialect_from_env(dialect)
        self.partitions_def = DynamicPartitionsDefinition(name=partitions_name)
        self._ledger: tuple[int, Ledger] | None = None

    @property
    def partitions_name(self) -> str:
        assert self.partitions_def.name is not None
        return self.partitions_def.name

    @property
    def catalog_dir(self) -> Path:
        return self.data_dir / "catalog"

    @property
    def videos_dir(self) -> Path:
        return self.data_dir / "videos"

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
        return load_prompt_table(self.prompts_path, dialect=self.dialect)

    def publish(self) -> PublishStats:
        """Republish ``catalog/videos`` and ``catalog/submissions`` from the ledger."""
        return publish(self.ledger(), self.catalog_dir)

    def __repr__(self) -> str:
        return f"KvidProject(prompts_path={self.prompts_path!s}, data_dir={self.data_dir!s})"
