"""The Parquet catalog: the durable record of every kvid video job.

Layout of ``<data_dir>/catalog/`` (every internal name starts with "." or "_", which pyarrow,
Spark and DuckDB-style discovery skip)::

    videos/data.parquet        published: one row per partition_key, VIDEO_SCHEMA
    submissions/data.parquet   published: one row per submission event, SUBMISSION_SCHEMA
    _log/videos/*.parquet      unpublished partial updates, {seq:016d}-{pid}-{uuid8}.parquet
    _log/submissions/*.parquet unpublished submission events
    _tmp/                      temp files (writes in progress, or left by killed writers)
    _prev/                     the previous published snapshots (fallback if one is damaged)
    _quarantine/               damaged files moved aside, with a warning
    .lock                      exclusive flock for sequence allocation; holds the seq counter
    .compact.lock              serialises compactors

Protocol. A writer encodes its part into ``_tmp/`` and fsyncs it, then under ``.lock`` bumps
the counter and renames the part into the log: a final name always means a complete file, and
the log order is the sequence order. A published file is replaced with ``os.replace`` and
records the highest sequence number it includes (``kvid.max_seq`` in the Parquet key-value
metadata); readers take the snapshot plus the log parts above that number and never lock.
``compact()`` publishes first and deletes the folded parts after, so a crash in between only
leaves parts that every reader already skips.

``pandas.read_parquet("<data_dir>/catalog/videos")`` sees what the last compaction published;
``KvidCatalog.latest()`` also folds in the log.
"""

from kvid_dagster.catalog.core import TABLES, CompactionStats, KvidCatalog
from kvid_dagster.catalog.schema import (
    KNOWN_STATUSES,
    MAX_SEQ_KEY,
    SUBMISSION_COLUMNS,
    SUBMISSION_EVENTS,
    SUBMISSION_SCHEMA,
    TERMINAL_STATUSES,
    VIDEO_COLUMNS,
    VIDEO_SCHEMA,
)
from kvid_dagster.catalog.storage import CatalogWarning

__all__ = [
    "KNOWN_STATUSES",
    "MAX_SEQ_KEY",
    "SUBMISSION_COLUMNS",
    "SUBMISSION_EVENTS",
    "SUBMISSION_SCHEMA",
    "TABLES",
    "TERMINAL_STATUSES",
    "VIDEO_COLUMNS",
    "VIDEO_SCHEMA",
    "CatalogWarning",
    "CompactionStats",
    "KvidCatalog",
]
