"""A prompt row's status and error, from the row and its current job: the one rule.

The rule is :data:`ROW_RULE`, an ordered table; the SQL ``CASE`` the database counts with
(:func:`status_case`), the Python the records are built with (:func:`row_status`,
:func:`row_error`) and the Arrow the catalog is published with (``publish._video_rows``) are all
derived from it, so they cannot disagree. Columns are named as in the joined row: a row's own
columns bare, its current job's prefixed with :data:`JOB_PREFIX`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case

from kvid_dagster.ledger.status import VideoStatus

JOB_PREFIX = "j_"
#: the joined column holding the current job's own status (what the last rule shows)
JOB_STATUS = f"{JOB_PREFIX}status"


@dataclass(frozen=True)
class RowCondition:
    """``column`` is null (``null=True``) or set, in the joined row."""

    column: str
    null: bool


@dataclass(frozen=True)
class RowOutcome:
    """What a row shows: ``status`` (its current job's own status, for None), and the error in
    joined column ``error``."""

    status: VideoStatus | None
    error: str


#: first condition that holds wins: an invalid row shows no job, a valid row without a job for
#: its request is PENDING with its last refusal as the error; any other shows :data:`OTHERWISE`
ROW_RULE: tuple[tuple[RowCondition, RowOutcome], ...] = (
    (RowCondition("invalid_reason", null=False), RowOutcome(VideoStatus.INVALID, "invalid_reason")),
    (RowCondition(f"{JOB_PREFIX}submission_id", null=True),
     RowOutcome(VideoStatus.PENDING, "last_error")),
)  # fmt: skip
#: a row with a job for its current request shows that job
OTHERWISE = RowOutcome(None, f"{JOB_PREFIX}error")


def _outcome(m: Mapping[str, Any]) -> RowOutcome:
    return next((o for when, o in ROW_RULE if (m[when.column] is None) == when.null), OTHERWISE)


def row_status(m: Mapping[str, Any]) -> VideoStatus:
    """A joined row's status."""
    status = _outcome(m).status
    return status if status is not None else VideoStatus(m[JOB_STATUS])


def row_error(m: Mapping[str, Any]) -> str | None:
    """A joined row's error."""
    return m[_outcome(m).error]


def status_case(column: Callable[[str], ColumnElement[Any]]) -> ColumnElement[Any]:
    """The status as a SQL ``CASE``; ``column`` gives a joined column's expression by name."""

    def shown(o: RowOutcome) -> Any:
        return o.status.value if o.status is not None else column(JOB_STATUS)

    whens = [
        (column(w.column).is_(None) if w.null else column(w.column).is_not(None), shown(o))
        for w, o in ROW_RULE
    ]
    return case(*whens, else_=shown(OTHERWISE))
