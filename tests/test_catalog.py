"""Tests of the Parquet catalog: real files, real processes, real SIGKILLs."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# plain `pytest` does not put the checkout on sys.path (spawned children inherit it from here)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvid_dagster.catalog.core as core
from kvid_dagster.catalog import (
    MAX_SEQ_KEY,
    SUBMISSION_COLUMNS,
    SUBMISSION_SCHEMA,
    TERMINAL_STATUSES,
    VIDEO_COLUMNS,
    VIDEO_SCHEMA,
    CatalogWarning,
    KvidCatalog,
)

EXPECTED_VIDEO_COLUMNS = (
    "partition_key", "prompt", "job_kind", "model", "request_hash", "params_json", "request_id",
    "status", "progress", "url", "name", "size_kb", "local_path", "sha256", "width", "height",
    "fps", "num_frames", "duration_s", "error", "attempts", "cost_credits", "submitted_at",
    "completed_at", "updated_at",
)  # fmt: skip
EXPECTED_SUBMISSION_COLUMNS = (
    "event_id", "partition_key", "request_hash", "job_kind", "model", "params_json",
    "request_id", "event", "attempt", "cost_credits", "error", "recorded_at",
)  # fmt: skip
TS = pa.timestamp("us", tz="UTC")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def catalog(tmp_path: Path) -> KvidCatalog:
    return KvidCatalog(tmp_path / "catalog")


def _log_files(catalog: KvidCatalog, table: str = "videos") -> list[Path]:
    return sorted((catalog.root / "_log" / table).glob("*.parquet"))


@contextlib.contextmanager
def _strict() -> Iterator[None]:
    """A block in which any CatalogWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogWarning)
        yield


# ---------------------------------------------------------------------------------------------
# schema


def test_schema_constants() -> None:
    assert VIDEO_COLUMNS == EXPECTED_VIDEO_COLUMNS
    assert SUBMISSION_COLUMNS == EXPECTED_SUBMISSION_COLUMNS
    types = {f.name: f.type for f in VIDEO_SCHEMA}
    assert types["progress"] == pa.int32() and types["attempts"] == pa.int32()
    assert types["width"] == types["height"] == types["num_frames"] == pa.int32()
    assert types["size_kb"] == pa.int64()
    assert types["fps"] == types["duration_s"] == types["cost_credits"] == pa.float64()
    assert types["submitted_at"] == types["completed_at"] == types["updated_at"] == TS
    assert types["status"] == types["partition_key"] == pa.string()
    sub = {f.name: f.type for f in SUBMISSION_SCHEMA}
    assert sub["attempt"] == pa.int32() and sub["cost_credits"] == pa.float64()
    assert sub["recorded_at"] == TS
    assert frozenset(["COMPLETED", "FAILED", "INVALID", "TIMED_OUT", "LOST", "UNCERTAIN"]) == (
        TERMINAL_STATUSES
    )


def test_empty_catalog_has_readable_published_tables(catalog: KvidCatalog) -> None:
    for table, columns, schema in [
        ("videos", VIDEO_COLUMNS, VIDEO_SCHEMA),
        ("submissions", SUBMISSION_COLUMNS, SUBMISSION_SCHEMA),
    ]:
        folder = catalog.root / table
        assert sorted(p.name for p in folder.iterdir()) == ["data.parquet"]
        frame = pd.read_parquet(folder)
        assert tuple(frame.columns) == columns and len(frame) == 0
        assert pq.read_schema(folder / "data.parquet").equals(schema, check_metadata=False)
    empty = catalog.latest()
    assert tuple(empty.columns) == VIDEO_COLUMNS and len(empty) == 0
    pd.testing.assert_series_equal(empty.dtypes, pd.read_parquet(catalog.root / "videos").dtypes)
    assert tuple(catalog.submissions().columns) == SUBMISSION_COLUMNS
    assert catalog.get("nope") is None
    assert catalog.counts_by_status() == {}


def test_published_tables_match_latest_after_compaction(catalog: KvidCatalog) -> None:
    t0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    catalog.update("a", prompt="p", status="COMPLETED", progress=100, size_kb=2**40, width=1280,
                   fps=24.0, submitted_at=t0, url="https://x/a.mp4")  # fmt: skip
    catalog.update("b", status="PENDING")
    catalog.record_submission(partition_key="a", event="INTENT", attempt=1, request_hash="h")
    before = catalog.latest()
    assert tuple(before.columns) == VIDEO_COLUMNS
    assert str(before["progress"].dtype) == "Int32" and str(before["size_kb"].dtype) == "Int64"
    assert str(before["updated_at"].dtype) == "datetime64[us, UTC]"
    stats = catalog.compact()
    assert stats.rows == 2 and stats.submission_rows == 1
    published = pd.read_parquet(catalog.root / "videos")
    assert tuple(published.columns) == VIDEO_COLUMNS
    pd.testing.assert_frame_equal(published, before)
    pd.testing.assert_frame_equal(catalog.latest(), before)
    # nullable ints keep their type even with nulls ("b" has no progress)
    assert published.loc[1, "progress"] is pd.NA and published.loc[0, "progress"] == 100
    assert published.loc[0, "submitted_at"] == pd.Timestamp(t0)
    schema = pq.read_schema(catalog.root / "videos" / "data.parquet")
    assert schema.equals(VIDEO_SCHEMA, check_metadata=False)
    assert int(schema.metadata[MAX_SEQ_KEY]) == stats.max_seq == 3
    subs = pd.read_parquet(catalog.root / "submissions")
    assert tuple(subs.columns) == SUBMISSION_COLUMNS and subs["event"].tolist() == ["INTENT"]
    pd.testing.assert_frame_equal(subs, catalog.submissions())


# ---------------------------------------------------------------------------------------------
# updates


def test_partial_updates_and_explicit_none_clears(catalog: KvidCatalog) -> None:
    catalog.update("k", prompt="a cat", status="SUBMITTED", request_id="r1", progress=10)
    catalog.update("k", progress=50)
    row = catalog.get("k")
    assert row is not None
    assert (row["prompt"], row["status"], row["request_id"], row["progress"]) == (
        "a cat", "SUBMITTED", "r1", 50,
    )  # fmt: skip
    catalog.compact()
    catalog.update("k", request_id=None, error="boom")  # clears request_id only
    row = catalog.get("k")
    assert row is not None
    assert row["request_id"] is None and row["error"] == "boom"
    assert row["prompt"] == "a cat" and row["progress"] == 50 and row["status"] == "SUBMITTED"
    catalog.compact()
    assert catalog.get("k") == row
    frame = pd.read_parquet(catalog.root / "videos")
    assert frame["request_id"].isna().all() and frame["error"].tolist() == ["boom"]


def test_updated_at_is_automatic_and_overridable(catalog: KvidCatalog) -> None:
    start = datetime.now(UTC)
    catalog.update("k", status="PENDING")
    first = catalog.get("k")
    assert first is not None and start <= first["updated_at"] <= datetime.now(UTC)
    explicit = datetime(2020, 1, 1, tzinfo=UTC)
    catalog.update("k", updated_at=explicit)
    row = catalog.get("k")
    assert row is not None and row["updated_at"] == explicit and row["status"] == "PENDING"
    catalog.update("k", updated_at=None)  # None means "now": updated_at is never cleared
    row = catalog.get("k")
    assert row is not None and row["updated_at"] >= start
    assert KvidCatalog.for_data_dir(catalog.root.parent).get("k") == row


def test_unknown_fields_and_bad_values_raise_and_write_nothing(catalog: KvidCatalog) -> None:
    with pytest.raises(ValueError, match="'colour'"):
        catalog.update("k", colour="red")
    with pytest.raises(ValueError, match="'progress'"):
        catalog.update("k", progress="half")
    with pytest.raises(ValueError, match="'width'"):
        catalog.update("k", width=True)
    with pytest.raises(ValueError, match="'attempts'"):
        catalog.update("k", attempts=2**40)  # int32 overflow
    with pytest.raises(ValueError, match="partition_key"):
        catalog.update_many([{"status": "PENDING"}])
    with pytest.raises(ValueError, match="'_set'"):
        catalog.update_many([{"partition_key": "k", "_set": ["x"]}])
    with pytest.raises(ValueError, match="'amount'"):
        catalog.record_submission(partition_key="k", event="INTENT", amount=3)
    with pytest.raises(ValueError, match="event"):
        catalog.record_submission(partition_key="k")
    with pytest.raises(ValueError, match="'colour'"):
        catalog.find(colour="red")
    assert catalog.log_parts() == 0 and catalog.latest().empty
    assert list((catalog.root / "_tmp").iterdir()) == []


def test_update_many_is_one_part_applied_in_order(catalog: KvidCatalog) -> None:
    seq = catalog.update_many(
        [
            {"partition_key": "a", "status": "IN_QUEUE", "progress": 0},
            {"partition_key": "b", "status": "PROCESSING"},
            {"partition_key": "a", "status": "PROCESSING", "progress": 40},
        ]
    )
    assert catalog.update_many([]) is None
    files = _log_files(catalog)
    assert len(files) == 1 and files[0].name.startswith(f"{seq:016d}-{os.getpid()}-")
    latest = catalog.latest().set_index("partition_key")
    assert latest.loc["a", "status"] == "PROCESSING" and latest.loc["a", "progress"] == 40
    assert latest.loc["b", "status"] == "PROCESSING"


def test_sequence_order_decides_not_names_or_clocks(catalog: KvidCatalog) -> None:
    seqs = [catalog.update("k", status=f"S{i}", progress=i) for i in range(12)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 12
    # a part's pid/uuid suffix must not matter: rename the newest to sort last by every other
    # criterion and give the oldest the newest mtime
    files = _log_files(catalog)
    newest, oldest = files[-1], files[0]
    renamed = newest.with_name(newest.name[:16] + "-1-00000000.parquet")
    os.rename(newest, renamed)
    os.utime(oldest, (time.time() + 3600, time.time() + 3600))
    row = catalog.get("k")
    assert row is not None and row["status"] == "S11" and row["progress"] == 11
    catalog.compact()
    row = catalog.get("k")
    assert row is not None and row["status"] == "S11"


def test_get_find_pending_counts(catalog: KvidCatalog) -> None:
    statuses = ["PENDING", "SUBMITTING", "SUBMITTED", "IN_QUEUE", "PROCESSING", "COMPLETED",
                "FAILED", "INVALID", "TIMED_OUT", "LOST", "UNCERTAIN"]  # fmt: skip
    catalog.update_many(
        {"partition_key": f"k{i:02d}", "status": s, "request_hash": f"h{i % 3}"}
        for i, s in enumerate(statuses)
    )
    catalog.update("nostatus", prompt="x")
    catalog.compact()
    catalog.update("k00", status="COMPLETED")  # leaves pending through the log
    catalog.update("k05", status="PROCESSING")  # enters pending through the log
    pending = catalog.pending()
    assert tuple(pending.columns) == VIDEO_COLUMNS
    assert sorted(pending["partition_key"]) == ["k01", "k02", "k03", "k04", "k05", "nostatus"]
    assert not set(pending["status"].dropna()) & TERMINAL_STATUSES
    assert catalog.pending(statuses=["PROCESSING"])["partition_key"].tolist() == ["k04", "k05"]
    records = catalog.pending_records(statuses=["PROCESSING"])
    assert [r["partition_key"] for r in records] == ["k04", "k05"]
    assert records[0]["progress"] is None and records[0]["request_hash"] == "h1"
    counts = catalog.counts_by_status()
    assert counts["COMPLETED"] == 1 and counts["PROCESSING"] == 2 and "PENDING" not in counts
    assert sum(counts.values()) == len(statuses)
    assert catalog.find(request_hash="h0")["partition_key"].tolist() == [
        "k00", "k03", "k06", "k09",
    ]  # fmt: skip
    assert catalog.find(status=None)["partition_key"].tolist() == ["nostatus"]
    assert catalog.get("k05")["status"] == "PROCESSING"  # type: ignore[index]
    assert len(catalog.latest_records()) == len(statuses) + 1


def test_submissions_history(catalog: KvidCatalog) -> None:
    ids = catalog.record_submissions(
        [
            {"partition_key": "a", "event": "INTENT", "request_hash": "h1", "attempt": 1},
            {"partition_key": "b", "event": "INTENT", "request_hash": "h2", "attempt": 1},
        ]
    )
    catalog.compact()
    ids.append(
        catalog.record_submission(
            partition_key="a", event="SUBMITTED", request_hash="h1", attempt=1,
            request_id="r1", cost_credits=0.25,
        )
    )  # fmt: skip
    assert catalog.record_submissions([]) == []
    history = catalog.submissions()
    assert history["event_id"].tolist() == ids and len(set(ids)) == 3
    assert history["event"].tolist() == ["INTENT", "INTENT", "SUBMITTED"]
    assert catalog.submissions(partition_key="a")["event"].tolist() == ["INTENT", "SUBMITTED"]
    assert catalog.submissions(request_hash="h2")["partition_key"].tolist() == ["b"]
    assert history["recorded_at"].notna().all()
    assert history["cost_credits"].iloc[2] == 0.25 and pd.isna(history["cost_credits"].iloc[0])
    catalog.compact()
    pd.testing.assert_frame_equal(pd.read_parquet(catalog.root / "submissions"), history)


# ---------------------------------------------------------------------------------------------
# compaction


def test_compaction_folds_and_deletes_parts(catalog: KvidCatalog) -> None:
    for i in range(10):
        catalog.update(f"k{i % 4}", progress=i)
    catalog.record_submission(partition_key="k0", event="INTENT")
    assert catalog.log_parts() == 11
    before = catalog.latest()
    stats = catalog.compact()
    assert (stats.parts_folded, stats.parts_deleted, stats.rows) == (11, 11, 4)
    assert stats.max_seq == 11 and stats.seconds > 0
    assert catalog.log_parts() == 0 and _log_files(catalog) == []
    pd.testing.assert_frame_equal(catalog.latest(), before)
    pd.testing.assert_frame_equal(pd.read_parquet(catalog.root / "videos"), before)
    assert catalog.latest()["progress"].tolist() == [8, 9, 6, 7]
    # nothing new: nothing rewritten
    mtime = (catalog.root / "videos" / "data.parquet").stat().st_mtime_ns
    again = catalog.compact()
    assert again.parts_folded == 0 and again.rows == 4
    assert (catalog.root / "videos" / "data.parquet").stat().st_mtime_ns == mtime


def test_maybe_compact(catalog: KvidCatalog) -> None:
    for i in range(3):
        catalog.update("k", progress=i)
    assert catalog.maybe_compact(max_parts=4) is None and catalog.log_parts() == 3
    stats = catalog.maybe_compact(max_parts=3)
    assert stats is not None and stats.parts_folded == 3 and catalog.log_parts() == 0


def test_crash_between_publish_and_delete_applies_nothing_twice(
    catalog: KvidCatalog, tmp_path: Path
) -> None:
    catalog.update("k", status="SUBMITTED", progress=1)
    catalog.record_submission(partition_key="k", event="INTENT")
    catalog.update("k", status="COMPLETED", progress=100)
    catalog.record_submission(partition_key="k", event="SUBMITTED")
    saved = tmp_path / "saved"
    shutil.copytree(catalog.root / "_log", saved)
    stats = catalog.compact()
    # the crash: the snapshot was replaced, the folded parts were not deleted
    shutil.rmtree(catalog.root / "_log")
    shutil.copytree(saved, catalog.root / "_log")
    assert catalog.log_parts() == 4
    catalog.update("other", status="PENDING")  # a new part after the crash
    row = catalog.get("k")
    assert row is not None and row["status"] == "COMPLETED" and row["progress"] == 100
    assert catalog.submissions()["event"].tolist() == ["INTENT", "SUBMITTED"]
    again = catalog.compact()
    assert again.parts_folded == 1 and again.parts_deleted == 5 and catalog.log_parts() == 0
    assert again.max_seq > stats.max_seq
    assert catalog.get("k") == row
    assert pd.read_parquet(catalog.root / "submissions")["event"].tolist() == [
        "INTENT", "SUBMITTED",
    ]  # fmt: skip


def test_crash_before_publish_leaves_only_ignored_temp_files(catalog: KvidCatalog) -> None:
    catalog.update("k", status="PENDING")
    catalog.compact()
    # what killed writers and compactors leave behind: half-written temp files
    leftovers = [
        catalog.root / "_tmp" / ".videos-snapshot-123-abc.parquet",
        catalog.root / "_tmp" / ".videos-999-def.parquet",
        catalog.root / "videos" / ".data.parquet.tmp",
        catalog.root / "videos" / "_data.parquet.tmp",
        catalog.root / "_log" / "videos" / ".0000000000000099-1-deadbeef.parquet",
    ]
    for path in leftovers:
        path.write_bytes(b"PAR1 half a file")
    with _strict():
        frame = pd.read_parquet(catalog.root / "videos")  # pyarrow skips "."/"_" names
        assert frame["partition_key"].tolist() == ["k"]
        assert catalog.latest()["partition_key"].tolist() == ["k"]
        assert catalog.compact().temp_files_removed == 0  # too young to be a leftover
        assert all(p.exists() for p in leftovers)
        stats = catalog.compact(tmp_max_age=0)
    assert stats.temp_files_removed == len(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert not (catalog.root / "_quarantine").exists()


def test_reads_during_compaction_are_consistent(catalog: KvidCatalog) -> None:
    """A reader racing compactions never sees a key go back in time or a missing row."""
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        reader_catalog = KvidCatalog(catalog.root)
        last = -1
        try:
            while not stop.is_set():
                progress = reader_catalog.latest().set_index("partition_key")["progress"]
                assert progress.index.is_unique
                value = int(progress["counter"]) if "counter" in progress.index else -1
                assert value >= last, f"went back from {last} to {value}"
                if value >= 0:
                    assert len(progress) == 1 + value // 10 + 1  # counter + one row per 10
                last = value
                assert os.listdir(catalog.root / "videos") == ["data.parquet"]  # no temp files
                published = pd.read_parquet(catalog.root / "videos")
                assert tuple(published.columns) == VIDEO_COLUMNS
                seen.append(value)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    with _strict():
        thread.start()
        try:
            for i in range(150):
                catalog.update_many(
                    [{"partition_key": "counter", "progress": i},
                     {"partition_key": f"row-{i // 10:03d}", "status": "PENDING"}]
                )  # fmt: skip
                if i % 15 == 14:
                    catalog.compact()
        finally:
            stop.set()
            thread.join()
    assert not errors, errors[0]
    assert len(seen) > 5 and seen[-1] >= 140


@pytest.mark.parametrize("hook", ["list_parts", "read_bytes"])
def test_a_read_racing_a_compaction_reads_again(
    catalog: KvidCatalog, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """Deterministic version of the race: a compaction publishes and deletes the parts right
    after the reader opened the old snapshot (before it lists, or before it reads a part)."""
    for i in range(5):
        catalog.update("k", progress=i)
    real = getattr(core, hook)
    raced: list[int] = []

    def racing(path: Path, *args: Any) -> Any:
        if not raced:
            raced.append(1)
            stats = KvidCatalog(catalog.root).compact()  # calls `racing` again: now passes
            raced.append(stats.parts_folded)
        return real(path, *args)

    monkeypatch.setattr(core, hook, racing)
    row = catalog.get("k")
    assert raced == [1, 5] and catalog.log_parts() == 0
    assert row is not None and row["progress"] == 4


# ---------------------------------------------------------------------------------------------
# damage


def test_garbage_and_truncated_parts_are_quarantined(catalog: KvidCatalog) -> None:
    catalog.update("a", status="PENDING")
    catalog.update("b", status="PENDING")
    good = _log_files(catalog)
    truncated = good[1].with_name(f"{3:016d}-1-0000000a.parquet")
    data = good[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = good[1].with_name(f"{4:016d}-1-0000000b.parquet")
    garbage.write_bytes(b"this is not parquet at all")
    wrong = good[1].with_name(f"{5:016d}-1-0000000c.parquet")
    pq.write_table(pa.table({"x": [1]}), wrong)  # Parquet, but not a part
    catalog.update("c", status="PENDING")  # seq 6: the counter knows nothing of the above
    with pytest.warns(CatalogWarning) as record:
        latest = catalog.latest()
    messages = " ".join(str(w.message) for w in record)
    for path in (truncated, garbage, wrong):
        assert path.name in messages
        assert not path.exists()
    assert latest["partition_key"].tolist() == ["a", "b", "c"]
    quarantined = sorted(p.name for p in (catalog.root / "_quarantine").iterdir())
    assert len(quarantined) == 3 and all(n.startswith("videos-0000") for n in quarantined)
    # the same for a compaction meeting a damaged part
    bad = good[1].with_name(f"{99:016d}-1-0000000d.parquet")
    bad.write_bytes(b"\x00" * 100)
    with pytest.warns(CatalogWarning, match=bad.name):
        stats = catalog.compact()
    assert stats.quarantined == 1 and stats.rows == 3 and catalog.log_parts() == 0
    with _strict():
        assert catalog.latest()["partition_key"].tolist() == ["a", "b", "c"]
    assert catalog.update("d") > 99  # the counter moved past every seq seen by compaction


def test_damaged_snapshot_falls_back_to_previous_and_is_repaired(catalog: KvidCatalog) -> None:
    catalog.update("a", status="PENDING")
    catalog.compact()
    catalog.update("b", status="PENDING")
    catalog.compact()  # the first snapshot becomes the fallback
    catalog.update("c", status="PENDING")
    snapshot = catalog.root / "videos" / "data.parquet"
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # damaged in place
    with pytest.warns(CatalogWarning, match="data.parquet"):
        keys = catalog.latest()["partition_key"].tolist()
    # "b" was folded into the damaged snapshot and its part deleted: reported, not crashed
    assert keys == ["a", "c"]
    with pytest.warns(CatalogWarning) as record:
        stats = catalog.compact()
    messages = [str(w.message) for w in record]
    assert any("using the previous snapshot" in m for m in messages)
    assert any("damaged snapshot" in m and "moved to" in m for m in messages)
    assert stats.rows == 2
    with _strict():
        assert pd.read_parquet(catalog.root / "videos")["partition_key"].tolist() == ["a", "c"]
        assert catalog.latest()["partition_key"].tolist() == ["a", "c"]
    assert any(p.name.startswith("videos-data.parquet") for p in
               (catalog.root / "_quarantine").iterdir())  # fmt: skip


def test_missing_snapshots_rebuild_from_log(catalog: KvidCatalog) -> None:
    catalog.update("a", status="PENDING")
    shutil.rmtree(catalog.root / "_prev")
    (catalog.root / "videos" / "data.parquet").write_bytes(b"garbage")
    with pytest.warns(CatalogWarning, match="rebuilding from the log"):
        assert catalog.latest()["partition_key"].tolist() == ["a"]


def test_damaged_counter_is_recovered(catalog: KvidCatalog) -> None:
    last = catalog.update("a", progress=1)
    (catalog.root / ".lock").write_bytes(b"not a number")
    with pytest.warns(CatalogWarning, match="sequence counter"):
        seq = catalog.update("a", progress=2)
    assert seq > last
    assert catalog.get("a")["progress"] == 2  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# locking


def _hold_lock_briefly(root: str, ready: Any, release: Any) -> None:
    catalog = KvidCatalog(root)
    with catalog.lock():
        ready.set()
        release.wait(30)


def test_lock_is_exclusive_across_processes_and_reentrant(catalog: KvidCatalog) -> None:
    with catalog.lock():
        with catalog.lock():  # reentrant
            catalog.update("k", status="PENDING")  # writers inside the lock work too
        with pytest.raises(RuntimeError, match="compact"):
            catalog.compact()
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock_briefly, args=(str(catalog.root), ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(TimeoutError), catalog.lock(timeout=0.2):
            pass
        assert catalog.get("k") is not None  # readers do not block on the lock
        writer = threading.Thread(target=catalog.update, args=("k",), kwargs={"progress": 7})
        writer.start()
        writer.join(0.3)
        assert writer.is_alive()  # a writer waits for the holder...
        assert catalog.get("k")["progress"] is None  # type: ignore[index]
    finally:
        release.set()
        proc.join(30)
    writer.join(30)
    assert catalog.get("k")["progress"] == 7  # type: ignore[index]  # ...and then proceeds
    with catalog.lock(timeout=5):
        pass
    assert proc.exitcode == 0


def _claim(root: str, worker: int, n: int, queue: Any) -> None:
    """The submission pattern: check for a job for the request, record the intent, atomically."""
    catalog = KvidCatalog(root)
    claimed = []
    for i in range(n):
        with catalog.lock():
            if catalog.find(request_hash=f"h{i}").empty:
                catalog.record_submission(partition_key=f"k{i}", request_hash=f"h{i}",
                                          event="INTENT", error=f"worker {worker}")  # fmt: skip
                catalog.update(f"k{i}", request_hash=f"h{i}", status="SUBMITTING")
                claimed.append(i)
    queue.put(claimed)


def test_lock_makes_check_then_intent_atomic(catalog: KvidCatalog) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(catalog.root), w, 30, queue)) for w in range(3)]
    for p in procs:
        p.start()
    claims = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(i for c in claims for i in c) == list(range(30))  # each exactly once
    intents = catalog.submissions()
    assert len(intents) == 30 and intents["request_hash"].is_unique


# ---------------------------------------------------------------------------------------------
# concurrency: several writer processes and a compactor


def _writer(root: str, worker: int, n: int, queue: Any) -> None:
    catalog = KvidCatalog(root)
    done = []
    for i in range(n):
        key = f"shared-{i % 5}" if i % 3 == 0 else f"w{worker}-{i % 10}"
        fields = {"progress": i, "error": f"{worker}:{i}"}
        seq = catalog.update(key, **fields)
        done.append((seq, key, fields))
        if i % 10 == 0:
            catalog.record_submission(partition_key=key, event="INTENT", attempt=i,
                                      request_hash=f"{worker}:{i}")  # fmt: skip
    queue.put(done)


def _compactor(root: str, stop: Any, queue: Any) -> None:
    catalog = KvidCatalog(root)
    runs = 0
    while not stop.is_set():
        catalog.compact()
        runs += 1
    queue.put(runs)


def test_concurrent_writer_processes_and_compactor_lose_nothing(catalog: KvidCatalog) -> None:
    writers, n = 4, 200
    ctx = mp.get_context("spawn")
    queue, compactions, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    root = str(catalog.root)
    procs = [ctx.Process(target=_writer, args=(root, w, n, queue)) for w in range(writers)]
    # two compactors at once: they serialise on their own lock and must not lose anything
    compactors = [ctx.Process(target=_compactor, args=(root, stop, compactions)) for _ in "ab"]
    for p in [*compactors, *procs]:
        p.start()
    results: list[list[tuple[int, str, dict[str, Any]]]] = []
    last_seen: dict[str, int] = {}
    reads = 0
    with _strict():
        while len(results) < writers:
            # meanwhile: every read is consistent (a writer's own keys only move forward)
            progress = catalog.latest().set_index("partition_key")["progress"]
            assert progress.index.is_unique
            for key, value in progress.items():
                if key.startswith("w"):
                    assert value >= last_seen.get(key, -1), key
                    last_seen[key] = value
            reads += 1
            while not queue.empty():
                results.append(queue.get())
            time.sleep(0.01)
        stop.set()
        runs = [compactions.get(timeout=120) for _ in compactors]
        for p in [*procs, *compactors]:
            p.join(60)
            assert p.exitcode == 0
        latest = catalog.latest().set_index("partition_key")
        final_runs = catalog.compact()
    assert min(runs) >= 1 and reads >= 1
    updates = sorted(u for r in results for u in r)
    assert len(updates) == writers * n and len({u[0] for u in updates}) == writers * n
    expected = {key: fields for _, key, fields in updates}  # the highest seq wins
    assert sorted(latest.index) == sorted(expected)
    for key, fields in expected.items():
        assert latest.loc[key, "progress"] == fields["progress"], key
        assert latest.loc[key, "error"] == fields["error"], key
    history = catalog.submissions()
    assert len(history) == writers * n // 10 and history["request_hash"].is_unique
    assert final_runs.rows == len(expected) and catalog.log_parts() == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(catalog.root / "videos").set_index("partition_key"), latest
    )


# ---------------------------------------------------------------------------------------------
# SIGKILL


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from kvid_dagster.catalog import KvidCatalog

    catalog = KvidCatalog(sys.argv[1])
    prefix, acks = sys.argv[2], open(sys.argv[3], "a")
    i = 0
    while True:
        i += 1
        catalog.update_many(
            {"partition_key": f"{prefix}-{j}", "progress": i, "status": "PROCESSING"}
            for j in range(300)
        )
        catalog.record_submission(partition_key=f"{prefix}-0", event="INTENT", attempt=i)
        if i % 5 == 0:
            catalog.compact(tmp_max_age=3600)
        acks.write(f"{i}\\n")
        acks.flush()
    """
)


def _wait_for_new_file(dirs: list[Path], timeout: float = 10.0) -> None:
    """Return as soon as a file appears in ``dirs``: most likely a write has just begun."""
    before = {p for d in dirs for p in os.listdir(d)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if {p for d in dirs for p in os.listdir(d)} - before:
            return
    raise AssertionError("no write started")


def test_sigkilled_writer_leaves_a_readable_catalog(catalog: KvidCatalog, tmp_path: Path) -> None:
    rng = random.Random(1234)
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    for round_ in range(6):
        acks = tmp_path / f"acks-{round_}"
        acks.touch()
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(catalog.root), f"r{round_}", str(acks)],
            env=env,
        )
        deadline = time.monotonic() + 60
        while not acks.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert acks.read_text(), "the writer never got going"
        if round_ % 2:
            _wait_for_new_file([catalog.root / "_tmp", catalog.root / "_log" / "videos"])
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
        acked = int(acks.read_text().split()[-1])

        with _strict():  # no damaged part, no damaged snapshot: nothing to quarantine
            for part in (catalog.root / "_log").glob("*/*.parquet"):
                pq.read_table(part)  # every final name is a complete file
            latest = catalog.latest().set_index("partition_key")
            mine = latest.loc[[f"r{round_}-{j}" for j in range(300)], "progress"]
            assert mine.nunique() == 1  # a part is all or nothing
            assert mine.iloc[0] >= acked  # and nothing acknowledged is lost
            attempts = catalog.submissions(partition_key=f"r{round_}-0")["attempt"]
            assert attempts.is_unique and set(range(1, acked + 1)) <= set(attempts)
            pd.read_parquet(catalog.root / "videos")
        assert not (catalog.root / "_quarantine").exists()
    with _strict():
        before = catalog.latest()
        catalog.compact(tmp_max_age=0)
        pd.testing.assert_frame_equal(catalog.latest(), before)
    assert list((catalog.root / "_tmp").iterdir()) == [] and catalog.log_parts() == 0


# ---------------------------------------------------------------------------------------------
# property: folding equals a dict model

_KEYS = ["a", "b", "c", "d"]
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "status": st.sampled_from(["PENDING", "SUBMITTED", "PROCESSING", "COMPLETED", "FAILED"]),
    "progress": st.integers(-(2**31), 2**31 - 1),
    "size_kb": st.integers(-(2**63), 2**63 - 1),
    "url": st.text(max_size=8),
    "fps": st.floats(allow_nan=False, width=64),
    "completed_at": st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
}
_UPDATE = st.tuples(
    st.sampled_from(_KEYS),
    # a random subset of the fields, each set to a value or explicitly to None
    st.sets(st.sampled_from(sorted(_VALUES))).flatmap(
        lambda names: st.fixed_dictionaries({k: st.none() | _VALUES[k] for k in sorted(names)})
    ),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), _UPDATE),
        st.tuples(st.just("many"), st.lists(_UPDATE, min_size=1, max_size=4)),
        st.tuples(st.just("compact"), st.none()),
    ),
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_folding_matches_a_dict_model(ops: list[tuple[str, Any]]) -> None:
    model: dict[str, dict[str, Any]] = {}

    def apply(key: str, fields: dict[str, Any]) -> None:
        model.setdefault(key, {}).update(fields)

    with tempfile.TemporaryDirectory() as tmp, _strict():
        catalog = KvidCatalog(Path(tmp) / "catalog", durable=False)
        for op, arg in ops:
            if op == "update":
                catalog.update(arg[0], **arg[1])
                apply(*arg)
            elif op == "many":
                catalog.update_many({"partition_key": k, **f} for k, f in arg)
                for key, fields in arg:
                    apply(key, fields)
            else:
                catalog.compact()
            _check_against_model(catalog, model)
        catalog.compact()
        _check_against_model(catalog, model)
        published = pq.read_table(catalog.root / "videos").to_pylist()
        assert _strip(published) == _strip(catalog.latest_table().to_pylist())


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "updated_at"} for r in rows]


def _check_against_model(catalog: KvidCatalog, model: dict[str, dict[str, Any]]) -> None:
    rows = catalog.latest_table().to_pylist()
    assert [r["partition_key"] for r in rows] == sorted(model)
    for row in rows:
        assert row["updated_at"] is not None
        expected = {c: None for c in VIDEO_COLUMNS if c != "updated_at"}
        expected.update(model[row["partition_key"]], partition_key=row["partition_key"])
        assert _strip([row]) == [expected]
    assert len(catalog.latest()) == len(model)


def test_updated_at_ordering_is_not_used_for_folding(catalog: KvidCatalog) -> None:
    """Clocks can go backwards between processes; only the log order counts."""
    later = datetime.now(UTC) + timedelta(days=1)
    catalog.update("k", status="A", updated_at=later)
    catalog.update("k", status="B", updated_at=later - timedelta(days=2))
    assert catalog.get("k")["status"] == "B"  # type: ignore[index]
