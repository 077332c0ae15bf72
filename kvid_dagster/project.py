"""``KvidProject``: where a kvid pipeline's table, catalog and videos live, and its partitions."""

from __future__ import annotations

from pathlib import Path

from dagster import DynamicPartitionsDefinition

from kvid_dagster.catalog import KvidCatalog


class KvidProject:
    """One prompt table and one data folder: the unit a set of kvid definitions is built for.

    ``<data_dir>/catalog/`` holds the Parquet catalogs, ``<data_dir>/videos/`` the downloaded
    videos; the partitions definition is named after the table so two projects can share a
    Dagster instance.
    """

    def __init__(
        self,
        prompts_path: str | Path,
        data_dir: str | Path,
        *,
        partitions_name: str = "kvid_prompts",
    ) -> None:
        self.prompts_path = Path(prompts_path).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.partitions_def = DynamicPartitionsDefinition(name=partitions_name)

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

    def catalog(self) -> KvidCatalog:
        return KvidCatalog(self.catalog_dir)

    def __repr__(self) -> str:
        return f"KvidProject(prompts_path={self.prompts_path!s}, data_dir={self.data_dir!s})"
