"""``KvidTranslator``: the seam for customising how kvid things appear in Dagster.

Subclass it and pass the instance to ``build_kvid_definitions`` (or the ``build_*`` factories) to
change asset keys, the group, or the metadata recorded for each video.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from dagster import AssetKey, MetadataValue

ASSET_NAMES = ("kvid_prompts", "kvid_video_jobs", "kvid_videos", "kvid_catalog")


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        return True


class KvidTranslator:
    """Maps kvid records onto Dagster asset keys and metadata."""

    def get_asset_key(self, name: str) -> AssetKey:
        """``name`` is one of :data:`ASSET_NAMES`."""
        return AssetKey([name])

    def get_group_name(self) -> str:
        return "kvid"

    def get_video_metadata(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Metadata of a finished video's materialization, from its catalog row."""
        meta: dict[str, Any] = {
            "request_id": MetadataValue.text(str(record.get("request_id") or "")),
            "status": MetadataValue.text(str(record.get("status") or "")),
            "job_kind": MetadataValue.text(str(record.get("job_kind") or "")),
            "model": MetadataValue.text(str(record.get("model") or "")),
        }
        if _present(record.get("url")):
            meta["url"] = MetadataValue.url(str(record["url"]))
        if _present(record.get("name")):
            meta["name"] = MetadataValue.text(str(record["name"]))
        if _present(record.get("size_kb")):
            meta["size_kb"] = MetadataValue.int(int(record["size_kb"]))
        submitted, completed = record.get("submitted_at"), record.get("completed_at")
        if _present(submitted) and _present(completed):
            elapsed = (pd.Timestamp(completed) - pd.Timestamp(submitted)).total_seconds()
            meta["elapsed_s"] = MetadataValue.float(round(elapsed, 3))
        if _present(record.get("local_path")):
            meta["local_path"] = MetadataValue.path(str(record["local_path"]))
            meta["sha256"] = MetadataValue.text(str(record.get("sha256") or ""))
            for name in ("width", "height", "num_frames"):
                if _present(record.get(name)):
                    meta[name] = MetadataValue.int(int(record[name]))
            for name in ("fps", "duration_s"):
                if _present(record.get(name)):
                    meta[name] = MetadataValue.float(float(record[name]))
        if _present(record.get("cost_credits")):
            meta["cost_credits"] = MetadataValue.float(float(record["cost_credits"]))
        if _present(record.get("prompt")):
            meta["prompt"] = MetadataValue.text(str(record["prompt"])[:500])
        return meta

    def get_failure_metadata(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Metadata of a job that ended without a video (FAILED, TIMED_OUT, LOST, UNCERTAIN)."""
        meta = {
            "status": MetadataValue.text(str(record.get("status") or "")),
            "request_id": MetadataValue.text(str(record.get("request_id") or "")),
            "reason": MetadataValue.text(str(record.get("error") or "")[:2000]),
        }
        if _present(record.get("prompt")):
            meta["prompt"] = MetadataValue.text(str(record["prompt"])[:500])
        return meta
