"""The import of a 0.1 data folder keeps every paid request_id, on SQLite and PostgreSQL.

0.1 was idempotent per partition, not per request: two rows of one request were each paid,
each with its own request_id. Each id must survive the import as a job of its own, be polled
until it ends and never be sent again.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import TEST_API_KEY
from faultkit import poll_until_settled, submit

from kvid_dagster.client import KvidClient
from kvid_dagster.core.prompts import PromptRow, load_prompt_table
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus

SENT = datetime(2026, 11, 1, 12, tzinfo=UTC)


def legacy_folder(data_dir: Path, rows: list[dict[str, Any]]) -> None:
    """A 0.1 data folder: ``catalog/videos/data.parquet`` (a published snapshot holding these
    rows) and the ``catalog/_log`` folder that marks 0.1's catalog."""
    catalog = data_dir / "catalog"
    (catalog / "videos").mkdir(parents=True)
    (catalog / "_log" / "videos").mkdir(parents=True)
    columns = {name: [r.get(name) for r in rows] for name in rows[0]}
    snapshot = pa.table(columns).replace_schema_metadata({b"kvid.max_seq": b"1"})
    pq.write_table(snapshot, catalog / "videos" / "data.parquet")


def legacy_row(key: str, row: PromptRow, **fields: Any) -> dict[str, Any]:
    """0.1's videos row of ``key`` for the request of ``row``."""
    return {
        "partition_key": key,
        "prompt": row.prompt,
        "job_kind": row.job_kind,
        "model": row.model,
        "request_hash": row.request_hash,
        "params_json": row.params_json,
        "status": "SUBMITTED",
        "attempts": 1,
        "cost_credits": 60.0,
        "updated_at": SENT,
        **fields,
    }


def one_request(tmp_path: Path) -> PromptRow:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt_id,prompt,resolution,num_frames\nx,A heron,480p,81\n")
    [row] = load_prompt_table(prompts).rows
    return row


def test_two_rows_of_one_request_each_paid_in_0_1_keep_both_jobs_and_both_are_polled(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    row = one_request(tmp_path)
    with KvidClient(TEST_API_KEY, emulator.base_url) as client:  # 0.1 paid each row
        first_id, second_id = (client.generate(row.request) for _ in range(2))
    data_dir = tmp_path / "data"
    sent = datetime.now(UTC)  # just before the upgrade: both jobs are within their deadline
    legacy_folder(data_dir, [
        legacy_row("first", row, request_id=first_id, submitted_at=sent),
        legacy_row("second", row, request_id=second_id, submitted_at=sent + timedelta(0, 1)),
    ])  # fmt: skip
    with Ledger.for_data_dir(data_dir, database_url) as ledger:
        jobs = {s.request_id: s for s in ledger.submissions()}
        assert set(jobs) == {first_id, second_id}
        assert (jobs[first_id].partition_key, jobs[first_id].attempt) == ("first", 1)
        assert (jobs[second_id].partition_key, jobs[second_id].attempt) == ("second", 2)
        assert {s.request_id for s in ledger.jobs_to_poll()} == {first_id, second_id}
        # the latest attempt is the current job of both rows
        assert {r.partition_key: r.request_id for r in ledger.rows()} == {
            "first": second_id, "second": second_id,
        }  # fmt: skip

        poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
        for sub in ledger.submissions():
            assert sub.status is VideoStatus.COMPLETED, sub
            assert sub.video.local_path and Path(sub.video.local_path).is_file()
        assert len({s.video.local_path for s in ledger.submissions()}) == 2

        # neither row's request is sent again
        rows = [replace(row, partition_key=key) for key in ("first", "second")]
        outcomes = submit(emulator.base_url, ledger, rows)
        assert [o.request_id for o in outcomes] == [second_id, second_id]
    assert emulator.stats["generate"] == 2


def test_a_request_id_shown_by_two_rows_is_one_job_and_an_unsent_intent_is_the_current_job(
    database_url: str, tmp_path: Path
) -> None:
    row = one_request(tmp_path)
    legacy_folder(tmp_path, [
        legacy_row("a", row, request_id="rid-1", submitted_at=SENT),
        legacy_row("b", row, request_id="rid-1", submitted_at=SENT),  # a copy of a's id
        legacy_row("c", row, request_id=None, status="SUBMITTING", submitted_at=None),
        legacy_row("d", row, request_id="rid-2", attempts=2, submitted_at=SENT),
    ])  # fmt: skip
    with Ledger.for_data_dir(tmp_path, database_url) as ledger:
        jobs = sorted((s.attempt, s.partition_key, s.request_id, s.status)
                      for s in ledger.submissions())  # fmt: skip
        assert jobs == [
            (1, "a", "rid-1", VideoStatus.SUBMITTED),
            (2, "d", "rid-2", VideoStatus.SUBMITTED),
            (3, "c", None, VideoStatus.UNCERTAIN),  # never sent: a person resolves it
        ]
        assert {r.status for r in ledger.rows()} == {VideoStatus.UNCERTAIN}
