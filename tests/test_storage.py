"""Storage anywhere: videos, previews and the catalogs on a real S3 API (moto's server on
loopback, the bucket made by each test), the ledger staying in its database.

- the setting: unset is the data dir (plain local paths, as before); ``KVID_STORAGE_URL`` or
  ``storage_url`` moves videos and catalogs to a URL;
- ``put_file`` streams a file to its final key in parts and checks what was stored;
- the catalogs published to ``s3://`` are what ``pd.read_parquet("s3://...")`` reads, equal to
  the ledger, incrementally, and an older publication never replaces a newer one;
- a Dagster run end to end with its storage in the bucket: one MP4 object per COMPLETED row,
  each decodes, none in the local data dir, the catalog lists the ``s3://`` URIs;
- an upload that fails is that job's error, retried as a failed fetch is, never a crash.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import av
import pandas as pd
import pytest
from dagster import AssetKey, AssetRecordsFilter
from faultkit import (
    assert_accounted,
    dagster_home,
    make_defs,
    open_instance,
    poll_once,
    poll_until_settled,
    run_prompts,
    run_submit,
    submit,
    table_rows,
    tick_until_settled,
    write_table,
)
from upath import UPath

from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus, publish, videos_frame
from kvid_dagster.ledger.publish import (
    DATA_FILE,
    REVISION_KEY,
    STALE_TEMP_SECONDS,
    published_revision,
)
from kvid_dagster.media.preview import PreviewKind, cache_path, contact_sheet, video_previews
from kvid_dagster.media.storage import (
    PART_BYTES,
    STORAGE_URL_ENV,
    Storage,
    StorageError,
    exists,
    is_remote,
    open_for_write,
    put_file,
)


def keys(s3: Any, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every object under ``prefix``, by key."""
    found: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found |= {o["Key"]: o for o in page.get("Contents", [])}
    return found


def s3_key(uri: str, bucket: str) -> str:
    assert uri.startswith(f"s3://{bucket}/"), uri
    return uri.removeprefix(f"s3://{bucket}/")


# ---------------------------------------------------------------------------------------------
# the setting and the seam


def test_unset_storage_is_the_data_dir_as_plain_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    project = KvidProject(tmp_path / "p.csv", tmp_path / "data")
    assert type(project.videos_dir) is type(tmp_path)  # a plain Path, not a UPath
    assert project.videos_dir == (tmp_path / "data" / "videos").resolve()
    assert project.catalog_dir == (tmp_path / "data" / "catalog").resolve()
    assert project.storage.is_local

    monkeypatch.setenv(STORAGE_URL_ENV, "s3://somewhere/pre/fix")
    moved = KvidProject(tmp_path / "p.csv", tmp_path / "data")
    assert not moved.storage.is_local
    assert str(moved.videos_dir) == "s3://somewhere/pre/fix/videos"
    assert str(moved.catalog_dir) == "s3://somewhere/pre/fix/catalog"
    # the argument wins over the environment; a file:// URL is a local path
    local = KvidProject(tmp_path / "p.csv", tmp_path / "d", storage_url=f"file://{tmp_path}/s")
    assert local.storage.is_local and local.videos_dir == tmp_path / "s" / "videos"
    assert not is_remote(local.catalog_dir) and is_remote("gs://b/k")


def test_put_file_streams_in_parts_to_its_final_key(s3: Any, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = os.urandom(PART_BYTES + PART_BYTES // 2)  # more than one part
    source.write_bytes(data)
    target = Storage(UPath(f"s3://{bucket}/pre")).videos_dir / "big.mp4"
    assert put_file(source, target) == f"s3://{bucket}/pre/videos/big.mp4"
    stored = s3.get_object(Bucket=bucket, Key="pre/videos/big.mp4")
    assert hashlib.sha256(stored["Body"].read()).digest() == hashlib.sha256(data).digest()
    assert stored["ETag"].strip('"').endswith("-2")  # a multipart upload: two parts
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 10)
    put_file(small, target)  # a later upload replaces the object whole
    assert s3.get_object(Bucket=bucket, Key="pre/videos/big.mp4")["Body"].read() == b"x" * 10


def test_a_failed_upload_raises_storage_error_and_stores_nothing(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    source = tmp_path / "video.bin"
    source.write_bytes(os.urandom(PART_BYTES * 2 + 1))
    # the first part is refused (no such bucket): the upload is abandoned mid-way
    with pytest.raises(StorageError, match="uploading s3://kvid-no-such-bucket/videos/a"):
        put_file(source, UPath("s3://kvid-no-such-bucket/videos/a.mp4"))
    put_file(source, UPath(f"s3://{bucket}/videos/a.mp4"))  # the same file, where it can go
    assert list(keys(s3, bucket)) == ["videos/a.mp4"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.parametrize("size", [10, PART_BYTES + 1], ids=["small", "a-part-uploaded"])
def test_a_write_broken_off_publishes_nothing_and_leaves_no_upload(
    s3: Any, bucket: str, size: int
) -> None:
    """Whatever was written (buffered only, or parts already uploaded) is dropped, and the
    file cannot publish it later (closed before its parts are discarded)."""
    target = UPath(f"s3://{bucket}/videos/a.mp4")
    with pytest.raises(RuntimeError, match="the source broke"), open_for_write(target) as sink:
        sink.write(b"x" * size)
        raise RuntimeError("the source broke")
    assert sink.closed
    assert list(keys(s3, bucket)) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# ---------------------------------------------------------------------------------------------
# the catalogs on S3


def ledger_with_rows(tmp_path: Path, keys_: list[str]) -> Ledger:
    table = write_table(tmp_path / "p.csv", keys_)
    ledger = KvidProject(table, tmp_path / "data").ledger()
    ledger.register(table_rows(table))
    return ledger


def test_the_catalog_published_to_s3_is_what_pandas_reads_there(
    s3: Any, bucket: str, tmp_path: Path, emulator: KvidEmulator
) -> None:
    catalog = f"s3://{bucket}/team/catalog"
    ledger = ledger_with_rows(tmp_path, ["a", "b"])
    first = publish(ledger, catalog)
    assert not first.incremental
    pd.testing.assert_frame_equal(pd.read_parquet(f"{catalog}/videos"), videos_frame(ledger))
    assert set(keys(s3, bucket, "team/")) == {
        "team/catalog/videos/data.parquet",
        "team/catalog/submissions/data.parquet",
    }  # no temp object, no local file
    assert not (tmp_path / "data" / "catalog").exists()

    rows = table_rows(write_table(tmp_path / "p.csv", ["a", "b", "c"]))
    ledger.register(rows)
    submit(emulator.base_url, ledger, [r for r in rows if r.partition_key == "c"])
    poll_until_settled(emulator.base_url, ledger, tmp_path / "unused", download=False)
    second = publish(ledger, catalog)
    assert second.incremental  # read back from S3 and merged
    assert second.revision == ledger.revision() > first.revision
    published = pd.read_parquet(f"{catalog}/videos")
    pd.testing.assert_frame_equal(published, videos_frame(ledger))
    assert published.set_index("partition_key").loc["c", "status"] == "COMPLETED"
    history = pd.read_parquet(f"{catalog}/submissions")
    assert set(history[history["partition_key"] == "c"]["event"]) >= {"SUBMITTED", "COMPLETED"}
    assert published_revision(UPath(f"{catalog}/videos/{DATA_FILE}")) == second.revision


def test_a_publication_to_s3_removes_the_staging_dirs_killed_publishers_left(
    s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On object storage the catalogs are staged in the system temp dir (uploaded whole from
    there): a publisher killed mid-write leaves its staging dir, removed once stale."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stale, live = (tmp_path / "tmp" / f"kvid-publish-{n}" for n in ("dead", "live"))
    for folder in (stale, live):
        (folder / "videos").mkdir(parents=True)
        (folder / "videos" / f".{DATA_FILE}.0000.tmp").write_bytes(b"PAR1 half a file")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    catalog = f"s3://{bucket}/catalog"
    publish(ledger_with_rows(tmp_path, ["a"]), catalog)
    assert not stale.exists() and live.exists()  # another publisher's, mid-write
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["kvid-publish-live"]
    assert set(keys(s3, bucket)) == {
        "catalog/videos/data.parquet",
        "catalog/submissions/data.parquet",
    }


def test_duckdb_reads_the_catalog_on_s3_as_the_readme_shows(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    """The README's DuckDB query, through fsspec (s3fs): no httpfs extension to download."""
    import duckdb
    import s3fs

    catalog = f"s3://{bucket}/kvid/catalog"
    ledger = ledger_with_rows(tmp_path, ["a", "b", "c"])
    publish(ledger, catalog)
    connection = duckdb.connect()
    connection.register_filesystem(s3fs.S3FileSystem())  # the AWS_* environment, as pandas
    counts = connection.sql(
        f"SELECT status, count(*) FROM read_parquet('{catalog}/videos/*.parquet') GROUP BY 1"
    ).fetchall()
    assert counts == [("PENDING", 3)]
    keys_read = connection.sql(
        f"SELECT partition_key FROM read_parquet('{catalog}/videos/*.parquet') ORDER BY 1"
    ).fetchall()
    assert [k for (k,) in keys_read] == list(videos_frame(ledger)["partition_key"])


def test_an_older_publication_never_replaces_a_newer_one_on_s3(
    s3: Any, bucket: str, tmp_path: Path
) -> None:
    """Publisher 1 has its files ready (an older state) when a change is committed and
    publisher 2 uploads it, in each of publisher 1's rounds: publisher 1 must not upload its
    older files over the newer objects, and the latest state ends published."""
    publish_module = importlib.import_module("kvid_dagster.ledger.publish")
    catalog = f"s3://{bucket}/catalog"
    names = ["a"]
    ledger = ledger_with_rows(tmp_path, names)
    publish(ledger, catalog)

    def change() -> None:  # a row added to the table
        names.append(f"added{len(names)}")
        ledger.register(table_rows(write_table(tmp_path / "p.csv", names)))

    write = publish_module._write_hidden
    first = threading.get_ident()
    overtaken: list[tuple[int, int | None]] = []
    videos_object = UPath(f"{catalog}/videos/{DATA_FILE}")
    by_others: set[int] = set()  # the revisions publisher 2 writes (the files are written
    # in worker threads: the revision, not the thread, tells the publishers apart)

    def write_overtaken(table: Any, path: Path, stands: dict[bytes, bytes]) -> Path:
        hidden = write(table, path, stands)
        revision = int(stands[REVISION_KEY])
        if revision not in by_others and path.parent.name == "videos":
            change()  # a tick commits a change and publishes it, all before our upload
            by_others.add(ledger.revision())
            other = threading.Thread(target=publish, args=(ledger, catalog))
            other.start()
            other.join(timeout=60)
            assert not other.is_alive()
            overtaken.append((revision, published_revision(videos_object)))
        return hidden

    place = publish_module._place
    placed: list[tuple[int | None, int | None]] = []  # (the upload's revision, the object's)

    def place_watched(tmp: Path, path: Any) -> None:
        if threading.get_ident() == first:
            placed.append((published_revision(tmp), published_revision(path)))
        place(tmp, path)

    change()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish_module, "_write_hidden", write_overtaken)
        patch.setattr(publish_module, "_place", place_watched)
        stats = publish(ledger, catalog)
    assert overtaken and all(newer is not None and newer > mine for mine, newer in overtaken)
    assert all(mine is not None and (shown is None or mine >= shown) for mine, shown in placed)
    published = published_revision(videos_object)
    assert published == ledger.revision() == stats.revision, (published, overtaken)
    frame = pd.read_parquet(f"{catalog}/videos")
    pd.testing.assert_frame_equal(frame, videos_frame(ledger))
    assert list(frame["partition_key"]) == sorted(names) and len(names) > 2


# ---------------------------------------------------------------------------------------------
# a run end to end, and a failed upload


def decoded_frames(data: bytes, folder: Path) -> int:
    """The frames PyAV decodes from an MP4's bytes (written to ``folder`` first)."""
    path = folder / f"{hashlib.sha256(data).hexdigest()[:12]}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("setting", ["environment", "storage_url"])
def test_a_run_with_its_storage_on_s3_keeps_every_video_and_the_catalog_there(
    s3: Any,
    bucket: str,
    tmp_path: Path,
    emulator: KvidEmulator,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
) -> None:
    """``KVID_STORAGE_URL`` or ``build_kvid_definitions(storage_url=)``: the same storage."""
    url = f"s3://{bucket}/proj"
    if setting == "environment":
        monkeypatch.setenv(STORAGE_URL_ENV, url)
    names = ["one", "two", "three"]
    table = write_table(tmp_path / "p.csv", names)
    data_dir = tmp_path / "data"
    defs = make_defs(
        emulator.base_url,
        table,
        data_dir,
        **({"storage_url": url} if setting != "environment" else {}),
    )
    ledger = KvidProject(table, data_dir).ledger()
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "one", "two")
        tick_until_settled(defs, instance, ledger)
        assert run_submit(defs, instance, "three", "three")  # a second run, a second tick
        tick_until_settled(defs, instance, ledger)
        latest = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("kvid_videos"), asset_partitions=["two"]),
            limit=1,
        ).records[0]
        assert defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance).success
        catalog_event = instance.get_latest_materialization_event(AssetKey("kvid_catalog"))
        assert catalog_event is not None and catalog_event.asset_materialization is not None
        # the contact sheet is made from the stored objects
        sheet_md = catalog_event.asset_materialization.metadata["contact_sheet"].value
        assert "data:image/webp;base64," in sheet_md and "`three`" in sheet_md
    rows = {key: ledger.row(key) for key in names}
    assert {k: r.status if r else None for k, r in rows.items()} == dict.fromkeys(
        names, VideoStatus.COMPLETED
    )
    stored = keys(s3, bucket, "proj/videos/")
    mp4s = {k for k in stored if k.endswith(".mp4")}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for key, row in rows.items():
        assert row is not None and row.video.local_path is not None
        object_key = s3_key(row.video.local_path, bucket)
        assert object_key in mp4s, (key, row.video.local_path, sorted(stored))
        data = s3.get_object(Bucket=bucket, Key=object_key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == row.video.sha256
        assert decoded_frames(data, scratch) == row.video.num_frames > 0
        # its previews beside it, made from the verified download
        for kind in PreviewKind:
            assert s3_key(str(cache_path(UPath(row.video.local_path), kind)), bucket) in stored
    assert len(mp4s) == len(rows)  # one object per COMPLETED row, nothing else
    assert list(data_dir.rglob("*.mp4")) == [] and not (data_dir / "videos").exists()
    assert not (data_dir / "catalog").exists()  # the ledger stays in its database
    assert (data_dir / "kvid.db").is_file()

    catalog = pd.read_parquet(f"s3://{bucket}/proj/catalog/videos")
    pd.testing.assert_frame_equal(catalog, videos_frame(ledger))
    assert all(p.startswith(f"s3://{bucket}/proj/videos/") for p in catalog["local_path"])
    metadata = latest.event_log_entry.asset_materialization.metadata
    assert metadata["dagster/uri"].value == rows["two"].video.local_path
    assert metadata["preview"].value.startswith("![preview of two](data:image/webp;base64,")

    # previews from storage: a lost cache is made again from the object, and cached again
    uri = rows["one"].video.local_path
    cached = s3_key(str(cache_path(UPath(uri))), bucket)
    kept = s3.get_object(Bucket=bucket, Key=cached)["Body"].read()
    s3.delete_object(Bucket=bucket, Key=cached)
    assert video_previews(uri).animation.data[:4] == b"RIFF"
    assert s3.get_object(Bucket=bucket, Key=cached)["Body"].read()[:4] == kept[:4] == b"RIFF"
    sheet = contact_sheet(list(catalog["local_path"]))
    assert sheet.data[:4] == b"RIFF" and sheet.data[8:12] == b"WEBP"
    assert exists(uri) and not exists(uri.replace(".mp4", ".gone.mp4"))


def staging_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("kvid-fetch-*"))


def test_an_upload_that_fails_is_the_jobs_error_and_is_retried_like_a_failed_fetch(
    s3: Any, tmp_path: Path, emulator: KvidEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a temp dir of this test's own: the system one is shared with every other process that
    # fetches (a second suite beside this one made its staging dirs appear here)
    private_temp = tmp_path / "tmp"
    private_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_temp))
    rows = table_rows(write_table(tmp_path / "p.csv", ["a"]))
    ledger = Ledger(f"sqlite:///{tmp_path / 'kvid.db'}")
    ledger.register(rows)
    submit(emulator.base_url, ledger, rows)
    bucket = f"kvid-later-{secrets.token_hex(4)}"  # not made yet: every upload fails
    videos = UPath(f"s3://{bucket}/videos")
    report = None
    for _ in range(100):
        report = poll_once(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
        row = ledger.row("a")
        assert row is not None
        if row.status is VideoStatus.FETCHING:
            break
    else:
        raise AssertionError(f"the job never completed at the service: {report}")
    assert report is not None and report.errors  # the tick reported it, and went on
    assert "StorageError" in (row.error or "") and f"uploading s3://{bucket}/" in row.error
    assert row.request_id and not row.status.is_terminal
    assert staging_dirs() == set()  # the local staging copy is gone

    s3.create_bucket(Bucket=bucket)  # storage is back: the next fetch stores the video
    poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    done = ledger.row("a")
    assert done is not None and done.status is VideoStatus.COMPLETED and done.error is None
    assert done.video.local_path is not None
    assert s3_key(done.video.local_path, bucket) in keys(s3, bucket)
    assert_accounted(emulator.jobs, ledger, rows)  # one job, paid once, in the ledger
    ledger.close()
