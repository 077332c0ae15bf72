"""The preview as a person sees it: `dagster dev` on a free port, Debian's Chromium through
Playwright, a partition of ``kvid_videos`` whose preview image must be rendered.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; Playwright's own browser
downloads are never used). Without it the test skips locally and fails under CI (``CI`` set),
where ``.ci/run`` installs it. The screenshot is kept in ``$KVID_TEST_ARTIFACTS`` (else the
test's tmp_path) and its path printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT, TEST_API_KEY, EmulatorFactory
from playwright.sync_api import Page, sync_playwright
from test_dagster_dev import free_port
from test_previews import finish_videos

CHROMIUM = Path("/usr/bin/chromium")
KEY = "clip-a"


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def _restore_signals() -> None:
    # an inherited ignored SIGINT is copied to SIGTERM by dagster dev: give it the defaults
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def dagster_dev(tmp_path: Path, emulator_factory: EmulatorFactory) -> Iterator[str]:
    """`dagster dev` of the project's workspace over a DAGSTER_HOME holding one finished video
    (materialized by the status sensor's logic against the emulator); yields its base URL."""
    emulator = emulator_factory()
    finished = finish_videos(emulator.base_url, tmp_path, [KEY])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(finished.home),
        "KVID_PROMPTS": str(finished.prompts),
        "KVID_DATA_DIR": str(finished.data_dir),
        "KVID_BASE_URL": emulator.base_url,
        "KVID_API_KEY": TEST_API_KEY,
    }
    log = (tmp_path / "dagster-dev.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_restore_signals, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "dagster-dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not serve the definitions"
            try:
                answer = httpx.post(
                    f"{base}/graphql", json={"query": "{ assetNodes { id } }"}, timeout=5
                ).json()
                if (answer.get("data") or {}).get("assetNodes"):
                    break
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()  # dagster dev stops its webserver, daemon and code servers
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _skip_the_welcome(page: Page) -> None:
    """`dagster dev` offers to join its community in a modal that comes whenever the page is
    ready, over what the test clicks: "Skip" it each time it shows."""
    page.add_locator_handler(
        page.get_by_text("Join the Dagster community"),
        lambda _: page.get_by_role("button", name="Skip").click(),
    )


def test_a_videos_partition_shows_its_preview_in_the_dagster_ui(
    dagster_dev: str, chromium: Path, tmp_path: Path
) -> None:
    artifacts = Path(os.environ.get("KVID_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "kvid_videos-preview.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _skip_the_welcome(page)
            page.goto(f"{dagster_dev}/assets/kvid_videos?view=partitions&partition={KEY}")
            # the partition's metadata table shows a Markdown value behind this link, and renders
            # it (react-markdown: data: images allowed) in a dialog
            row = page.locator("tr", has=page.get_by_text("preview", exact=True)).first
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
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
