"""The `kvid-dagster` commands that are not the pipeline: generate and resolve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import IMAGES_DIR

from kvid_dagster.ledger import (
    ClaimOwner,
    JobChange,
    Ledger,
    Submission,
    VideoStatus,
    submissions_frame,
)
from kvid_dagster.probe import probe_video
from kvid_dagster.prompts import load_prompt_table


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


def claim(ledger: Ledger, row: object) -> Submission:
    claimed = ledger.claim(row, ClaimOwner.current(), cost_credits=1.0)  # type: ignore[arg-type]
    assert isinstance(claimed, Submission)
    return claimed


def test_resolve_settles_an_uncertain_row(tmp_path: Path) -> None:
    table = tmp_path / "p.csv"
    table.write_text(
        "prompt_id,prompt,resolution\na,First,480p\nb,Second,480p\nc,Third,480p\n",
        encoding="utf-8",
    )
    rows = {row.partition_key: row for row in load_prompt_table(table).rows}
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)
    ledger.register(list(rows.values()))
    for key in ("a", "b"):  # generates that may have created jobs whose ids we never got
        ledger.mark_uncertain(claim(ledger, rows[key]), "connection reset after sending")
    done = claim(ledger, rows["c"])
    ledger.record_submitted(done, "req_c")
    submitted = ledger.submission(done.submission_id)
    assert submitted is not None
    assert ledger.apply([JobChange(done.submission_id, submitted.version, VideoStatus.COMPLETED)])
    assert {k: r.status for k, r in ledger.rows_by_key().items()} == {
        "a": VideoStatus.UNCERTAIN,
        "b": VideoStatus.UNCERTAIN,
        "c": VideoStatus.COMPLETED,
    }

    data = str(data_dir)
    found = cli("resolve", "a", "--request-id", "req_found", "--data-dir", data, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "a: SUBMITTED req_found"
    released = cli(
        "resolve", "b", "--note", "not on the dashboard", "--data-dir", data, cwd=tmp_path
    )
    assert released.returncode == 0, released.stderr
    assert released.stdout.strip() == "b: PENDING"
    refused = cli("resolve", "c", "--data-dir", data, cwd=tmp_path)
    assert refused.returncode == 2 and "not UNCERTAIN" in refused.stderr

    rows_now = ledger.rows_by_key()
    assert rows_now["a"].status is VideoStatus.SUBMITTED
    assert rows_now["a"].request_id == "req_found"
    assert rows_now["a"].submission in ledger.jobs_to_poll()  # polled as usual from now on
    assert rows_now["b"].status is VideoStatus.PENDING and rows_now["b"].request_id is None
    assert rows_now["c"].status is VideoStatus.COMPLETED and rows_now["c"].request_id == "req_c"
    history = submissions_frame(ledger)
    resolved = history[history["event"] == "RESOLVED"].set_index("partition_key")
    assert set(resolved.index) == {"a", "b"}
    assert resolved.loc["a", "request_id"] == "req_found"
    assert resolved.loc["b", "error"] == "not on the dashboard"
    # the command republished the catalog: what pandas reads is the resolved state
    published = pd.read_parquet(data_dir / "catalog" / "videos").set_index("partition_key")
    assert published.loc["a", "status"] == "SUBMITTED"
    assert published.loc["a", "request_id"] == "req_found"
    assert published.loc["b", "status"] == "PENDING"
    published_history = pd.read_parquet(data_dir / "catalog" / "submissions")
    assert (published_history["event"] == "RESOLVED").sum() == 2


def test_refetch_makes_a_fetch_failed_row_fetching_again_and_refuses_others(
    tmp_path: Path,
) -> None:
    table = tmp_path / "p.csv"
    table.write_text("prompt_id,prompt,resolution\na,First,480p\nb,Second,480p\n", encoding="utf-8")
    rows = {row.partition_key: row for row in load_prompt_table(table).rows}
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)
    ledger.register(list(rows.values()))
    for key in ("a", "b"):
        sub = claim(ledger, rows[key])
        ledger.record_submitted(sub, f"req_{key}")
    a = next(s for s in ledger.submissions() if s.partition_key == "a")
    failed = JobChange(
        a.submission_id, a.version, VideoStatus.FETCH_FAILED, error="not a video", completed=True
    )
    assert ledger.apply([failed])
    data = str(data_dir)
    done = cli("refetch", "a", "--data-dir", data, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "a: FETCHING req_a"
    row = ledger.row("a")
    assert row is not None and row.submission in ledger.jobs_to_poll()
    refused = cli("refetch", "b", "--data-dir", data, cwd=tmp_path)
    assert refused.returncode == 2 and "not FETCH_FAILED" in refused.stderr
    history = submissions_frame(ledger)
    assert (history["event"] == "REFETCH").sum() == 1
