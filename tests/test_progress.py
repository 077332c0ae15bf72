"""The progress of `kvid-dagster run`: the record, its ETA and errors, the two displays, and
the command itself on a pipe and on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import itertools
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import TEST_API_KEY, EmulatorFactory, fast_config
from rich.console import Console

from kvid_dagster.cli.main import job_status_line
from kvid_dagster.cli.progress import (
    LiveDisplay,
    Phase,
    PlainDisplay,
    ProgressTracker,
    RunProgress,
    display_for,
    estimate_eta,
    shorten,
)
from kvid_dagster.client import JobStatus
from kvid_dagster.ledger import VideoRow, VideoStatus

CLI = Path(sys.executable).parent / "kvid-dagster"
KEYS = ["alpha", "bravo", "charlie", "delta"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(key: str, status: VideoStatus, error: str | None, at_s: float) -> VideoRow:
    return VideoRow(
        partition_key=key,
        prompt="p",
        job_kind="text-to-video",
        model="v1",
        request_hash=f"h-{key}",
        params_json="{}",
        status=status,
        error=error,
        updated_at=T0 + timedelta(seconds=at_s),
    )


def test_eta_is_unknown_before_a_row_finishes_and_follows_the_rate_after() -> None:
    assert estimate_eta(0, 5, 30.0) is None
    assert estimate_eta(2, 3, 10.0) == pytest.approx(15.0)  # 5 s a row, 3 rows left
    assert estimate_eta(4, 0, 10.0) == 0.0


def test_the_tracker_counts_only_this_runs_rows_into_the_rate() -> None:
    clock = Clock()
    tracker = ProgressTracker(clock)
    before = {VideoStatus.COMPLETED: 2, VideoStatus.PENDING: 4}
    assert tracker.progress(Phase.VALIDATING, before).eta_s is None
    clock.now += 5  # the rate starts with the work, not with validating
    first = tracker.progress(Phase.SUBMITTING, before, 0.0, "run 1/1")
    assert first.eta_s is None  # the two rows done before this run give no rate
    assert (first.done, first.total, first.detail) == (2, 6, "run 1/1")
    clock.now += 10
    counts = {
        VideoStatus.COMPLETED: 3,
        VideoStatus.FAILED: 1,
        VideoStatus.PROCESSING: 1,
        VideoStatus.PENDING: 1,  # left by a budget: nothing polls it
    }
    polling = tracker.progress(Phase.POLLING, counts, 120.0)
    assert polling.eta_s == pytest.approx(5.0)  # 2 rows in 10 s, 1 still running
    assert polling.elapsed_s == pytest.approx(15.0)
    assert polling.credits_spent == 120.0
    assert polling.done == 3 and polling.total == 6
    # while submitting, a PENDING row is still to come and counts into the ETA
    assert tracker.progress(Phase.SUBMITTING, counts).eta_s == pytest.approx(10.0)


def test_the_latest_errors_are_three_newest_first_shortened_and_cleared() -> None:
    tracker = ProgressTracker(Clock())
    long_error = "boom\n  Traceback line " + "x" * 200
    tracker.see_rows(
        [
            row("e", VideoStatus.FAILED, "fifth", 50),
            row("a", VideoStatus.INVALID, "first", 10),
            row("c", VideoStatus.LOST, "third", 30),
            row("b", VideoStatus.FAILED, "second", 20),
            row("d", VideoStatus.FAILED, long_error, 40),
            row("ok", VideoStatus.COMPLETED, None, 60),
        ]
    )
    errors = tracker.progress(Phase.POLLING, {VideoStatus.FAILED: 5}).errors
    assert [key for key, _ in errors] == ["e", "d", "c"]
    message = dict(errors)["d"]
    assert "\n" not in message and len(message) == 80 and message.endswith("...")
    assert message.startswith("boom Traceback line xxx")
    # e is re-sent and completes: its error goes; a later failure of b comes first
    tracker.see_rows(
        [row("e", VideoStatus.COMPLETED, None, 70), row("b", VideoStatus.FAILED, "again", 80)]
    )
    errors = tracker.progress(Phase.POLLING, {VideoStatus.FAILED: 4}).errors
    assert errors == (("b", "again"), ("d", message), ("c", "third"))
    assert shorten("a  b\tc") == "a b c"


def progress(completed: int = 3, processing: int = 2, elapsed: float = 12.0) -> RunProgress:
    return RunProgress(
        phase=Phase.POLLING,
        counts={VideoStatus.COMPLETED: completed, VideoStatus.PROCESSING: processing},
        credits_spent=120.0,
        elapsed_s=elapsed,
        eta_s=20.0,
        errors=(("bravo", "the service said: out of memory"),),
    )


def test_the_plain_display_prints_a_line_per_change_and_none_without_one() -> None:
    out = io.StringIO()
    with PlainDisplay(out) as display:
        for tick in range(10):  # the clock moves; the counts do not
            display.update(progress(elapsed=12.0 + tick))
        assert out.getvalue().count("\n") == 1
        display.update(progress(completed=4, processing=1))
        display.update(progress(completed=4, processing=1))
        display.note("  run 1234abcd failed: out of credit")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, note = lines
    assert "[polling] done 3/5" in first and "COMPLETED 3  PROCESSING 2" in first
    assert "credits 120" in first and "eta 20s" in first
    assert "latest error bravo: the service said: out of memory" in first
    assert "done 4/5" in second and "latest error" not in second  # said once, not per line
    assert note == "  run 1234abcd failed: out of credit"


def test_the_live_display_draws_counts_totals_credits_eta_and_errors() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with LiveDisplay(console) as display:
        display.note("validating p.csv")
        display.update(progress())
        display.update(replace(progress(), phase=Phase.DONE))
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with a terminal's escapes
    plain = ANSI.sub("", text)
    assert "validating p.csv" in plain
    last = plain[plain.rindex("kvid-dagster run: done") :]  # the state left on screen
    assert "done 3/5" in last and "credits 120" in last and "eta 20s" in last
    assert re.search(r"COMPLETED\s+.*PROCESSING", last)
    assert re.search(r"^\W*3\s+2\W*$", last, re.MULTILINE)
    assert "bravo: the service said: out of memory" in last


def _read_all(master: int) -> bytes:
    """What is written to the pseudo-terminal so far (a read may return only part of it)."""
    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        chunks.append(os.read(master, 65536))
    return b"".join(chunks)


def test_display_for_picks_plain_off_a_terminal_or_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(display_for(io.StringIO()), PlainDisplay)
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as terminal:
            monkeypatch.setenv("TERM", "xterm")
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 70, 0, 0))
            with display_for(terminal) as live:  # its own handle on the terminal, sized by it
                assert isinstance(live, LiveDisplay)
                live.update(progress())
            drawn = ANSI.sub("", _read_all(master).decode())
            assert {len(line) for line in drawn.splitlines() if line.startswith("╰")} == {70}
            assert isinstance(display_for(terminal, plain=True), PlainDisplay)
            monkeypatch.setenv("TERM", "dumb")
            assert isinstance(display_for(terminal), PlainDisplay)
    finally:
        os.close(master)
        os.close(slave)


JOB_STATUSES = [
    JobStatus("IN_QUEUE"),
    JobStatus("PROCESSING", progress=40, logs=("[step] rendering",)),
    JobStatus("PROCESSING", progress=40, logs=("[step] rendering",)),  # no change: no line
    JobStatus("COMPLETED", progress=100),
]


def test_generates_status_line_off_a_terminal_is_a_line_per_change() -> None:
    out = io.StringIO()
    with job_status_line(out) as show:
        for status in JOB_STATUSES:
            show(status)
    assert out.getvalue().splitlines() == [
        "IN_QUEUE         -  ",
        "PROCESSING   40.0%  [step] rendering",
        "COMPLETED   100.0%  ",
        "",
    ]


def test_generates_status_line_on_a_terminal_is_redrawn_by_rich(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as terminal:
            monkeypatch.setenv("TERM", "xterm")
            with job_status_line(terminal) as show:
                for status in JOB_STATUSES:
                    show(status)
            drawn = _read_all(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "\x1b[?25l" in drawn  # rich's live region: the cursor hidden while it redraws
    assert "[step] rendering" in drawn  # the server's log as text, not taken for markup
    assert ANSI.sub("", drawn).rstrip().endswith("COMPLETED   100.0%")


def _table(tmp_path: Path) -> Path:
    table = tmp_path / "prompts.csv"
    lines = ["prompt_id,prompt,resolution"] + [f"{k},A {k} kite over a beach,480p" for k in KEYS]
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


def _command(tmp_path: Path) -> list[str]:
    return [
        str(CLI), "run", "--prompts", str(_table(tmp_path)), "--data-dir",
        str(tmp_path / "data"), "--poll-interval", "0.2", "--no-download",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    return env | extra


def test_kvid_dagster_run_off_a_terminal_prints_a_line_per_change(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    # one job at a time, 3 s each: many status ticks, few changes of the counts
    emulator = emulator_factory(fast_config(workers=1, job_duration=3.0))
    env = _env(KVID_BASE_URL=emulator.base_url, KVID_API_KEY=TEST_API_KEY)
    done = subprocess.run(
        _command(tmp_path), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\x1b[" not in done.stderr  # no live drawing on a pipe
    progress_lines = [line for line in done.stderr.splitlines() if line.startswith("  [")]
    ticks = int(re.search(r"(\d+) status ticks", done.stdout).group(1))  # type: ignore[union-attr]
    polling = [line for line in progress_lines if line.startswith("  [polling]")]
    assert len(polling) >= 2, progress_lines  # the counts moved while polling ...
    assert len(polling) < ticks, (ticks, progress_lines)  # ... not on every tick
    assert any(re.search(r"eta \d+s", line) for line in polling)  # once a row had finished
    # a line only when the phase or the counts changed, never the same state twice in a row
    states = [(line.split("]")[0], line.rpartition("  |  ")[2]) for line in progress_lines]
    assert all(a != b for a, b in itertools.pairwise(states)), progress_lines
    assert progress_lines[-1].startswith("  [done] done 4/4")
    assert progress_lines[-1].endswith("COMPLETED 4")
    for key in KEYS:  # no line per job: the rows are named only in the summary (stdout)
        assert key not in done.stderr
        assert key in done.stdout
    assert "polled " not in done.stderr  # the sensor's line per tick is not shown


def test_kvid_dagster_run_on_a_terminal_draws_one_live_display(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = _env(TERM="xterm-256color", COLUMNS="100", LINES="40")
    child = subprocess.Popen(
        _command(tmp_path), env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave,
        stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif child.poll() is not None:
                break
        returncode = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert returncode == 0, text[-3000:]
    assert "\x1b[?25l" in text  # rich's live region: the cursor hidden while it redraws ...
    assert re.search(r"\x1b\[\d*A", text)  # ... moved up over the last drawing
    plain = ANSI.sub("", text)
    assert "[polling]" not in plain  # no plain progress lines on a terminal
    last = plain[plain.rindex("kvid-dagster run: done") :]
    assert "done 4/4" in last
    assert "COMPLETED" in last  # the final counts stay on screen
    assert re.search(r"^\W*4\W*$", last, re.MULTILINE)
    assert "status ticks" in last  # and the summary follows them
    widths = {len(line) for line in plain.splitlines() if line.startswith("╰")}
    assert widths == {100}  # the terminal's width, also while a Dagster step had the streams
    logs = [
        p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.suffix in {".err", ".out"}
    ]
    assert logs and not any("kvid-dagster run:" in p.read_text(errors="replace") for p in logs)
