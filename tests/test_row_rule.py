"""The row-status rule is one table (``ledger.row_rule.ROW_RULE``); its SQL, Python and Arrow
derivations must agree on every combination of a row and its current job."""

from __future__ import annotations

import itertools
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa

from kvid_dagster.ledger.publish import _by_rule
from kvid_dagster.ledger.row_rule import JOB_STATUS, row_error, row_status, status_case
from kvid_dagster.ledger.status import VideoStatus

_JOB_STATUSES = [s for s in VideoStatus if s.has_job]


def _combinations() -> list[dict[str, Any]]:
    """Every row/job combination: a job has a status, no job has none (its columns are null)."""
    combos = []
    for invalid, last_error, job, error in itertools.product(
        [None, "bad prompt"], [None, "refused"], [None, *_JOB_STATUSES], [None, "boom"]
    ):
        combos.append(
            {
                "invalid_reason": invalid,
                "last_error": last_error,
                "j_submission_id": None if job is None else 7,
                "j_status": None if job is None else job.value,
                "j_error": None if job is None else error,
            }
        )
    return combos


def test_sql_python_and_arrow_agree(database_url: str) -> None:
    combos = _combinations()
    metadata = sa.MetaData()
    table = sa.Table(
        "row_rule_probe",
        metadata,
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("invalid_reason", sa.Text),
        sa.Column("last_error", sa.Text),
        sa.Column("j_submission_id", sa.Integer),
        sa.Column("j_status", sa.Text),
        sa.Column("j_error", sa.Text),
    )
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(table.insert(), [{"n": i, **c} for i, c in enumerate(combos)])
            query = sa.select(status_case(lambda name: table.c[name])).order_by(table.c.n)
            in_sql = [VideoStatus(s) for s in conn.scalars(query)]
            metadata.drop_all(conn)
    finally:
        engine.dispose()

    joined = pa.Table.from_pylist(
        combos,
        schema=pa.schema(
            [
                ("invalid_reason", pa.string()),
                ("last_error", pa.string()),
                ("j_submission_id", pa.int64()),
                (JOB_STATUS, pa.string()),
                ("j_error", pa.string()),
            ]
        ),
    )
    in_arrow_status = _by_rule(
        joined, lambda o: o.status.value if o.status is not None else joined[JOB_STATUS]
    ).to_pylist()
    in_arrow_error = _by_rule(joined, lambda o: joined[o.error]).to_pylist()

    in_python = [row_status(c) for c in combos]
    assert in_sql == in_python
    assert [VideoStatus(s) for s in in_arrow_status] == in_python
    assert in_arrow_error == [row_error(c) for c in combos]


def _joined(invalid: str | None, job: VideoStatus | None) -> dict[str, Any]:
    return {
        "invalid_reason": invalid,
        "last_error": "refused",
        "j_submission_id": None if job is None else 1,
        "j_status": None if job is None else job.value,
        "j_error": None if job is None else "boom",
    }


@pytest.mark.parametrize(
    ("joined", "status", "error"),
    [
        (_joined("bad prompt", VideoStatus.FAILED), VideoStatus.INVALID, "bad prompt"),
        (_joined(None, None), VideoStatus.PENDING, "refused"),
        (_joined(None, VideoStatus.FAILED), VideoStatus.FAILED, "boom"),
    ],
)
def test_the_rule(joined: dict[str, Any], status: VideoStatus, error: str) -> None:
    """Invalid wins over a job; no job for the request is PENDING; else the job shows."""
    assert row_status(joined) == status
    assert row_error(joined) == error
