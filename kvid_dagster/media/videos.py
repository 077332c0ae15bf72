"""``KvidVideo``: a finished video as downstream code takes it, read from the ledger.

No Dagster here (the IO manager in :mod:`kvid_dagster.io_manager` hands these records to
downstream assets): a record is built from a ledger ``VideoRow`` whose job COMPLETED and whose
file was kept, and opens that file wherever storage put it (a local path or an fsspec URL such
as ``s3://bucket/kvid/videos/x.mp4``), so no user code reads the catalog or builds a path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import BinaryIO, cast

import pandas as pd

from kvid_dagster.ledger import Ledger, VideoFile, VideoRow, VideoStatus
from kvid_dagster.media.storage import storage_path

#: what the status poller learnt of the kept file; a record needs every one of them
_FILE_FACTS = ("sha256", "width", "height", "fps", "num_frames", "duration_s")


class VideoUnavailable(LookupError):
    """A partition has no video to hand out: its status and the reason say why."""

    def __init__(self, partition_key: str, status: VideoStatus | None, reason: str) -> None:
        shown = status.value if status is not None else "no ledger row"
        super().__init__(f"partition {partition_key!r} has no video ({shown}): {reason}")
        self.partition_key = partition_key
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class KvidVideo:
    """One COMPLETED video: the stored file, what it really is, and the row it was made for.

    ``uri`` is where the file is stored (a local path or an fsspec URL); ``open()`` reads it
    from there (``av.open(video.open())`` decodes it). ``width``, ``height``, ``fps``,
    ``num_frames`` and ``duration_s`` are the file's own (probed when it was fetched);
    ``size_kb`` is the service's figure (None when it gave none); ``user_columns`` are the
    table's other columns of the row (never sent to the service).
    """

    partition_key: str
    request_id: str
    uri: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration_s: float
    sha256: str
    size_kb: int | None
    prompt: str
    model: str
    job_kind: str
    # a dict is not hashable: the record hashes by its other fields
    user_columns: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_row(cls, row: VideoRow) -> KvidVideo:
        """The record of a COMPLETED row whose file was kept; else :class:`VideoUnavailable`."""
        if row.status is not VideoStatus.COMPLETED:
            raise VideoUnavailable(row.partition_key, row.status, _why_not_completed(row))
        video: VideoFile = row.video
        if not video.local_path:
            raise VideoUnavailable(
                row.partition_key,
                row.status,
                "its video was not kept (the status sensor's download=False); the service's "
                f"result URL was {video.url or 'not given'}",
            )
        facts = {name: getattr(video, name) for name in _FILE_FACTS}
        facts["request_id"] = row.request_id
        missing = [name for name, value in facts.items() if value is None]
        if missing:  # a row imported from a 0.1 catalog may lack them
            raise VideoUnavailable(
                row.partition_key, row.status, f"the ledger lacks its video's {', '.join(missing)}"
            )
        return cls(
            partition_key=row.partition_key,
            uri=video.local_path,
            size_kb=video.size_kb,
            prompt=row.prompt or "",
            model=row.model or "",
            job_kind=row.job_kind or "",
            user_columns=row.user_columns,
            **facts,
        )

    def open(self) -> BinaryIO:
        """The stored file, open for reading and seekable, wherever it is (local or remote
        through fsspec); close it (``with video.open() as f:``)."""
        return cast(BinaryIO, storage_path(self.uri).open("rb"))


#: the columns of :func:`videos_table`, in the record's order
VIDEO_TABLE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(KvidVideo))


def _why_not_completed(row: VideoRow) -> str:
    if row.error:
        return row.error
    if row.status is VideoStatus.PENDING:
        return "no job was submitted for its request yet"
    if not row.status.is_terminal:
        return "its job has not finished yet"
    return "no reason was recorded"


def load_video(ledger: Ledger, partition_key: str) -> KvidVideo:
    """The partition's video; :class:`VideoUnavailable` (naming its status and why) when it
    has none."""
    row = ledger.row(partition_key)
    if row is None:
        raise VideoUnavailable(partition_key, None, "it is not a row of the prompt table")
    return KvidVideo.from_row(row)


def completed_videos(ledger: Ledger, partition_keys: Sequence[str]) -> dict[str, KvidVideo]:
    """Every COMPLETED video among ``partition_keys``, in their order (one query: the
    ledger's COMPLETED rows). The others (failed, invalid, pending, running) are left out; a
    COMPLETED one whose file was not kept raises :class:`VideoUnavailable`."""
    wanted = set(partition_keys)
    done = {
        row.partition_key: row
        for row in ledger.rows_with_job_status(VideoStatus.COMPLETED)
        if row.partition_key in wanted
    }
    return {key: KvidVideo.from_row(done[key]) for key in partition_keys if key in done}


def videos_table(videos: Iterable[KvidVideo]) -> pd.DataFrame:
    """One row per video, one column per record field (``user_columns`` holds each row's
    dict of the table's own columns), in the order given."""
    return pd.DataFrame([asdict(v) for v in videos], columns=list(VIDEO_TABLE_COLUMNS))
