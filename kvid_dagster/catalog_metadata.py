"""What Dagster shows of the Parquet catalogs: ``kvid_catalog``'s metadata, built from a
publication, and what its latest materialization shows.

Both ``kvid_catalog``'s own materializations and the runless ones that say the status sensor or
a run republished the catalogs carry the same metadata (Dagster's row count and column schema,
the ledger revision the files show), so the UI's row count is the files' whichever published
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from dagster import AssetKey, DagsterInstance, MetadataValue, TableColumn, TableSchema

from kvid_dagster.core.project import KvidProject
from kvid_dagster.ledger import VIDEO_SCHEMA, PublishStats, VideoRow, VideoStatus
from kvid_dagster.media.preview import PreviewError, VideoPreviews, contact_sheet, video_previews
from kvid_dagster.media.storage import exists as stored

PREVIEW_ROWS = 20
CONTACT_SHEET_VIDEOS = 8  # the latest completed videos on kvid_catalog's contact sheet
CONTACT_SHEET_KEY = "contact_sheet"
LEDGER_ID_KEY = "ledger_id"
LEDGER_REVISION_KEY = "ledger_revision"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 80 else text[:79] + "…"

    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


@dataclass(frozen=True)
class ShownCatalog:
    """What the latest materialization of ``kvid_catalog`` shows (None: nothing, or an earlier
    version's metadata without it)."""

    ledger_id: str | None = None
    revision: int | None = None
    contact_sheet: MetadataValue | None = None

    def shows(self, ledger_id: str, revision: int) -> bool:
        return (self.ledger_id, self.revision) == (ledger_id, revision)


def shown_catalog(instance: DagsterInstance, key: AssetKey) -> ShownCatalog:
    """One read of the event log: ``key``'s latest materialization."""
    records = instance.fetch_materializations(key, limit=1).records
    event = records[0].asset_materialization if records else None
    if event is None:
        return ShownCatalog()
    metadata = event.metadata
    ledger_id, revision = (metadata.get(k) for k in (LEDGER_ID_KEY, LEDGER_REVISION_KEY))
    return ShownCatalog(
        str(ledger_id.value) if ledger_id is not None else None,
        int(revision.value) if revision is not None and revision.value is not None else None,
        metadata.get(CONTACT_SHEET_KEY),
    )


def catalog_metadata(
    project: KvidProject,
    stats: PublishStats,
    sheet: Mapping[str, MetadataValue],
) -> dict[str, Any]:
    """``kvid_catalog``'s metadata for a publication; ``sheet``: its contact sheet entry
    (``catalog_contact_sheet``), or none."""
    videos = stats.videos_table
    counts = videos.column("status").value_counts().to_pylist()
    preview = videos.slice(0, PREVIEW_ROWS).to_pylist()
    return {
        # Dagster's standard keys: the UI shows the row count and the columns
        "dagster/row_count": MetadataValue.int(stats.videos),
        "dagster/column_schema": MetadataValue.table_schema(catalog_column_schema()),
        "videos_path": MetadataValue.path(str(project.catalog_dir / "videos")),
        "submissions_path": MetadataValue.path(str(project.catalog_dir / "submissions")),
        "submission_events": stats.submissions,
        LEDGER_REVISION_KEY: stats.revision,
        LEDGER_ID_KEY: MetadataValue.text(project.ledger().ledger_id()),
        **{f"status_{c['values'].lower()}": c["counts"] for c in counts},
        "preview": MetadataValue.md(
            markdown_table(
                preview,
                ["partition_key", "status", "request_id", "width", "height", "num_frames", "error"],
            )
        ),
        **sheet,
    }


def catalog_contact_sheet(videos: pa.Table, log: Any) -> dict[str, MetadataValue]:
    """``kvid_catalog``'s contact sheet: the first frames of the latest completed videos whose
    files are here, newest first. One that cannot be made is a warning: the catalog is
    published all the same."""
    done = videos.filter(
        pc.and_(
            pc.equal(videos["status"], VideoStatus.COMPLETED.value),
            pc.is_valid(videos["local_path"]),
        )
    ).select(["partition_key", "local_path", "completed_at"])
    newest = done.sort_by([("completed_at", "descending")])
    candidates = newest.slice(0, 4 * CONTACT_SHEET_VIDEOS).to_pylist()
    # stop at the first few that are there: on object storage each look is a request
    latest = list(islice((r for r in candidates if stored(r["local_path"])), CONTACT_SHEET_VIDEOS))
    if not latest:
        return {}
    try:
        image = contact_sheet([r["local_path"] for r in latest])
    except PreviewError as exc:
        log.warning(f"no contact sheet: {exc}")
        return {}
    caption = ", ".join(f"`{r['partition_key']}`" for r in latest)
    # dated: a runless report of a later publication carries it on unchanged
    made = datetime.now(UTC)
    return {
        CONTACT_SHEET_KEY: MetadataValue.md(
            f"{image.markdown('latest videos')}\n\nNewest first, row by row, as of "
            f"{made:%Y-%m-%d %H:%M} UTC: {caption}"
        )
    }


def read_previews(row: VideoRow) -> VideoPreviews | PreviewError | None:
    """The kept video's previews for its materialization (``KvidTranslator.get_video_metadata``),
    or why they cannot be made; None for a video not kept. Decoded here, not in the
    translator, which only shapes metadata."""
    if not row.video.local_path:
        return None
    try:
        return video_previews(row.video.local_path)
    except PreviewError as exc:
        return exc


def catalog_column_schema() -> TableSchema:
    """``dagster/column_schema`` of the published videos table."""
    return TableSchema(
        columns=[TableColumn(f.name, str(f.type), constraints=None) for f in VIDEO_SCHEMA]
    )
