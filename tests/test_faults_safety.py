"""Downloads (http(s) only, size-capped, atomic, never outside the download folder) and a
damaged catalog (set aside with a warning, never a crashed run)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import EmulatorFactory
from faultkit import (
    assert_accounted,
    dagster_home,
    make_defs,
    open_instance,
    poll_until_settled,
    run_prompts,
    run_submit,
    statuses,
    submit,
    table_rows,
    tick_until_settled,
    write_table,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvid_dagster.catalog import CatalogWarning, KvidCatalog
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.poll import video_path
from kvid_dagster.project import KvidProject


class Redirector:
    """A storage front that answers every GET with a redirect, and remembers the headers."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(302)
                self.send_header("Location", owner.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def redirector() -> Iterator[Redirector]:
    front = Redirector("file://")
    yield front
    front.close()


def run_one(
    emulator: KvidEmulator, tmp_path: Path, **poll: Any
) -> tuple[KvidCatalog, list[Any], Path]:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a"]))
    catalog = KvidCatalog(tmp_path / "catalog", durable=False)
    videos = tmp_path / "videos"
    submit(emulator.base_url, catalog, rows)
    poll_until_settled(emulator.base_url, catalog, videos, **poll)
    return catalog, rows, videos


def test_a_redirect_to_storage_elsewhere_works_without_the_key(
    emulator_factory: EmulatorFactory, redirector: Redirector, tmp_path: Path
) -> None:
    emulator = emulator_factory(public_base_url=redirector.url)  # result URLs point at the front
    redirector.target = emulator.base_url  # ...which sends every download back to the emulator
    catalog, rows, _ = run_one(emulator, tmp_path)
    assert statuses(catalog) == {"a": "COMPLETED"}
    assert redirector.headers and all("api-key" not in h for h in redirector.headers)
    assert_accounted(emulator.jobs, catalog, rows)


@pytest.mark.parametrize("where", ["a non-http result URL", "a redirect to file://"])
def test_downloads_only_follow_http(
    where: str, emulator_factory: EmulatorFactory, redirector: Redirector, tmp_path: Path
) -> None:
    base = "ftp://127.0.0.1:21" if where == "a non-http result URL" else redirector.url
    emulator = emulator_factory(public_base_url=base)
    catalog, rows, videos = run_one(emulator, tmp_path, job_deadline_s=1.0)
    record = catalog.get("a")
    assert record is not None and record["status"] == "TIMED_OUT"  # fetched until the deadline
    assert "http(s)" in record["error"] or "UnsupportedProtocol" in record["error"]
    assert not videos.exists() or list(videos.iterdir()) == []
    assert_accounted(emulator.jobs, catalog, rows)


def test_downloads_are_size_capped_and_leave_nothing_behind(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    catalog, rows, videos = run_one(
        emulator, tmp_path, job_deadline_s=1.0, max_download_bytes=10_000
    )
    record = catalog.get("a")
    assert record is not None and record["status"] == "TIMED_OUT"
    assert "max_bytes=10000" in record["error"]
    assert list(videos.iterdir()) == []  # no partial file, no temp file
    assert_accounted(emulator.jobs, catalog, rows)


def test_a_symlink_in_the_download_folder_is_not_followed_out_of_it(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"precious")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").symlink_to(outside)
    catalog, rows, _ = run_one(emulator, tmp_path, job_deadline_s=1.0)
    assert outside.read_bytes() == b"precious"
    record = catalog.get("a")
    assert record is not None and record["status"] == "TIMED_OUT" and "escapes" in record["error"]
    assert_accounted(emulator.jobs, catalog, rows)


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=80))
def test_a_video_path_never_leaves_the_download_folder(key: str) -> None:
    folder = Path("/srv/kvid/videos")
    path = video_path(folder, key)
    assert path.parent == folder and path.suffix == ".mp4"
    assert not path.name.startswith(".")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "..", ".", "", "~root"])
def test_path_like_keys_become_hashed_names(key: str, tmp_path: Path) -> None:
    path = video_path(tmp_path, key)
    assert path.parent == tmp_path.resolve() and path.name.startswith("key-")


def test_a_damaged_catalog_part_is_set_aside_and_the_run_goes_on(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    keys = ["a", "b"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    project = KvidProject(prompts, tmp_path / "data")
    catalog = project.catalog()
    defs = make_defs(emulator.base_url, prompts, project.data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        catalog.compact()
        # a part that a broken disk or a foreign tool left with a valid name, and a published
        # snapshot cut in half
        (catalog.root / "_log" / "videos" / "9999999999999990-1-deadbeef.parquet").write_bytes(
            b"PAR1 not really"
        )
        snapshot = catalog.root / "videos" / "data.parquet"
        snapshot.write_bytes(snapshot.read_bytes()[:100])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_submit(defs, instance, "a", "b")
            tick_until_settled(defs, instance, catalog)
            assert statuses(catalog) == {"a": "COMPLETED", "b": "COMPLETED"}
            assert_accounted(emulator.jobs, catalog, table_rows(prompts), quarantined=None)
        assert any(issubclass(w.category, CatalogWarning) for w in caught)
        assert emulator.jobs_created == 2
        quarantine = sorted(p.name for p in (catalog.root / "_quarantine").iterdir())
        assert any("deadbeef" in name for name in quarantine)  # the part
        assert any(name.startswith("videos-data.parquet") for name in quarantine)  # the snapshot
