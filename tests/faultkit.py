"""Shared machinery of the fault-matrix tests (``tests/test_faults_*.py``).

The one question every fault test answers is :func:`assert_accounted`: after the fault and a
normal recovery, is every job the emulator created (every one that was billed) in the ledger
with its request_id, or is its submission UNCERTAIN holding what was sent; was no row sent
twice; and is the published catalog readable and right? The ``child_*`` functions run in
subprocesses that the tests SIGKILL (``python -c "import faultkit; faultkit.child_...(...)"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
from conftest import REPO_ROOT, TEST_API_KEY

from kvid_dagster.client import AsyncKvidClient
from kvid_dagster.client.video_requests import canonical_json
from kvid_dagster.core.poll import PollConfig, PollReport, poll_pending
from kvid_dagster.core.prompts import PromptRow, load_prompt_table
from kvid_dagster.core.submit import SubmitOutcome, submit_rows
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    ClaimRule,
    Ledger,
    VideoStatus,
    publish,
    submissions_frame,
    videos_frame,
)

TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# tables and clients


def write_table(
    path: Path, keys: Sequence[str], prompt: Callable[[str], str] | None = None
) -> Path:
    """A table of small, fast v1 480p jobs, one per key."""
    make = prompt or (lambda key: f"A quiet scene number {key}")
    lines = ["prompt_id,prompt,resolution,num_frames"]
    lines += [f"{key},{make(key)},480p,81" for key in keys]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def table_rows(path: Path) -> list[PromptRow]:
    table = load_prompt_table(path)
    assert table.invalid == []
    return table.rows


class RecordedSleep:
    """The client's ``sleep``: remembers every wait it was asked for and waits for none."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


def make_client(
    base_url: str,
    *,
    api_key: str = TEST_API_KEY,
    timeout: float = 5.0,
    sleep: Callable[[float], Any] | None = None,
    **kwargs: Any,
) -> AsyncKvidClient:
    """An async client whose retries do not wait (unless ``sleep`` says otherwise)."""
    return AsyncKvidClient(
        api_key, base_url, timeout=timeout, sleep=sleep or RecordedSleep(), **kwargs
    )


def submit(
    base_url: str, ledger: Ledger, rows: Sequence[PromptRow], **kwargs: Any
) -> list[SubmitOutcome]:
    """One submission run (``kwargs`` split between the client and ``submit_rows``;
    ``force=True`` is ``rule=ClaimRule(force=True)``)."""
    submit_keys = {"rule", "prices", "on_outcome", "generate_concurrency", "owner", "deadline"}
    if kwargs.pop("force", False):
        kwargs["rule"] = ClaimRule(force=True)
    client_kw = {k: v for k, v in kwargs.items() if k not in submit_keys}
    submit_kw = {k: v for k, v in kwargs.items() if k in submit_keys}

    async def go() -> list[SubmitOutcome]:
        async with make_client(base_url, **client_kw) as client:
            return await submit_rows(client, ledger, rows, **submit_kw)

    return asyncio.run(go())


def submitted(
    emulator: KvidEmulator, tmp_path: Path, keys: Sequence[str] = ("a",)
) -> tuple[Ledger, list[PromptRow]]:
    """A table of ``keys`` registered in a fresh ledger under ``tmp_path`` and submitted."""
    rows = table_rows(write_table(tmp_path / "prompts.csv", list(keys)))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    submit(emulator.base_url, ledger, rows)
    return ledger, rows


def poll_until_settled(
    base_url: str,
    ledger: Ledger,
    download_dir: Path,
    *,
    max_ticks: int = 60,
    pause: float = 0.1,
    **config: Any,
) -> list[PollReport]:
    """Poll ticks (the status sensor's logic) until every row with a request_id is settled."""
    client_kw = {k: config.pop(k) for k in ("timeout", "sleep", "max_retries") if k in config}
    poll_config = PollConfig(download_dir=download_dir, **config)
    reports: list[PollReport] = []

    async def tick() -> PollReport:
        async with make_client(base_url, **client_kw) as client:
            return await poll_pending(client, ledger, poll_config)

    for _ in range(max_ticks):
        reports.append(asyncio.run(tick()))
        if not waiting(ledger):
            return reports
        time.sleep(pause)
    raise AssertionError(f"jobs never settled: {waiting(ledger)}")


def poll_once(base_url: str, ledger: Ledger, download_dir: Path, **kwargs: Any) -> PollReport:
    """One status tick."""

    async def tick() -> PollReport:
        async with make_client(base_url) as client:
            return await poll_pending(client, ledger, PollConfig(download_dir, **kwargs))

    return asyncio.run(tick())


def waiting(ledger: Ledger) -> dict[str, str]:
    """Jobs still to poll (current and earlier requests of a row): claiming key -> status."""
    return {s.partition_key: s.status.value for s in ledger.jobs_to_poll()}


def statuses(ledger: Ledger) -> dict[str, str]:
    return {r.partition_key: r.status.value for r in ledger.rows()}


# ---------------------------------------------------------------------------------------------
# the end state


def assert_accounted(
    jobs: Mapping[str, Any],
    ledger: Ledger,
    rows: Sequence[PromptRow],
    *,
    allowed_jobs: Mapping[str, int] | None = None,
) -> None:
    """Every paid job accounted for, no duplicate generate, the catalog readable and right.

    ``jobs``: the emulator's jobs (``emulator.jobs``, or a snapshot taken before it forgot them).
    ``allowed_jobs``: rows that may have more than one job (a forced or retried submission).
    """
    by_body = {canonical_json(row.request.to_body()): row for row in rows}
    submissions = ledger.submissions()
    history = submissions_frame(ledger)
    recorded = {s.request_id for s in submissions if s.request_id}
    recorded |= set(history["request_id"].dropna())
    per_row: Counter[str] = Counter()
    for request_id, job in jobs.items():
        row = by_body.get(canonical_json(dict(job.body)))
        assert row is not None, f"{request_id} was sent with a body no row asked for"
        per_row[row.partition_key] += 1
        if request_id in recorded:
            continue
        # a job nobody recorded: a submission of its request must say so, holding what was sent
        unknown = [
            s
            for s in submissions
            if s.request_hash == row.request_hash
            and s.request_id is None
            and s.status in {VideoStatus.UNCERTAIN, VideoStatus.SUBMITTING}
        ]
        assert unknown, (request_id, [(s.status, s.request_id) for s in submissions])
        assert unknown[0].prompt == row.prompt and unknown[0].params_json == row.params_json
    for key, count in per_row.items():  # no duplicate generate
        assert count <= (allowed_jobs or {}).get(key, 1), f"{key} was sent {count} times"
    for sub in submissions:  # and no made-up request_id
        if sub.request_id:
            assert sub.request_id in jobs, (sub.partition_key, sub.request_id)
    assert_catalog_right(ledger)


def assert_catalog_right(ledger: Ledger, catalog_dir: Path | None = None) -> None:
    """The published catalog, read back by pandas, equals the ledger; nothing lost in it."""
    with tempfile.TemporaryDirectory() as scratch:
        root = catalog_dir or Path(scratch)
        publish(ledger, root)
        published = pd.read_parquet(root / "videos")
        pd.testing.assert_frame_equal(published, videos_frame(ledger))
        history = pd.read_parquet(root / "submissions")
        assert len(history) == len(submissions_frame(ledger))
        assert history["event_id"].is_unique
        # the history's credits are the jobs' (a claim in flight counts once settled): no job
        # counted twice, none left out
        jobs = [s for s in ledger.submissions() if s.status is not VideoStatus.SUBMITTING]
        counted = float(history["cost_credits"].sum())
        assert math.isclose(counted, sum(s.cost_credits or 0.0 for s in jobs), abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dagster


def dagster_home(folder: Path) -> Path:
    """A DAGSTER_HOME that several processes can open (SQLite storage, telemetry off), its
    storage created here: two processes opening a new home at once race to create the same
    SQLite tables ("table alembic_version already exists" killed a daemon that way)."""
    from dagster import DagsterInstance

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    DagsterInstance.from_config(str(folder)).dispose()
    return folder


@contextlib.contextmanager
def open_instance(home: Path) -> Iterator[Any]:
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()


def make_defs(
    base_url: str,
    prompts: Path,
    data_dir: Path,
    *,
    api_key: str = TEST_API_KEY,
    request_timeout_seconds: float = 10.0,
    database_url: str | None = None,
    storage_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """The project's definitions against an emulator; retries wait at most 1 s. ``kwargs``
    go to ``build_kvid_definitions`` (``status_sensor=StatusSensorOptions(...)``, ...)."""
    from kvid_dagster.core.project import KvidProject
    from kvid_dagster.definitions import build_kvid_definitions
    from kvid_dagster.resources import KvidResource

    project = KvidProject(prompts, data_dir, database_url=database_url, storage_url=storage_url)
    resource = KvidResource(
        api_key=api_key,
        base_url=base_url,
        request_timeout_seconds=request_timeout_seconds,
        backoff_base_seconds=0.01,
        backoff_max_seconds=1.0,
    )
    return build_kvid_definitions(project, resource=resource, **kwargs)


def run_submit(defs: Any, instance: Any, first: str, last: str, **kwargs: Any) -> bool:
    from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
    from kvid_dagster.definitions import SUBMIT_JOB

    result = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=instance,
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
        raise_on_error=False,
        **kwargs,
    )
    return bool(result.success)


def submit_job(base_url: str, prompts: str, data_dir: str) -> Any:
    """``make_defs``' submitting job, rebuilt from plain strings: what
    ``build_reconstructable_job`` calls, so ``execute_submit`` can re-execute a run."""
    from kvid_dagster.definitions import SUBMIT_JOB

    return make_defs(base_url, Path(prompts), Path(data_dir)).resolve_job_def(SUBMIT_JOB)


def execute_submit(
    instance: Any, base_url: str, prompts: Path, data_dir: Path, first: str, last: str,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """A run of ``kvid_video_jobs`` for ``first..last`` through ``dagster.execute_job`` (in the
    definitions' in-process executor), which unlike ``execute_in_process`` can re-execute a
    run (``reexecution_options``) the way Dagster's run retries do: same root run, same tags.
    Returns the ``JobExecutionResult``."""
    from dagster import build_reconstructable_job, execute_job

    from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG

    job = build_reconstructable_job(
        "faultkit", "submit_job", reconstructable_args=(base_url, str(prompts), str(data_dir))
    )
    tags = {RANGE_START_TAG: first, RANGE_END_TAG: last}
    return execute_job(job, instance, tags=tags, **kwargs)


def run_prompts(defs: Any, instance: Any) -> bool:
    from kvid_dagster.definitions import PROMPTS_JOB

    result = defs.resolve_job_def(PROMPTS_JOB).execute_in_process(
        instance=instance, raise_on_error=False
    )
    return bool(result.success)


def tick_until_settled(defs: Any, instance: Any, ledger: Ledger, *, max_ticks: int = 80) -> int:
    """Status-sensor ticks, stored as the daemon stores them, until nothing waits; returns the
    number of ticks (one more after settling, so late reports land too)."""
    from kvid_dagster.cli.runner import evaluate_status_sensor

    cursor = None
    for ticks in range(1, max_ticks + 1):
        _, cursor = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
        if not waiting(ledger):
            evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
            return ticks
        time.sleep(0.15)
    raise AssertionError(f"jobs never settled: {waiting(ledger)}")


def check_verdicts(instance: Any, keys: Sequence[str], check: str = "video_ok") -> dict[str, bool]:
    """The latest result of ``check`` on ``kvid_videos``, for each partition that has one."""
    from dagster import AssetCheckKey, AssetKey

    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(AssetKey("kvid_videos"), check)], partition_keys=list(keys)
    )
    return {str(i.partition_key): i.latest_execution_status.value == "SUCCEEDED" for i in infos}


def materialization_counts(instance: Any, keys: Sequence[str]) -> dict[str, int]:
    from dagster import AssetKey, AssetRecordsFilter

    counts = {}
    for key in keys:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("kvid_videos"), asset_partitions=[key]),
            limit=10,
        ).records
        counts[key] = len(records)
    return counts


# ---------------------------------------------------------------------------------------------
# processes to kill


def spawn(function: str, *args: Any) -> subprocess.Popen[bytes]:
    """Run ``faultkit.<function>(*args)`` in a fresh interpreter (args as strings)."""
    code = f"import sys, faultkit; faultkit.{function}(*sys.argv[1:])"
    path = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("DAGSTER_HOME", None)
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_file(path: Path, child: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited {child.returncode}: {child_stderr(child)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.02)


def child_stderr(child: subprocess.Popen[bytes]) -> str:
    if child.stderr is None:
        return ""
    with contextlib.suppress(Exception):
        return child.stderr.read().decode(errors="replace")[-3000:]
    return ""


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


def quiesce(emulator: Any, quiet: float = 0.5, timeout: float = 15.0) -> None:
    """Wait until the emulator has handled what a killed client had already sent: a request
    that left before the SIGKILL still creates its job (counts unchanged for ``quiet`` s)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        now = (emulator.stats["generate"], emulator.jobs_created)
        if now == last:
            return
        last = now
        time.sleep(quiet)
    raise AssertionError("the emulator kept receiving requests")


def _hang(marker: str) -> None:
    """Say "I am here" through ``marker`` and wait for the SIGKILL."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(600)


def child_run_submit(
    home: str, prompts: str, data_dir: str, base_url: str, first: str, last: str,
    mode: str, marker: str, go: str = "",
) -> None:  # fmt: skip
    """A Dagster run of ``kvid_video_jobs`` for ``first..last``.

    mode "after_generate": hang the moment the first ``generate`` returned, before its
    request_id is recorded (the kill -9 between send and record); "plain": run to the end,
    starting when the file ``go`` exists (two runs racing); ``marker`` says it got there.
    """
    if mode == "after_generate":

        def record_submitted(self: Ledger, *args: Any, **kwargs: Any) -> None:
            _hang(marker)

        Ledger.record_submitted = record_submitted  # type: ignore[method-assign]
    defs = make_defs(base_url, Path(prompts), Path(data_dir))
    with open_instance(Path(home)) as instance:
        if go:
            Path(marker).write_text("ready")
            while not Path(go).exists():
                time.sleep(0.005)
        ok = run_submit(defs, instance, first, last)
    sys.exit(0 if ok else 3)


def child_sensor_tick(
    home: str, prompts: str, data_dir: str, base_url: str, mode: str, marker: str
) -> None:
    """One status-sensor tick that hangs midway: "reporting" after the first two events reached
    Dagster (the ledger already holds every outcome); "downloading" in the middle of the
    first video's download (nothing recorded yet, its first bytes kept in a partial file)."""
    from dagster import DagsterInstance

    from kvid_dagster.cli.runner import evaluate_status_sensor
    from kvid_dagster.client import _download

    if mode == "reporting":
        original_report = DagsterInstance.report_runless_asset_event
        reported = [0]

        def report(self: Any, event: Any) -> None:
            if reported[0] == 2:
                _hang(marker)
            reported[0] += 1
            original_report(self, event)

        DagsterInstance.report_runless_asset_event = report  # type: ignore[method-assign]
    else:
        original_write = _download.DownloadSink.write

        def write(self: Any, chunk: bytes) -> None:
            original_write(self, chunk)
            self._file.flush()
            _hang(marker)

        _download.DownloadSink.write = write  # type: ignore[method-assign]
    defs = make_defs(base_url, Path(prompts), Path(data_dir))
    with open_instance(Path(home)) as instance:
        evaluate_status_sensor(defs, instance, None, "kvid_status_sensor")
    sys.exit(4)  # never reached: the tick hangs and is killed


def child_submit_rows(prompts: str, data_dir: str, base_url: str, keys: str) -> None:
    """``submit_rows`` of some rows of the table, no Dagster (a concurrent ledger writer)."""
    wanted = set(json.loads(keys))
    rows = [row for row in table_rows(Path(prompts)) if row.partition_key in wanted]
    submit(base_url, Ledger.for_data_dir(data_dir), rows)


# ---------------------------------------------------------------------------------------------
# kill points inside a submission (tests/test_races.py)

#: where ``child_submit_killable`` stops, "<hook>:<n>": the n-th call of the hook
KILL_HOOKS = ("claim_entry", "claim_return", "record_entry", "record_return", "pause_after_record")


def _hang_quietly() -> None:
    """A thread that reached a hook after the kill point: it stays where it is."""
    time.sleep(600)


def _install_kill_point(point: str, marker: str, go: str = "") -> None:
    """Patch ``Ledger.claim`` and ``Ledger.record_submitted`` so the process stops at ``point``.

    ``claim_entry:n``: before the n-th claim is made; ``claim_return:n``: the n-th claim is
    committed, its generate not sent; ``record_entry:n``: the n-th generate answered, its
    request_id not recorded; ``record_return:n``: the n-th request_id recorded. At that moment
    ``marker`` is written and the process *freezes*: every thread that later reaches a hook
    hangs there (a claim committed meanwhile stays claimed and unsent, an answer that arrives
    stays unrecorded), so the ledger holds still until the SIGKILL. ``pause_after_record:n``
    instead writes ``marker`` after the n-th record and holds new claims (only) until the file
    ``go`` exists: the test changes the emulator meanwhile. ``""`` or ``none``: no hook.
    """
    import threading

    hook, _, count = point.partition(":")
    if hook in ("", "none"):
        return
    if hook not in KILL_HOOKS:
        raise ValueError(f"unknown kill point {point!r}")
    target = int(count)
    lock = threading.Lock()
    calls: Counter[str] = Counter()
    frozen = threading.Event()

    def reached(name: str) -> bool:
        with lock:
            calls[name] += 1
            return name == hook and calls[name] == target and not frozen.is_set()

    def stop_here() -> None:
        frozen.set()
        _hang(marker)

    original_claim = Ledger.claim
    original_record = Ledger.record_submitted

    def claim(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        if frozen.is_set():
            _hang_quietly()
        if reached("claim_entry"):
            stop_here()
        if hook == "pause_after_record" and calls["record_return"] >= target:
            while not Path(go).exists():
                time.sleep(0.005)
        claimed = original_claim(self, *args, **kwargs)
        if frozen.is_set():
            _hang_quietly()
        if reached("claim_return"):
            stop_here()
        return claimed

    def record_submitted(self: Ledger, *args: Any, **kwargs: Any) -> None:
        if frozen.is_set():
            _hang_quietly()
        if reached("record_entry"):
            stop_here()
        original_record(self, *args, **kwargs)
        if frozen.is_set():
            _hang_quietly()
        if reached("record_return"):
            stop_here()
        if hook == "pause_after_record":
            with lock:
                calls["pause_after_record"] += 1
                if calls["pause_after_record"] == target:
                    Path(marker).write_text(str(os.getpid()))

    Ledger.claim = claim  # type: ignore[method-assign]
    Ledger.record_submitted = record_submitted  # type: ignore[method-assign]


def child_submit_killable(
    prompts: str, data_dir: str, base_url: str, point: str, marker: str, go: str = "",
    database_url: str = "",
) -> None:  # fmt: skip
    """``submit_rows`` of the whole table (generate_concurrency 4, no Dagster) that stops at
    ``point`` (see ``_install_kill_point``) to be killed there. A submission that gets to
    its end writes ``<marker>.done`` and waits for the SIGKILL all the same. SIGUSR1 dumps
    every thread's stack to stderr (a test that waited in vain shows where it was)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _install_kill_point(point, marker, go)
    ledger = Ledger.for_data_dir(data_dir, database_url or None)
    # the client waits long: a held answer must still be in flight when the kill comes
    submit(base_url, ledger, table_rows(Path(prompts)), generate_concurrency=4, timeout=120.0)
    _hang(f"{marker}.done")


def child_run_submit_at(
    home: str, prompts: str, data_dir: str, base_url: str, first: str, last: str, point: str,
    marker: str, request_timeout_seconds: str = "10",
) -> None:  # fmt: skip
    """``child_run_submit`` (a Dagster run of ``kvid_video_jobs`` for ``first..last``) that
    stops at ``point`` (see ``_install_kill_point``; "none": nowhere) to be killed there."""
    _install_kill_point(point, marker)
    defs = make_defs(
        base_url,
        Path(prompts),
        Path(data_dir),
        request_timeout_seconds=float(request_timeout_seconds),
    )
    with open_instance(Path(home)) as instance:
        ok = run_submit(defs, instance, first, last)
    _hang(f"{marker}.done")
    sys.exit(0 if ok else 3)


def mp4_video(width: int, height: int, frames: int, fps: int = 16) -> bytes:
    """A real H.264 MP4 of ``frames`` flat frames: what a storage may serve in a job's place."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), i * 3 % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


class StorageFront:
    """A storage origin on 127.0.0.1 that result URLs can point at. Every GET is redirected to
    ``target`` + its path (the headers it came with are kept in ``headers``), except while
    ``bad`` is set: then paths containing one of ``bad_for`` (every path when empty) get
    ``bad``, padded to the real file's length so the size the result announced still matches
    (only looking inside the file can tell). ``bad_gets`` counts those answers."""

    def __init__(self, target: str = "", bad: bytes | None = None, content_type: str = "") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.target, self.bad, self.content_type = target, bad, content_type or "text/html"
        self.bad_for: set[str] = set()
        self.bad_gets = 0
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                if owner.serves_bad(self.path):
                    owner.bad_gets += 1
                    body = owner.padded(self.path)
                    self.send_response(200)
                    self.send_header("Content-Type", owner.content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(302)
                self.send_header("Location", owner.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serves_bad(self, path: str) -> bool:
        return self.bad is not None and (
            not self.bad_for or any(key in path for key in self.bad_for)
        )

    def padded(self, path: str) -> bytes:
        import urllib.request

        assert self.bad is not None
        with urllib.request.urlopen(self.target + path, timeout=10) as real:
            size = len(real.read())
        return self.bad + b"\0" * max(0, size - len(self.bad))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
