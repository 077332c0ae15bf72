"""Table schemas, status vocabulary and validation of incoming rows.

The published Parquet files carry pandas metadata so that ``pandas.read_parquet`` restores the
intended dtypes (nullable ``Int32``/``Int64`` rather than ``float64`` when a column has nulls);
DuckDB and Spark read the plain Parquet types and ignore it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")

#: The snapshot records the highest log sequence number it includes under this metadata key.
MAX_SEQ_KEY = b"kvid.max_seq"
TABLE_KEY = b"kvid.table"
FORMAT_KEY = b"kvid.format"
FORMAT_VERSION = b"1"

#: Column of a videos log part listing the fields an update explicitly set (None = clear).
SET_COLUMN = "_set"

_VIDEO_FIELDS: list[tuple[str, pa.DataType]] = [
    ("partition_key", pa.string()),
    ("prompt", pa.string()),
    ("job_kind", pa.string()),
    ("model", pa.string()),
    ("request_hash", pa.string()),
    ("params_json", pa.string()),
    ("request_id", pa.string()),
    ("status", pa.string()),
    ("progress", pa.int32()),
    ("url", pa.string()),
    ("name", pa.string()),
    ("size_kb", pa.int64()),
    ("local_path", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("fps", pa.float64()),
    ("num_frames", pa.int32()),
    ("duration_s", pa.float64()),
    ("error", pa.string()),
    ("attempts", pa.int32()),
    ("cost_credits", pa.float64()),
    ("submitted_at", _TS),
    ("completed_at", _TS),
    ("updated_at", _TS),
]

_SUBMISSION_FIELDS: list[tuple[str, pa.DataType]] = [
    ("event_id", pa.string()),
    ("partition_key", pa.string()),
    ("request_hash", pa.string()),
    ("job_kind", pa.string()),
    ("model", pa.string()),
    ("params_json", pa.string()),
    ("request_id", pa.string()),
    ("event", pa.string()),
    ("attempt", pa.int32()),
    ("cost_credits", pa.float64()),
    ("error", pa.string()),
    ("recorded_at", _TS),
]

# pandas dtype for each Arrow type: nullable ints keep their width whatever the nulls.
_PANDAS_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "str",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float64(): "float64",
    _TS: "datetime64[us, UTC]",
}


def _schema(fields: list[tuple[str, pa.DataType]], required: Iterable[str]) -> pa.Schema:
    empty = pd.DataFrame({n: pd.Series([], dtype=_PANDAS_DTYPES[t]) for n, t in fields})
    pandas_meta = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    req = set(required)
    return pa.schema(
        [pa.field(n, t, nullable=n not in req) for n, t in fields], metadata=pandas_meta
    )


#: The ``videos`` table: one row per prompt row (partition_key) with its latest state.
VIDEO_SCHEMA: pa.Schema = _schema(_VIDEO_FIELDS, required=["partition_key"])
VIDEO_COLUMNS: tuple[str, ...] = tuple(VIDEO_SCHEMA.names)

#: The ``submissions`` table: one row per submission event (the money and audit trail).
SUBMISSION_SCHEMA: pa.Schema = _schema(
    _SUBMISSION_FIELDS, required=["event_id", "partition_key", "event", "recorded_at"]
)
SUBMISSION_COLUMNS: tuple[str, ...] = tuple(SUBMISSION_SCHEMA.names)

#: Videos log parts: every video column (all nullable) plus the list of explicitly set fields.
VIDEO_PART_SCHEMA: pa.Schema = pa.schema(
    [VIDEO_SCHEMA.field("partition_key")]
    + [VIDEO_SCHEMA.field(n).with_nullable(True) for n in VIDEO_COLUMNS[1:]]
    + [pa.field(SET_COLUMN, pa.list_(pa.string()), nullable=False)]
)

#: A row in one of these states needs no more polling (UNCERTAIN needs a human or a resolver).
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"COMPLETED", "FAILED", "INVALID", "TIMED_OUT", "LOST", "UNCERTAIN"}
)
#: Statuses the integration itself writes; the service's running statuses (IN_QUEUE,
#: PROCESSING, ...) are stored verbatim, so ``status`` is not restricted to this list.
#: FETCHING: the service says COMPLETED but the result or the video could not be fetched yet
#: (retried on every tick until the job deadline).
KNOWN_STATUSES: tuple[str, ...] = (
    "INVALID", "PENDING", "SUBMITTING", "SUBMITTED", "IN_QUEUE", "PROCESSING", "FETCHING",
    "COMPLETED", "FAILED", "UNCERTAIN", "TIMED_OUT", "LOST",
)  # fmt: skip
#: Submission events the integration writes (not enforced: new events need no migration).
#: ``cost_credits`` is set on SUBMITTED and UNCERTAIN (money spent, or possibly spent) and
#: nowhere else, so summing it over the history never counts a job twice; COMPLETED, FAILED,
#: TIMED_OUT and LOST record how each submitted job ended (its reason in ``error``).
SUBMISSION_EVENTS: tuple[str, ...] = (
    "INTENT", "SUBMITTED", "UNCERTAIN", "FAILED_TO_SUBMIT", "RESOLVED",
    "COMPLETED", "FAILED", "TIMED_OUT", "LOST",
)  # fmt: skip

_VIDEO_UPDATABLE = frozenset(VIDEO_COLUMNS) - {"partition_key"}
_SUBMISSION_NAMES = frozenset(SUBMISSION_COLUMNS)
_NUMERIC = (pa.int32(), pa.int64(), pa.float64())


def utcnow() -> datetime:
    return datetime.now(UTC)


def _column(name: str, values: list[Any], type_: pa.DataType) -> pa.Array:
    """Convert one column, naming the field in the error (Arrow's messages do not)."""
    for v in values:
        if isinstance(v, bool) and type_ in _NUMERIC:
            raise ValueError(f"field {name!r}: expected a number, got bool {v!r}")
        if isinstance(v, os.PathLike) and type_ == pa.string():
            values = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in values]
            break
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"field {name!r}: invalid value for {type_}: {exc}") from exc


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: partition_key must be a non-empty str, got {key!r}")
    return key


def build_video_part(updates: Sequence[Mapping[str, Any]], now: datetime) -> pa.Table:
    """Validate partial updates (each a mapping with ``partition_key``) into a log part.

    Only the fields present in a mapping are recorded as set; ``updated_at`` is set to ``now``
    unless given (None also means now). Raises ValueError naming an unknown field or a value of
    the wrong type.
    """
    n = len(updates)
    cols: dict[str, list[Any]] = {name: [None] * n for name in VIDEO_COLUMNS}
    sets: list[list[str]] = []
    for i, upd in enumerate(updates):
        cols["partition_key"][i] = _check_key(upd.get("partition_key"), f"update #{i}")
        names = []
        for k, v in upd.items():
            if k == "partition_key":
                continue
            if k not in _VIDEO_UPDATABLE:
                raise ValueError(f"unknown video field {k!r} (known: {', '.join(VIDEO_COLUMNS)})")
            cols[k][i] = v
            names.append(k)
        if upd.get("updated_at") is None:  # always set: None means "now", not "clear"
            cols["updated_at"][i] = now
            if "updated_at" not in upd:
                names.append("updated_at")
        sets.append(names)
    arrays = [_column(f.name, cols[f.name], f.type) for f in VIDEO_SCHEMA]
    arrays.append(pa.array(sets, type=pa.list_(pa.string())))
    return pa.Table.from_arrays(arrays, schema=VIDEO_PART_SCHEMA)


def build_submission_part(events: Sequence[Mapping[str, Any]], now: datetime) -> pa.Table:
    """Validate submission events; ``event_id`` (uuid4 hex) and ``recorded_at`` default."""
    n = len(events)
    cols: dict[str, list[Any]] = {name: [None] * n for name in SUBMISSION_COLUMNS}
    for i, ev in enumerate(events):
        for k, v in ev.items():
            if k not in _SUBMISSION_NAMES:
                raise ValueError(
                    f"unknown submission field {k!r} (known: {', '.join(SUBMISSION_COLUMNS)})"
                )
            cols[k][i] = v
        _check_key(ev.get("partition_key"), f"submission #{i}")
        if not isinstance(ev.get("event"), str) or not ev["event"]:
            raise ValueError(f"submission #{i}: field 'event' must be a non-empty str")
        if cols["event_id"][i] is None:
            cols["event_id"][i] = uuid.uuid4().hex
        if cols["recorded_at"][i] is None:
            cols["recorded_at"][i] = now
    arrays = [_column(f.name, cols[f.name], f.type) for f in SUBMISSION_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SUBMISSION_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a stored table to ``schema``: missing nullable columns become null, extra columns
    are dropped (files written by an older or newer version stay readable). Raises ValueError
    when a required column is missing or a column cannot be cast."""
    if table.schema.equals(schema, check_metadata=False):  # the common case: our own files
        return table
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    raise ValueError(f"column {f.name!r}: cannot cast {col.type}: {exc}") from exc
            if not f.nullable and col.null_count:
                raise ValueError(f"column {f.name!r} has nulls")
            arrays.append(col)
        elif f.nullable:
            arrays.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"missing column {f.name!r}")
    return pa.Table.from_arrays(arrays, schema=schema)
