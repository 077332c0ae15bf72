"""The `kvid-dagster` commands that are not the pipeline: generate and resolve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IMAGES_DIR

from kvid_dagster.catalog import KvidCatalog
from kvid_dagster.probe import probe_video


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVID_")}
    return subprocess.run(
        [sys.executable, "-m", "kvid_dagster.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_generate_one_video_end_to_end_on_the_embedded_emulator(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    done = cli(
        "generate", "--prompt", "A lighthouse at dusk", "--resolution", "480p",
        "--aspect-ratio", "9:16", "--num-frames", "85", "--fps", "12", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "embedded emulator" in done.stderr
    assert "COMPLETED" in done.stderr  # the progress line reached the end
    probe = probe_video(out)
    assert (probe.width, probe.height, probe.num_frames) == (480, 854, 85)
    assert probe.fps == pytest.approx(12)
    assert str(out) in done.stdout


def test_generate_image_to_video_v2_from_a_local_image(tmp_path: Path) -> None:
    out = tmp_path / "tiger.mp4"
    done = cli(
        "generate", "--prompt", "The tiger blinks", "--image", str(IMAGES_DIR / "tiger.jpg"),
        "--model", "v2", "--resolution", "480p", "--aspect-ratio", "1:1", "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "image-to-video v2" in done.stderr
    probe = probe_video(out)
    assert (probe.width, probe.height, probe.num_frames) == (480, 480, 120)  # 24 fps x 5 s


def test_generate_rejects_bad_input_before_anything_is_sent(tmp_path: Path) -> None:
    done = cli(
        "generate", "--prompt", "x", "--model", "v2", "--num-frames", "90",
        "--out", str(tmp_path / "x.mp4"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "num_frames" in done.stderr
    assert "embedded emulator" not in done.stderr  # rejected before any service was started
    assert not (tmp_path / "x.mp4").exists()


def test_resolve_settles_an_uncertain_row(tmp_path: Path) -> None:
    catalog = KvidCatalog(tmp_path / "data" / "catalog")
    catalog.update_many(
        [
            {"partition_key": "a", "status": "UNCERTAIN", "request_hash": "h1", "attempts": 1},
            {"partition_key": "b", "status": "UNCERTAIN", "request_hash": "h2", "attempts": 1},
            {"partition_key": "c", "status": "COMPLETED", "request_id": "req_c"},
        ]
    )
    data = str(tmp_path / "data")
    found = cli("resolve", "a", "--request-id", "req_found", "--data-dir", data, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    released = cli(
        "resolve", "b", "--note", "not on the dashboard", "--data-dir", data, cwd=tmp_path
    )
    assert released.returncode == 0, released.stderr
    refused = cli("resolve", "c", "--data-dir", data, cwd=tmp_path)
    assert refused.returncode == 2 and "not UNCERTAIN" in refused.stderr
    rows = catalog.records_by_key()
    assert (rows["a"]["status"], rows["a"]["request_id"]) == ("SUBMITTED", "req_found")
    assert rows["b"]["status"] == "PENDING" and rows["b"]["request_id"] is None
    assert rows["c"]["status"] == "COMPLETED"
    history = catalog.submissions()
    resolved = history[history["event"] == "RESOLVED"].set_index("partition_key")
    assert set(resolved.index) == {"a", "b"}
    assert resolved.loc["b", "error"] == "not on the dashboard"
