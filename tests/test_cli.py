"""The `kvid-dagster` commands that are not the pipeline (generate, resolve, refetch, help),
and what every command says when a user's input is wrong: one line, no stack trace."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import IMAGES_DIR

from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.ledger import (
    ClaimOwner,
    JobChange,
    Ledger,
    Submission,
    VideoStatus,
    submissions_frame,
)
from kvid_dagster.media.probe import probe_video


def cli(
    *args: str, cwd: Path, timeout: float = 180, **kvid_env: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVID_")} | kvid_env
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
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a file like any other, not 0600


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


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """A user's mistake: exit 2, nothing on stdout, one line on stderr, no stack trace."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_misspelt_column_is_one_line_and_a_stack_trace_only_with_verbose(
    tmp_path: Path,
) -> None:
    table = tmp_path / "p.csv"
    table.write_text("prompt_id,prompt,seeds\na,A fox,7\n", encoding="utf-8")
    line = one_line(cli("run", "--prompts", str(table), "--data-dir", "d", cwd=tmp_path))
    assert line.startswith("kvid-dagster run: prompt table")
    assert "column 'seeds' looks like the kvid field 'seed'" in line
    assert not (tmp_path / "d").exists()  # refused before anything started
    verbose = cli("run", "--prompts", str(table), "--verbose", cwd=tmp_path)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line
    estimate = one_line(cli("estimate", "--prompts", str(table), cwd=tmp_path))
    assert "'seeds'" in estimate


def test_bad_flags_a_missing_table_and_a_missing_key_are_one_line_each(tmp_path: Path) -> None:
    assert "'-5' is not a number of credits" in one_line(
        cli("run", "--budget-credits", "-5", cwd=tmp_path)
    )
    assert "unrecognized arguments: --seeds" in one_line(cli("run", "--seeds", cwd=tmp_path))
    missing = one_line(cli("run", "--prompts", "nowhere.csv", cwd=tmp_path))
    assert "nowhere.csv does not exist" in missing
    table = tmp_path / "p.csv"
    table.write_text("prompt_id,prompt\na,A fox\n", encoding="utf-8")
    no_key = cli("run", "--prompts", str(table), cwd=tmp_path, KVID_BASE_URL="http://127.0.0.1:9")
    assert "KVID_BASE_URL is set but KVID_API_KEY is not" in one_line(no_key)
    dev = one_line(cli("dev", "--prompts", "nowhere.csv", cwd=tmp_path))
    assert dev.startswith("kvid-dagster dev: prompt table") and "does not exist" in dev


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed when the socket is: nothing listens


def test_an_unreachable_service_is_said_once_and_the_summary_is_in_table_order(
    tmp_path: Path,
) -> None:
    """The run's failure is one message (Dagster's own log lines and stack traces are not
    printed); stdout is the summary, rows in the table's order with their notes in full."""
    table = tmp_path / "p.csv"
    table.write_text(
        "prompt_id,prompt,resolution,num_frames\nzeta,A fox,480p,\nalpha,A cat,480p,\n"
        "mid,A dog,480p,5000\n",
        encoding="utf-8",
    )
    done = cli(
        "run", "--prompts", str(table), "--data-dir", "d", "--plain", cwd=tmp_path,
        KVID_BASE_URL=f"http://127.0.0.1:{closed_port()}", KVID_API_KEY="k",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    for noise in ("Traceback", "Stack Trace", " - dagster - ", "STEP_FAILURE"):
        assert noise not in done.stderr, done.stderr
    failures = [line for line in done.stderr.splitlines() if "failed in" in line]
    assert len(failures) == 1 and "failed in kvid_video_jobs: 2 of 2 partitions" in failures[0]
    assert done.stderr.count("ConnectError") >= 2  # each row named, in that one message
    rows = done.stdout.splitlines()
    assert rows[0].split() == [
        "partition_key", "status", "model", "width", "height", "fps", "num_frames", "size_kb",
        "note",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows[1:4]] == ["zeta", "alpha", "mid"]
    assert rows[3].endswith("num_frames=5000 is out of range: allowed 81–100")  # not cut
    assert rows[1].endswith("ConnectError: All connection attempts failed")


def test_help_names_the_command_its_defaults_and_where_things_go(tmp_path: Path) -> None:
    emulator = cli("emulator", "--help", cwd=tmp_path)
    assert emulator.returncode == 0
    assert emulator.stdout.startswith("usage: kvid-dagster emulator")
    assert "(default: 8765)" in emulator.stdout and "(default: 127.0.0.1)" in emulator.stdout
    generate = cli("generate", "--help", cwd=tmp_path).stdout
    assert "default: video.mp4 in the current folder" in " ".join(generate.split())
    dev = " ".join(cli("dev", "--help", cwd=tmp_path).stdout.split())
    assert "--port PORT the Dagster UI's port on localhost (default 3000)" in dev
