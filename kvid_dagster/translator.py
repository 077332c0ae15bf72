"""``KvidTranslator``: the seam for customising how kvid things appear in Dagster.

Subclass it and pass the instance to ``build_kvid_definitions`` (or the ``build_*`` factories) to
change the assets' specs (``get_asset_spec``, as ``DagsterFivetranTranslator`` does: key, group,
kinds, description, metadata, tags) or the metadata recorded for each video.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dagster import AssetKey, AssetSpec, MetadataValue

from kvid_dagster.ledger import VideoRow
from kvid_dagster.preview import PreviewError, video_preview
from kvid_dagster.project import KvidProject

#: Dagster's standard key for where an asset is stored (``UriMetadataSet``)
URI_KEY = "dagster/uri"
PREVIEW_KEY = "preview"


class KvidAsset(StrEnum):
    """The kvid assets of a project; the value is the default asset key."""

    PROMPTS = "kvid_prompts"
    VIDEO_JOBS = "kvid_video_jobs"
    VIDEOS = "kvid_videos"
    CATALOG = "kvid_catalog"


ASSET_NAMES = tuple(asset.value for asset in KvidAsset)

_KINDS: dict[KvidAsset, frozenset[str]] = {
    KvidAsset.PROMPTS: frozenset({"kvid"}),  # and its file's format, where it is a file
    KvidAsset.VIDEO_JOBS: frozenset({"kvid"}),
    KvidAsset.VIDEOS: frozenset({"kvid", "mp4"}),
    KvidAsset.CATALOG: frozenset({"parquet"}),
}


@dataclass(frozen=True)
class KvidAssetProps:
    """What a spec is translated from: which kvid asset, of which project."""

    asset: KvidAsset
    project: KvidProject


class KvidTranslator:
    """Maps the kvid assets onto Dagster asset specs, and ledger rows onto metadata."""

    def get_asset_spec(self, props: KvidAssetProps) -> AssetSpec:
        """The spec the builders take key, group, kinds, description, metadata and tags from
        (the partitioning and the dependencies are kvid's own). The default key and group are
        ``get_asset_key`` and ``get_group_name``."""
        project = props.project
        descriptions = {
            KvidAsset.PROMPTS: f"The prompt rows of {project.prompts_name}: validated rows "
            "become partitions; invalid rows are reported, never sent.",
            KvidAsset.VIDEO_JOBS: "One kvid job per prompt row, submitted once per exact request "
            "and recorded in the catalog before the run returns. A backfill of any size is one "
            "run.",
            KvidAsset.VIDEOS: "The finished videos: materialized by the kvid status sensor when "
            "a job completes (runless events), with the file's own width, height, fps and "
            "frames.",
            KvidAsset.CATALOG: "Republishes <data_dir>/catalog/videos and /submissions from the "
            "ledger as Parquet (pandas, DuckDB and Spark read them directly).",
        }
        where: dict[KvidAsset, object] = {
            KvidAsset.VIDEOS: project.videos_dir,
            KvidAsset.CATALOG: project.catalog_dir,
        }
        # a table in a file has a place; a database table or an asset's value has not
        table_uri = None if project.upstream is not None else project.source().uri
        if table_uri is not None:
            where[KvidAsset.PROMPTS] = table_uri
        kinds = set(_KINDS[props.asset])
        if props.asset is KvidAsset.PROMPTS and table_uri is not None:
            kinds.add("parquet" if table_uri.lower().endswith((".parquet", ".pq")) else "csv")
        return AssetSpec(
            key=self.get_asset_key(props.asset.value),
            group_name=self.get_group_name(),
            kinds=kinds,
            description=descriptions[props.asset],
            metadata=(
                {URI_KEY: MetadataValue.path(str(where[props.asset]))}
                if props.asset in where
                else {}
            ),
        )

    def get_asset_key(self, name: str) -> AssetKey:
        """``name`` is one of :data:`ASSET_NAMES`."""
        return AssetKey([name])

    def get_group_name(self) -> str:
        return "kvid"

    def get_video_metadata(self, row: VideoRow) -> dict[str, Any]:
        """Metadata of a finished video's materialization."""
        video = row.video
        meta: dict[str, Any] = {
            "request_id": MetadataValue.text(row.request_id or ""),
            "status": MetadataValue.text(row.status.value),
            "job_kind": MetadataValue.text(row.job_kind or ""),
            "model": MetadataValue.text(row.model or ""),
        }
        if video.url:
            meta["url"] = MetadataValue.url(video.url)
            meta[URI_KEY] = MetadataValue.url(video.url)
        if video.name:
            meta["name"] = MetadataValue.text(video.name)
        if video.size_kb is not None:
            meta["size_kb"] = MetadataValue.int(int(video.size_kb))
        sub = row.submission
        if sub is not None and sub.submitted_at and sub.completed_at:
            elapsed = (sub.completed_at - sub.submitted_at).total_seconds()
            meta["elapsed_s"] = MetadataValue.float(round(elapsed, 3))
        if video.local_path:
            meta["local_path"] = MetadataValue.path(video.local_path)
            meta[URI_KEY] = MetadataValue.path(video.local_path)  # outlives the result URL
            meta["sha256"] = MetadataValue.text(video.sha256 or "")
            for name in ("width", "height", "num_frames"):
                if (value := getattr(video, name)) is not None:
                    meta[name] = MetadataValue.int(int(value))
            for name in ("fps", "duration_s"):
                if (value := getattr(video, name)) is not None:
                    meta[name] = MetadataValue.float(float(value))
            meta |= self.get_preview_metadata(row)
        if row.cost_credits is not None:
            meta["cost_credits"] = MetadataValue.float(float(row.cost_credits))
        if row.prompt:
            meta["prompt"] = MetadataValue.text(row.prompt[:500])
        return meta | self.get_user_column_metadata(row)

    def get_preview_metadata(self, row: VideoRow) -> dict[str, Any]:
        """An animated WebP of the downloaded clip, which the UI shows inline; override it to
        return ``{}`` to keep previews out of the event log. A video that cannot be read
        gets the reason instead: the materialization is reported all the same."""
        if not row.video.local_path:
            return {}
        try:
            image = video_preview(row.video.local_path)
        except PreviewError as exc:
            return {"preview_error": MetadataValue.text(str(exc))}
        return {PREVIEW_KEY: MetadataValue.md(image.markdown(f"preview of {row.partition_key}"))}

    def get_user_column_metadata(self, row: VideoRow) -> dict[str, Any]:
        """The table's own columns of the row (campaign, owner, ...): shown, never sent."""
        columns = row.user_columns
        return {"user_columns": MetadataValue.json(columns)} if columns else {}

    def get_failure_metadata(self, row: VideoRow) -> dict[str, Any]:
        """Metadata of a job that ended without a video (FAILED, TIMED_OUT, LOST, UNCERTAIN)."""
        meta = {
            "status": MetadataValue.text(row.status.value),
            "request_id": MetadataValue.text(row.request_id or ""),
            "reason": MetadataValue.text((row.error or "")[:2000]),
        }
        if row.prompt:
            meta["prompt"] = MetadataValue.text(row.prompt[:500])
        return meta | self.get_user_column_metadata(row)


def asset_specs(translator: KvidTranslator, project: KvidProject) -> dict[KvidAsset, AssetSpec]:
    """Every kvid asset's spec: the assets, the sensors, the jobs and the schedule all read keys
    from here, so an overridden ``get_asset_spec`` changes them together."""
    return {asset: translator.get_asset_spec(KvidAssetProps(asset, project)) for asset in KvidAsset}
