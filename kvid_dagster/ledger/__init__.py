"""The job ledger: every paid kvid request, in SQLite (default) or PostgreSQL.

The one place that knows storage. ``Ledger`` holds the rows, the submissions (one per claimed
attempt at a request) and their history; :func:`publish` writes the Parquet catalogs
(``<data_dir>/catalog/videos`` and ``/submissions``) from it.
"""

from kvid_dagster.ledger.publish import (
    SUBMISSION_COLUMNS,
    SUBMISSION_SCHEMA,
    VIDEO_COLUMNS,
    VIDEO_SCHEMA,
    PublishStats,
    publish,
    read_tables,
    submissions_frame,
    videos_frame,
)
from kvid_dagster.ledger.records import (
    ClaimOwner,
    InvalidEntry,
    JobChange,
    RequestRow,
    Submission,
    VideoFile,
    VideoQuality,
    VideoRow,
)
from kvid_dagster.ledger.status import SubmissionEvent, VideoStatus
from kvid_dagster.ledger.store import (
    DATABASE_FILE,
    DEFAULT_CLAIM_LEASE_SECONDS,
    DEFAULT_RULE,
    DEFAULT_TABLE_PREFIX,
    ClaimRule,
    Ledger,
    RecoveryReport,
    Refusal,
    SpendCap,
    SpendWindow,
    normalize_database_url,
    redact_url,
    refusal_for,
)
from kvid_dagster.ledger.tables import unstorable_at

__all__ = [
    "DATABASE_FILE",
    "DEFAULT_CLAIM_LEASE_SECONDS",
    "DEFAULT_RULE",
    "DEFAULT_TABLE_PREFIX",
    "SUBMISSION_COLUMNS",
    "SUBMISSION_SCHEMA",
    "VIDEO_COLUMNS",
    "VIDEO_SCHEMA",
    "ClaimOwner",
    "ClaimRule",
    "InvalidEntry",
    "JobChange",
    "Ledger",
    "PublishStats",
    "RecoveryReport",
    "Refusal",
    "RequestRow",
    "SpendCap",
    "SpendWindow",
    "Submission",
    "SubmissionEvent",
    "VideoFile",
    "VideoQuality",
    "VideoRow",
    "VideoStatus",
    "normalize_database_url",
    "publish",
    "read_tables",
    "redact_url",
    "refusal_for",
    "submissions_frame",
    "unstorable_at",
    "videos_frame",
]
