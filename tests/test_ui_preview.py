"""The Dagster UI as a person sees it: `dagster dev` on a free port, Debian's Chromium through
Playwright, over five videos finished against the emulator: a ``kvid_videos`` partition shows
its poster first, without scrolling, and names the run that submitted it; ``kvid_catalog``
shows the Parquet's row count; a UI backfill is one run per unbroken stretch of partitions.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; Playwright's own browser
downloads are never used). Without it the tests skip locally and fail under CI (``CI`` set),
where ``.ci/run`` installs it. Screenshots are kept in ``$KVID_TEST_ARTIFACTS`` (else the
test's tmp_path) and their paths printed. One `dagster dev` serves the whole module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from conftest import REPO_ROOT, TEST_API_KEY, fast_config
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_dagster_dev import free_port
from test_previews import Finished, finish_videos

from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger

CHROMIUM = Path("/usr/bin/chromium")
KEYS = ["clip-a", "clip-b", "clip-c", "clip-d", "clip-e"]
KEY = KEYS[0]
WINDOW = {"width": 1500, "height": 950}


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("KVID_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _restore_signals() -> None:
    # an inherited ignored SIGINT is copied to SIGTERM by dagster dev: give it the defaults
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass(frozen=True)
class DevServer:
    base: str
    finished: Finished
    emulator: KvidEmulator

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        answer = httpx.post(
            f"{self.base}/graphql", json={"query": query, "variables": variables}, timeout=30
        ).json()
        assert "errors" not in answer, answer
        return dict(answer["data"])


@pytest.fixture(scope="module")
def dagster_dev(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """`dagster dev` of the project's workspace over a DAGSTER_HOME holding five finished
    videos (submitted by one run, materialized by the status sensor's logic against the
    emulator)."""
    folder = tmp_path_factory.mktemp("ui")
    with KvidEmulator(fast_config()) as emulator:
        finished = finish_videos(emulator.base_url, folder, KEYS)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_"))}
        env |= {
            "DAGSTER_HOME": str(finished.home),
            "KVID_PROMPTS": str(finished.prompts),
            "KVID_DATA_DIR": str(finished.data_dir),
            "KVID_BASE_URL": emulator.base_url,
            "KVID_API_KEY": TEST_API_KEY,
        }
        log_path = folder / "dagster-dev.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
             "-p", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_restore_signals, start_new_session=True,
        )  # fmt: skip
        server = DevServer(f"http://127.0.0.1:{port}", finished, emulator)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "dagster dev did not serve the definitions"
                try:
                    if server.graphql("{ assetNodes { id } }").get("assetNodes"):
                        break
                except (httpx.HTTPError, json.JSONDecodeError, AssertionError):
                    pass
                time.sleep(0.2)
            yield server
        finally:
            process.terminate()  # dagster dev stops its webserver, daemon and code servers
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            log.close()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page = browser.new_page(viewport=WINDOW)
    # `dagster dev` offers to join its community in a modal that comes whenever the page is
    # ready, over what the test clicks: "Skip" it each time it shows
    page.add_locator_handler(
        page.get_by_text("Join the Dagster community"),
        lambda _: page.get_by_role("button", name="Skip").click(),
    )
    try:
        yield page
    finally:
        page.close()


def _screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path))  # the window, as a person sees it
    print(f"screenshot: {path}")


def _partition_page(page: Page, server: DevServer, key: str) -> None:
    page.goto(f"{server.base}/assets/kvid_videos?view=partitions&partition={key}")


def _metadata_row(page: Page, label: str) -> Any:
    return page.locator("tr", has=page.get_by_text(label, exact=True)).first


def test_a_videos_partition_shows_its_poster_first_without_scrolling(
    dagster_dev: DevServer, page: Page, artifacts: Path
) -> None:
    screenshot = artifacts / "kvid_videos-poster.png"
    _partition_page(page, dagster_dev, KEY)
    poster = page.locator('img[alt="poster"][src^="data:image/webp;base64,"]')
    try:
        # the first metadata row, rendered in place (no "[Show Markdown]" to click)
        expect(poster).to_be_visible(timeout=60_000)
        page.wait_for_function("img => img.complete", arg=poster.element_handle())
        natural = poster.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        box = poster.bounding_box()
    finally:
        _screenshot(page, screenshot)
    first_row = page.locator("tr", has=poster).first
    assert first_row.locator("td").first.inner_text().strip() == "poster"
    assert page.evaluate("[window.scrollX, window.scrollY]") == [0, 0]
    # the whole poster is inside the 1500x950 window, unscrolled, and not clipped
    assert box is not None
    assert box["x"] >= 0 and box["y"] >= 0, box
    assert box["x"] + box["width"] <= WINDOW["width"], box
    assert box["y"] + box["height"] <= WINDOW["height"], box
    expect(poster).to_be_in_viewport(ratio=1.0)
    assert natural[0] >= 200 and natural[0] / natural[1] == pytest.approx(854 / 480, 0.02)
    assert (box["width"], box["height"]) == (natural[0], natural[1])  # shown at its size
    assert screenshot.stat().st_size > 10_000


def test_a_videos_partition_shows_its_animated_preview_behind_a_link(
    dagster_dev: DevServer, page: Page, artifacts: Path
) -> None:
    screenshot = artifacts / "kvid_videos-preview.png"
    _partition_page(page, dagster_dev, KEY)
    # the metadata table shows a long Markdown value behind this link, and renders it
    # (react-markdown: data: images allowed) in a dialog
    row = _metadata_row(page, "preview")
    image = page.get_by_role("dialog").locator('img[src^="data:image/webp;base64,"]')
    try:
        row.get_by_text("[Show Markdown]").click(timeout=60_000)
        image.wait_for(state="visible", timeout=30_000)
        page.wait_for_function("img => img.complete", arg=image.element_handle())
        natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    finally:
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"screenshot: {screenshot}")
    assert image.get_attribute("alt") == f"preview of {KEY}"
    assert natural == [320, 180]  # the browser decoded the WebP (854x480, long side 320)


def test_a_videos_partition_links_its_submitting_run_and_its_kept_copy(
    dagster_dev: DevServer, page: Page, artifacts: Path
) -> None:
    row = Ledger.for_data_dir(dagster_dev.finished.data_dir).row(KEY)
    assert row is not None and row.submission is not None and row.submission.owner is not None
    run_id = row.submission.owner.run_id
    assert run_id
    _partition_page(page, dagster_dev, KEY)
    submitting = _metadata_row(page, "submitting_run")
    link = submitting.get_by_role("link", name=run_id)
    expect(link).to_be_visible(timeout=60_000)
    # the service's URL is text, not a link that dies; the kept copy is the URI
    url = _metadata_row(page, "url")
    expect(url).to_contain_text(str(row.video.url))
    assert url.locator("a").count() == 0
    expect(_metadata_row(page, "dagster/uri")).to_contain_text(str(row.video.local_path))
    link.click()
    expect(page).to_have_url(re.compile(f"/runs/{run_id}"), timeout=30_000)
    expect(page.get_by_text("kvid_submit_job").first).to_be_visible(timeout=60_000)
    _screenshot(page, artifacts / "submitting-run.png")


def test_the_catalog_page_shows_the_parquets_row_count(
    dagster_dev: DevServer, page: Page, artifacts: Path
) -> None:
    catalog_dir = dagster_dev.finished.data_dir / "catalog"
    rows = len(pd.read_parquet(catalog_dir / "videos"))
    assert rows == len(KEYS)
    page.goto(f"{dagster_dev.base}/assets/kvid_catalog")
    heading = page.get_by_text("Row count", exact=True)
    try:
        expect(heading).to_be_visible(timeout=60_000)
    finally:
        _screenshot(page, artifacts / "kvid_catalog.png")
    # the heading and its value, side by side
    expect(heading.locator("xpath=..")).to_have_text(re.compile(rf"^Row count\s*{rows}$"))
    expect(page.get_by_text("Never materialized")).to_have_count(0)
    # the definition's "Storage" shows where the files are (a path value came out blank)
    expect(page.get_by_text(str(catalog_dir), exact=True)).to_be_visible()


LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
BACKFILL_RUNS = """
query ($id: String!, $tags: [ExecutionTag!]) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: $tags}) {
    ... on Runs { results { status tags { key value } } }
  }
}
"""
# a backfill is done once it is in none of these
BACKFILL_BUSY = {"REQUESTED", "CANCELING"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def _launch_backfill(server: DevServer, keys: list[str]) -> str:
    """What the UI's "Launch backfill" sends for these partitions of ``kvid_video_jobs``
    (its job is the asset's first: a hidden asset job gets no partition-set selector)."""
    data = server.graphql(
        '{ assetNodeOrError(assetKey: {path: ["kvid_video_jobs"]}) '
        "{ ... on AssetNode { jobNames } } }"
    )
    job = data["assetNodeOrError"]["jobNames"][0]
    params: dict[str, Any] = {
        "tags": [],
        "assetSelection": [{"path": ["kvid_video_jobs"]}],
        "partitionNames": keys,
        "fromFailure": False,
    }
    if not job.startswith("__ASSET_JOB"):
        params["selector"] = {
            "partitionSetName": f"{job}_partition_set",
            "repositorySelector": {
                "repositoryLocationName": "kvid_dagster",
                "repositoryName": "__repository__",
            },
        }
    answer = server.graphql(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    return str(answer["backfillId"])


def _backfill_ranges(server: DevServer, backfill_id: str) -> list[tuple[str, str]]:
    """The partition range of each run the backfill made, once it and they are done."""
    deadline = time.monotonic() + 300
    while True:
        data = server.graphql(
            BACKFILL_RUNS, id=backfill_id, tags=[{"key": "dagster/backfill", "value": backfill_id}]
        )
        status = data["partitionBackfillOrError"]["status"]
        runs = data["runsOrError"]["results"]
        if status not in BACKFILL_BUSY and runs and all(r["status"] in RUN_DONE for r in runs):
            break
        assert time.monotonic() < deadline, (status, runs)
        time.sleep(0.25)
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
    return sorted((t[RANGE_START_TAG], t[RANGE_END_TAG]) for t in tags)


def test_a_ui_backfill_is_one_run_per_unbroken_stretch_of_its_partitions(
    dagster_dev: DevServer,
) -> None:
    """What the README says: all partitions (or a range) is one run; a selection with gaps is
    one run per unbroken stretch, in the order the partitions were added."""
    whole = _launch_backfill(dagster_dev, KEYS)
    gaps = _launch_backfill(dagster_dev, ["clip-b", "clip-d", "clip-e"])
    assert _backfill_ranges(dagster_dev, whole) == [("clip-a", "clip-e")]
    assert _backfill_ranges(dagster_dev, gaps) == [("clip-b", "clip-b"), ("clip-d", "clip-e")]
    # every partition had its job: the three runs paid nothing
    assert dagster_dev.emulator.jobs_created == len(KEYS)
