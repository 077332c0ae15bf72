"""``KvidTranslator``: the seam for customising how kvid things appear in Dagster.

Subclass it and pass the instance to ``build_kvid_definitions`` (or the ``build_*`` factories) to
change the assets' specs (``get_asset_spec``, as ``DagsterFivetranTranslator`` does: key, group,
kinds, description, metadata, tags) or the metadata recorded for each video.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dagster import AssetKey, AssetSpec, DynamicPartitionsDefinition, MetadataValue

from kvid_dagster.core.project import KvidProject
from kvid_dagster.ledger import VideoRow
from kvid_dagster.media.preview import PreviewError, VideoPreviews

#: Dagster's standard key for where an asset is stored (``UriMetadataSet``)
URI_KEY = "dagster/uri"
POSTER_KEY = "poster"
PREVIEW_KEY = "preview"
#: the previews a video's materialization carries (its check result does not repeat them)
PREVIEW_KEYS = (POSTER_KEY, PREVIEW_KEY)
SUBMITTING_RUN_KEY = "submitting_run"


class KvidAsset(StrEnum):
    """The kvid assets of a project; the value is the default asset key."""

    PROMPTS = "kvid_prompts"
    VIDEO_JOBS = "kvid_video_jobs"
    VIDEOS = "kvid_videos"
    CATALOG = "kvid_catalog"


ASSET_NAMES = tuple(asset.value for asset in KvidAsset)


def partitions_def(project: KvidProject) -> DynamicPartitionsDefinition:
    """The project's partitions, one a row: named ``project.partitions_name`` (equal by name,
    so each call gives the same definition)."""
    return DynamicPartitionsDefinition(name=project.partitions_name)


def upstream_key(project: KvidProject) -> AssetKey | None:
    """The key of the asset whose value is the project's table; None for a table elsewhere."""
    return None if project.upstream is None else AssetKey(project.upstream.path)


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
            "and recorded in the catalog before the run returns. A backfill is one run per "
            "unbroken stretch of the selected partitions, in the order they were added: all of "
            "them, or a range, is one run; a selection with gaps, one run per stretch. "
            "Partitions that have their job pay nothing, so select a whole range.",
            KvidAsset.VIDEOS: "The finished videos: materialized by the kvid status sensor when "
            "a job completes (runless events: submitting_run names the run that sent it), "
            "with a poster, an animated preview and the file's own width, height, fps and "
            "frames.",
            KvidAsset.CATALOG: "Republishes <data_dir>/catalog/videos and /submissions from the "
            "ledger as Parquet (pandas, DuckDB and Spark read them directly). The runs and the "
            "status sensor publish them after each change too, with a runless materialization "
            "of this asset.",
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
            # text, as Dagster's UriMetadataSet makes it: the UI's "Storage" shows only a text
            # or URL value (a path value came out blank)
            metadata=(
                {URI_KEY: MetadataValue.text(str(where[props.asset]))}
                if props.asset in where
                else {}
            ),
        )

    def get_asset_key(self, name: str) -> AssetKey:
        """``name`` is one of :data:`ASSET_NAMES`."""
        return AssetKey([name])

    def get_group_name(self) -> str:
        return "kvid"

    def get_video_metadata(
        self, row: VideoRow, previews: VideoPreviews | PreviewError | None = None
    ) -> dict[str, Any]:
        """Metadata of a finished video's materialization, in the order the UI lists it: the
        poster first (shown in place), then the animation, what was asked and by which run,
        where the video is kept, and the file's own figures. ``previews`` are the kept video's,
        read by the caller (``catalog_metadata.read_previews``; None: none are shown): the
        translator itself reads no file."""
        video = row.video
        meta: dict[str, Any] = {}
        if video.local_path:
            meta |= self.get_preview_metadata(row, previews)
        meta |= self._request_metadata(row)
        if video.local_path:  # the kept copy outlives the service's URL
            meta[URI_KEY] = MetadataValue.text(video.local_path)
        meta |= {
            "status": MetadataValue.text(row.status.value),
            "request_id": MetadataValue.text(row.request_id or ""),
            "job_kind": MetadataValue.text(row.job_kind or ""),
            "model": MetadataValue.text(row.model or ""),
        }
        for name in ("width", "height", "num_frames"):
            if (value := getattr(video, name)) is not None:
                meta[name] = MetadataValue.int(int(value))
        for name in ("fps", "duration_s"):
            if (value := getattr(video, name)) is not None:
                meta[name] = MetadataValue.float(float(value))
        if video.size_kb is not None:
            meta["size_kb"] = MetadataValue.int(int(video.size_kb))
        if video.sha256:
            meta["sha256"] = MetadataValue.text(video.sha256)
        sub = row.submission
        if sub is not None and sub.submitted_at and sub.completed_at:
            elapsed = (sub.completed_at - sub.submitted_at).total_seconds()
            meta["elapsed_s"] = MetadataValue.float(round(elapsed, 3))
        if row.cost_credits is not None:
            meta["cost_credits"] = MetadataValue.float(float(row.cost_credits))
        if video.url:  # the service's link expires (or was an emulator's port): text, dated
            meta["url"] = MetadataValue.text(video.url)
            if sub is not None and sub.completed_at is not None:
                meta["url_fetched_at"] = MetadataValue.timestamp(sub.completed_at)
        if video.name:
            meta["name"] = MetadataValue.text(video.name)
        return meta | self.get_user_column_metadata(row)

    def get_preview_metadata(
        self, row: VideoRow, previews: VideoPreviews | PreviewError | None
    ) -> dict[str, Any]:
        """The clip's poster, a still small enough for the UI to show in place, and its
        animated WebP, which the UI shows behind "[Show Markdown]"; override it to return
        ``{}`` to keep previews out of the event log. A video that could not be read gets the
        reason instead: the materialization is reported all the same."""
        if previews is None:
            return {}
        if isinstance(previews, PreviewError):
            return {"preview_error": MetadataValue.text(str(previews))}
        return {
            POSTER_KEY: MetadataValue.md(previews.poster_markdown()),
            PREVIEW_KEY: MetadataValue.md(
                previews.animation.markdown(f"preview of {row.partition_key}")
            ),
        }

    def get_user_column_metadata(self, row: VideoRow) -> dict[str, Any]:
        """The table's own columns of the row (campaign, owner, ...): shown, never sent."""
        columns = row.user_columns
        return {"user_columns": MetadataValue.json(columns)} if columns else {}

    def get_failure_metadata(self, row: VideoRow) -> dict[str, Any]:
        """Metadata of a job that ended without a video (FAILED, TIMED_OUT, LOST, UNCERTAIN)."""
        meta = {
            "status": MetadataValue.text(row.status.value),
            "reason": MetadataValue.text((row.error or "")[:2000]),
            **self._request_metadata(row),
            "request_id": MetadataValue.text(row.request_id or ""),
        }
        return meta | self.get_user_column_metadata(row)

    def _request_metadata(self, row: VideoRow) -> dict[str, Any]:
        """What was asked, and the run that submitted it: a video is recorded by the status
        sensor, in no run, so the UI's own "Run" says None."""
        meta: dict[str, Any] = {}
        if row.prompt:
            meta["prompt"] = MetadataValue.text(row.prompt[:500])
        owner = row.submission.owner if row.submission is not None else None
        if owner is not None and owner.run_id:
            meta[SUBMITTING_RUN_KEY] = MetadataValue.dagster_run(owner.run_id)
        return meta


#: every kvid asset's spec, by asset
KvidSpecs = Mapping[KvidAsset, AssetSpec]


def asset_specs(translator: KvidTranslator, project: KvidProject) -> dict[KvidAsset, AssetSpec]:
    """Every kvid asset's spec: computed once per definitions build and handed to the assets,
    the sensors, the jobs and the schedule, so an overridden ``get_asset_spec`` changes them
    together (and runs once per asset)."""
    return {asset: translator.get_asset_spec(KvidAssetProps(asset, project)) for asset in KvidAsset}
