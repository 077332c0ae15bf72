"""``KvidTranslator``: the seam for customising how kvid things appear in Dagster.

Subclass it and pass the instance to ``build_kvid_definitions`` (or the ``build_*`` factories) to
change asset keys, the group, or the metadata recorded for each video.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetKey, MetadataValue

from kvid_dagster.ledger import VideoRow
from kvid_dagster.preview import PreviewError, video_preview

ASSET_NAMES = ("kvid_prompts", "kvid_video_jobs", "kvid_videos", "kvid_catalog")
#: Dagster's standard key for where an asset is stored (``UriMetadataSet``)
URI_KEY = "dagster/uri"
PREVIEW_KEY = "preview"


class KvidTranslator:
    """Maps kvid ledger rows onto Dagster asset keys and metadata."""

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
