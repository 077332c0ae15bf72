"""``KvidProject``: where a kvid pipeline's prompt rows, ledger, catalogs and videos live."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from kvid_dagster.client import ApiDialect, dialect_for
from kvid_dagster.core.prompts import PromptTable, checked_param_defaults, load_prompt_table
from kvid_dagster.core.sources import (
    PromptSource,
    PromptSourceUnavailable,
    prompt_source,
)
from kvid_dagster.ledger import (
    DATABASE_FILE,
    DEFAULT_TABLE_PREFIX,
    Ledger,
    PublishStats,
    publish,
)
from kvid_dagster.media.storage import Storage, StoragePath

if TYPE_CHECKING:
    from dagster import DynamicPartitionsDefinition


class AssetKeyLike(Protocol):
    """What core needs of a Dagster ``AssetKey``: its path (so core need not import Dagster)."""

    @property
    def path(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class UpstreamAsset:
    """The upstream asset whose value is the table, by its key's path: the Dagster layer
    turns it into an ``AssetKey`` (``AssetKey(upstream.path)``)."""

    path: tuple[str, ...]

    def describe(self) -> str:
        """The key as Dagster shows it (``AssetKey.to_user_string``)."""
        return "/".join(self.path)


def upstream_asset(prompts: object) -> UpstreamAsset | None:
    """An ``AssetKey`` (any object with a key's ``.path``) as core's record, None for a table
    or its location. Taken where users pass the key, so ``KvidProject(AssetKey(...))`` keeps
    working and every layer above core gets the same Dagster-free record."""
    if isinstance(prompts, str | os.PathLike | PromptSource | pd.DataFrame):
        return None  # a FilePromptSource, a frame's "path" column: a ``.path`` that is no key
    path = getattr(prompts, "path", None)
    return None if path is None else UpstreamAsset(tuple(path))


#: where a project's prompt rows come from: a local path or an fsspec URL, a ``PromptSource``
#: (a database table or query, ...), or the ``AssetKey`` of an upstream asset whose value is
#: the table (a pandas DataFrame, or a path or URL to read)
PromptsSetting = str | os.PathLike[str] | PromptSource | AssetKeyLike
#: loads an asset's latest value through its own IO manager; each Dagster context (a run, a
#: sensor, the headless runner) has its own way to, so it is handed in where the table is read
UpstreamLoader = Callable[[UpstreamAsset], Any]

DATABASE_URL_ENV = "KVID_DATABASE_URL"
DIALECT_ENV = "KVID_API_DIALECT"
#: the prompt table and data folder of ``definitions_from_env`` (``kvid-dagster dev`` sets them)
PROMPTS_ENV = "KVID_PROMPTS"
DATA_DIR_ENV = "KVID_DATA_DIR"


def dialect_from_env(dialect: ApiDialect | str | None = None) -> ApiDialect:
    """``dialect``, else ``$KVID_API_DIALECT``, else the video dialect (an unknown name is a
    ``KvidValidationError`` naming the allowed ones)."""
    return dialect_for(dialect or os.environ.get(DIALECT_ENV, "").strip() or ApiDialect.VIDEO).api


class ProjectData:
    """Where a project's ledger, catalogs and videos live: what a command that never reads
    the prompt table (``resolve``, ``refetch``) needs, with the same settings as the project.

    The ledger is ``database_url`` (else ``$KVID_DATABASE_URL``, else the SQLite file
    ``<data_dir>/kvid.db``); ``<data_dir>/catalog/`` holds the Parquet catalogs published from
    it, ``<data_dir>/videos/`` the downloaded videos; ``storage_url`` (else
    ``$KVID_STORAGE_URL``: a local path or an fsspec URL such as ``s3://bucket/prefix``) moves
    ``catalog/`` and ``videos/`` there (see :mod:`kvid_dagster.media.storage`; the ledger stays in
    its database).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        database_url: str | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        storage_url: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.database_url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        self.table_prefix = table_prefix
        self.storage = Storage.from_setting(storage_url, self.data_dir)
        self._ledger: tuple[int, Ledger] | None = None

    @property
    def catalog_dir(self) -> StoragePath:
        return self.storage.catalog_dir

    @property
    def videos_dir(self) -> StoragePath:
        return self.storage.videos_dir

    def has_ledger(self) -> bool:
        """Whether there is a ledger to read without creating one (a database is one)."""
        return self.database_url is not None or (self.data_dir / DATABASE_FILE).exists()

    def ledger(self) -> Ledger:
        """This process's ledger (opened once per process: a forked child opens its own)."""
        if self._ledger is None or self._ledger[0] != os.getpid():
            ledger = Ledger.for_data_dir(
                self.data_dir, self.database_url, table_prefix=self.table_prefix
            )
            self._ledger = (os.getpid(), ledger)
        return self._ledger[1]

    def publish(self) -> PublishStats:
        """Republish ``catalog/videos`` and ``catalog/submissions`` from the ledger."""
        return publish(self.ledger(), self.catalog_dir)


class KvidProject(ProjectData):
    """One prompt table and one data folder: the unit a set of kvid definitions is built for.

    ``prompts`` is where the rows come from (see ``PromptsSetting``): ``"data/prompts.csv"``,
    ``"s3://bucket/prompts.parquet"``, ``SqlPromptSource(url, table="prompts")`` or
    ``AssetKey("daily_prompts")``. The same rows give the same partitions and requests
    whichever source holds them, so moving a table from one to another pays nothing again.

    ``data_dir``, ``database_url``, ``table_prefix`` and ``storage_url`` place the ledger,
    catalogs and videos (see ``ProjectData``). The partitions definition is named after
    ``partitions_name`` so two projects can share a Dagster instance. ``dialect`` (else
    ``$KVID_API_DIALECT``, else ``video``) is the API dialect the table's rows are requests of.
    ``param_defaults`` (``{"resolution": "720p", "model": "v2"}``) fill each row's empty kvid
    cells: a row's request, and so its hash, includes them, so changing one is a new request.
    """

    def __init__(
        self,
        prompts: PromptsSetting,
        data_dir: str | Path,
        *,
        database_url: str | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        partitions_name: str = "kvid_prompts",
        dialect: ApiDialect | str | None = None,
        param_defaults: Mapping[str, Any] | None = None,
        storage_url: str | None = None,
    ) -> None:
        self.upstream = upstream_asset(prompts)
        self._source = None if self.upstream is not None else prompt_source(prompts)
        self.dialect = dialect_from_env(dialect)
        # a bad default is refused here, before any table is read
        self.param_defaults = checked_param_defaults(param_defaults or {})
        self.partitions_name = partitions_name
        super().__init__(
            data_dir, database_url=database_url, table_prefix=table_prefix, storage_url=storage_url
        )

    @property
    def partitions_def(self) -> DynamicPartitionsDefinition:
        """The Dagster partitions of the rows, for ``@asset(partitions_def=...)`` in users'
        code: built by the Dagster layer, which only a Dagster user reaches."""
        from kvid_dagster.translator import partitions_def

        return partitions_def(self)

    @property
    def prompts_name(self) -> str:
        """Where the rows come from, in one short line (descriptions, logs, messages)."""
        if self.upstream is not None:
            return f"asset {self.upstream.describe()}"
        assert self._source is not None
        return self._source.describe()

    def source(self, load_upstream: UpstreamLoader | None = None) -> PromptSource:
        """The source of the rows; an upstream asset's is its latest value, which only
        ``load_upstream`` (a Dagster context's loader) can read. Raises
        ``PromptSourceUnavailable`` when it cannot be loaded (never materialized, its storage
        unreachable)."""
        if self._source is not None:
            return self._source
        key = self.upstream
        assert key is not None
        if load_upstream is None:
            raise PromptSourceUnavailable(
                f"the prompt rows are the value of asset {key.describe()}: they are read "
                "in a Dagster run or sensor, which can load it"
            )
        try:
            value = load_upstream(key)
        except PromptSourceUnavailable:
            raise
        except Exception as exc:  # whatever its IO manager raises: the table is not there now
            raise PromptSourceUnavailable(
                f"asset {key.describe()} could not be loaded through its IO manager "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return upstream_source(key, value)

    def load_table(self, load_upstream: UpstreamLoader | None = None) -> PromptTable:
        """The prompt table, its rows read as requests of this project's dialect."""
        return load_prompt_table(
            self.source(load_upstream), dialect=self.dialect, defaults=self.param_defaults
        )

    def __repr__(self) -> str:
        return f"KvidProject(prompts={self.prompts_name!r}, data_dir={self.data_dir!s})"


def upstream_source(key: UpstreamAsset, value: Any) -> PromptSource:
    """The rows an upstream asset's value holds: a DataFrame, or a path or URL to a table."""
    if isinstance(value, pd.DataFrame | str | os.PathLike | PromptSource):
        return prompt_source(value)
    raise PromptSourceUnavailable(
        f"asset {key.describe()} gave a {type(value).__name__}: the kvid prompt rows are "
        "a pandas DataFrame, or a path or URL to a CSV or Parquet table"
    )
