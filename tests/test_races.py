"""Races between real processes over one ledger, and kill -9 at every step of a submission.

Everything is counted at the emulator (``jobs_created``, ``stats["generate"]``, ``jobs``): the
money is what the service created, whatever the ledger says. The invariants:

- two submitters over one ledger (two ``kvid-dagster run``, SQLite or PostgreSQL) send each
  request exactly once between them;
- a submitter killed anywhere leaves at most ``generate_concurrency`` claims; the next run
  settles exactly those UNCERTAIN and sends every row that held nothing, once;
- a paid request_id the database refuses to record is journalled and logged, then recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from conftest import TEST_API_KEY, EmulatorFactory, fast_config
from faultkit import (
    assert_accounted,
    child_stderr,
    dagster_home,
    kill,
    poll_until_settled,
    quiesce,
    spawn,
    statuses,
    submit,
    table_rows,
    wait_for_file,
    write_table,
)

from kvid_dagster.client._ramp import DEFAULT_INITIAL
from kvid_dagster.client.video_requests import canonical_json
from kvid_dagster.core.prompts import PromptRow, load_prompt_table
from kvid_dagster.core.submit import DEFAULT_GENERATE_CONCURRENCY, SubmitAction, register_table
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus

CLI = Path(sys.executable).parent / "kvid-dagster"  # the venv running the tests
CONCURRENCY = 4  # what child_submit_killable uses
SHM = Path("/dev/shm")


def quick_emulator(factory: EmulatorFactory, **overrides: Any) -> KvidEmulator:
    """Enough workers and short jobs for hundreds of rows; one render shared by all jobs."""
    settings: dict[str, Any] = {"workers": 32, "job_duration": 0.2, "reuse_renders": True}
    settings.update(overrides)
    return factory(fast_config(**settings))


def jobs_per_key(jobs: Mapping[str, Any], rows: Sequence[PromptRow]) -> Counter[str]:
    """How many jobs the emulator created for each row (by the body it was sent)."""
    by_body = {canonical_json(row.request.to_body()): row.partition_key for row in rows}
    return Counter(by_body[canonical_json(dict(job.body))] for job in jobs.values())


def keys_in(states: Mapping[str, str], *wanted: str) -> set[str]:
    return {key for key, state in states.items() if state in wanted}


def wait_until(condition: Callable[[], bool], child: Any, what: str, timeout: float = 60) -> None:
    """Wait for a state the child reaches and then holds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"child exited {child.returncode}: {child_stderr(child)}")
        if time.monotonic() > deadline:
            child.send_signal(signal.SIGUSR1)  # child_submit_killable: dump every stack
            time.sleep(1)  # (only to let the dump reach stderr before the kill)
            kill(child)
            dump = child.stderr.read().decode(errors="replace") if child.stderr else ""
            raise AssertionError(f"never reached: {what}\n{dump[-12000:]}")
        time.sleep(0.01)


def assert_generates_counted(emulator: KvidEmulator) -> None:
    """Every generate the emulator received created one job, except a request a SIGKILL cut
    in the middle of its body (422, nothing created); a held answer has no status yet."""
    stats = emulator.stats
    answered = {key[1] for key in stats if isinstance(key, tuple) and key[0] == "generate"}
    assert answered <= {200, 422}, stats
    truncated = stats[("generate", 422)]
    assert stats["generate"] - truncated == emulator.jobs_created == len(emulator.jobs), stats


# ---------------------------------------------------------------------------------------------
# a. two `kvid-dagster run` processes over one ledger


class BothSubmittersGate:
    """Holds every generate at the emulator until the ledger has claims of two different
    processes: both runs are then submitting at the same moment, whatever their start-up times
    (no sleep decides the overlap). Opens anyway after ``timeout`` s (below the client's 30 s
    request timeout), and says so."""

    def __init__(
        self, emulator: KvidEmulator, open_ledger: Callable[[], Ledger], timeout: float = 25.0
    ) -> None:
        self.opened = threading.Event()
        self.timed_out = False
        self.held = 0
        self._open_ledger = open_ledger
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()
        self._timeout = timeout
        original = emulator.handle

        def handle(
            method: str, target: str, headers: Message, body: bytes | None, **options: Any
        ) -> Any:
            if urlsplit(target).path.endswith("/generate") and not self.opened.is_set():
                self._wait()
            return original(method, target, headers, body, **options)

        emulator.handle = handle  # type: ignore[method-assign]

    def owners(self) -> set[int]:
        with self._lock:
            if self._ledger is None:
                self._ledger = self._open_ledger()
            return {s.owner.pid for s in self._ledger.submissions() if s.owner is not None}

    def _wait(self) -> None:
        with self._lock:
            self.held += 1
        deadline = time.monotonic() + self._timeout
        while not self.opened.is_set():
            if len(self.owners()) >= 2:
                self.opened.set()
            elif time.monotonic() > deadline:
                self.timed_out = True
                self.opened.set()
            else:
                self.opened.wait(0.02)

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_cli_runs_over_one_ledger_pay_each_request_once(
    backend: str, emulator_factory: EmulatorFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    emulator = quick_emulator(emulator_factory)
    keys = [f"k{i:03d}" for i in range(200)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    if backend == "sqlite":  # one data folder (its kvid.db), a Dagster instance each
        database_url = None
        data_dirs = [tmp_path / "data", tmp_path / "data"]
    else:  # one database, a data folder and a Dagster instance each (two hosts, in effect)
        database_url = request.getfixturevalue("postgres_url")
        data_dirs = [tmp_path / "data-a", tmp_path / "data-b"]

    def open_ledger() -> Ledger:
        return Ledger.for_data_dir(data_dirs[0], database_url)

    gate = BothSubmittersGate(emulator, open_ledger)
    env = {**os.environ, "KVID_BASE_URL": emulator.base_url, "KVID_API_KEY": TEST_API_KEY}
    env.pop("KVID_DATABASE_URL", None)
    if database_url:
        env["KVID_DATABASE_URL"] = database_url
    # Dagster's own SQLite storage commits every event (~65 ms each on this disk, 600+ events
    # a run): its homes go to memory when there is a tmpfs; the kvid ledger stays on disk
    homes = Path(tempfile.mkdtemp(prefix="kvid-homes-", dir=SHM if SHM.is_dir() else tmp_path))
    request.addfinalizer(lambda: shutil.rmtree(homes, ignore_errors=True))
    children, logs = [], []
    for name, data_dir in zip("ab", data_dirs, strict=True):
        log = (tmp_path / f"run-{name}.log").open("wb")
        logs.append(log)
        command = [str(CLI), "run", "--prompts", str(prompts), "--data-dir", str(data_dir)]
        command += ["--poll-interval", "0.2"]
        home = dagster_home(homes / f"home-{name}")
        children.append(
            subprocess.Popen(
                command, env={**env, "DAGSTER_HOME": str(home)}, stdout=log, stderr=log
            )
        )  # both start now; the gate makes their submissions overlap
    try:
        codes = [child.wait(240) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                kill(child)
        for log in logs:
            log.close()
        gate.close()
    # a failure's whole traceback, as text: a dict of logs is shown cut short
    output = "\n".join(
        f"--- run {n} exited {code}:\n"
        + (tmp_path / f"run-{n}.log").read_text(errors="replace")[-8000:]
        for n, code in zip("ab", codes, strict=True)
        if code
    )
    assert codes == [0, 0], output
    assert not gate.timed_out, "the two runs never submitted at the same time"

    assert emulator.stats["generate"] == emulator.jobs_created == len(keys)
    assert jobs_per_key(emulator.jobs, rows) == dict.fromkeys(keys, 1)
    with open_ledger() as ledger:
        assert set(statuses(ledger).values()) == {"COMPLETED"}
        subs = ledger.submissions()
        assert len(subs) == len(keys) and {s.attempt for s in subs} == {1}
        owners = Counter(s.owner.pid for s in subs if s.owner is not None)
        assert set(owners) == {child.pid for child in children}, owners  # both paid some
        assert_accounted(emulator.jobs, ledger, rows)


# ---------------------------------------------------------------------------------------------
# b. kill -9 at every step of a submission


@dataclass(frozen=True)
class KillPoint:
    """Where a 12-row submission (generate_concurrency 4) is killed.

    ``point``: the child's hook (``faultkit._install_kill_point``), reached when it writes the
    marker; ``hold``: generates whose answer the emulator holds back (they are created);
    ``hold_after``: hold them only from the ``pause_after_record`` handshake on; ``jobs``:
    kill when the emulator has created this many jobs (no hook: the child runs freely);
    ``done``: kill after the submission returned."""

    point: str = "none"
    hold: int = 0
    hold_after: bool = False
    jobs: int = 0
    done: bool = False  # kill once the submission has returned (``<marker>.done``)

    @property
    def hook(self) -> str:
        return self.point.partition(":")[0]

    @property
    def n(self) -> int:
        return int(self.point.partition(":")[2] or 0)


KILL_POINTS = {
    "before-the-first-claim": KillPoint("claim_entry:1"),
    "before-claim-2": KillPoint("claim_entry:2"),
    "before-claim-5-slot-reused": KillPoint("claim_entry:5"),
    "before-claim-10": KillPoint("claim_entry:10"),
    "claim-1-committed-not-sent": KillPoint("claim_return:1"),
    "claim-3-committed-not-sent": KillPoint("claim_return:3"),
    "claim-4-committed-not-sent": KillPoint("claim_return:4"),
    "claim-5-committed-not-sent": KillPoint("claim_return:5"),
    "claim-12-committed-not-sent": KillPoint("claim_return:12"),
    "sending-first-wave-answers-held": KillPoint(hold=12),
    "sending-one-held-while-3-recorded": KillPoint("record_return:3", hold=1),
    "sending-4-held-after-2-recorded": KillPoint("pause_after_record:2", hold=4, hold_after=True),
    "sending-4-held-after-5-recorded": KillPoint("pause_after_record:5", hold=4, hold_after=True),
    "free-running-at-1-job": KillPoint(jobs=1),
    "free-running-at-7-jobs": KillPoint(jobs=7),
    "answer-1-in-not-recorded": KillPoint("record_entry:1"),
    "answer-4-in-not-recorded": KillPoint("record_entry:4"),
    "answer-9-in-not-recorded": KillPoint("record_entry:9"),
    "answer-12-in-not-recorded": KillPoint("record_entry:12"),
    "request-id-1-recorded": KillPoint("record_return:1"),
    "request-id-3-recorded": KillPoint("record_return:3"),
    "request-id-6-recorded": KillPoint("record_return:6"),
    "request-id-8-recorded": KillPoint("record_return:8"),
    "request-id-11-recorded": KillPoint("record_return:11"),
    "request-id-12-recorded": KillPoint("record_return:12"),
    "after-the-submission-returned": KillPoint(done=True),
}
FIRST_WAVE = DEFAULT_INITIAL  # requests a new client lets go before any answer
HELD_FOR = 300.0  # a held answer outlasts the test: only the emulator's stop releases it


@pytest.mark.parametrize("where", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_a_submitter_killed_anywhere_leaves_at_most_its_claims_in_doubt(
    where: str, emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    kp = KILL_POINTS[where]
    emulator = quick_emulator(emulator_factory, job_duration=0.1)
    keys = [f"k{i:02d}" for i in range(12)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)
    register_table(ledger, load_prompt_table(prompts))
    marker, go = tmp_path / "marker", tmp_path / "go"
    if kp.hold and not kp.hold_after:
        emulator.add_fault("generate", "timeout", times=kp.hold, delay=HELD_FOR)
    child = spawn(
        "child_submit_killable", prompts, data_dir, emulator.base_url, kp.point, marker, go
    )

    def recorded_now() -> int:
        return len(keys_in(statuses(ledger), "SUBMITTED"))

    if kp.hold_after:  # from the n-th recorded request_id on, the next generates are held
        wait_for_file(marker, child)
        emulator.add_fault("generate", "timeout", times=kp.hold, delay=HELD_FOR)
        go.touch()
        # stuck: every slot holds a generate whose job exists and whose answer never comes
        wait_until(
            lambda: (
                not emulator.pending_faults()
                and len(keys_in(statuses(ledger), "SUBMITTING")) == CONCURRENCY
                and emulator.jobs_created == recorded_now() + CONCURRENCY
            ),
            child,
            "four generates held",
        )
    elif kp.hook != "none":
        wait_until(
            lambda: marker.exists() or Path(f"{marker}.done").exists(),
            child,
            f"the kill point {kp.point}",
        )
        assert marker.exists(), f"the submission ended before {kp.point}: {statuses(ledger)}"
    elif kp.done:
        wait_for_file(Path(f"{marker}.done"), child)
    elif kp.hold:
        # the first wave is on its way and no answer comes back: the client lets only its
        # first DEFAULT_INITIAL requests go, and only those are claimed (the others wait
        # in the client holding nothing)
        wait_until(
            lambda: (
                emulator.jobs_created == FIRST_WAVE
                and len(keys_in(statuses(ledger), "SUBMITTING")) == FIRST_WAVE
            ),
            child,
            "the first wave claimed and sent",
        )
    else:  # free-running: kill when the emulator has created this many jobs
        wait_until(lambda: emulator.jobs_created >= kp.jobs, child, f"{kp.jobs} jobs")
    kill(child)
    quiesce(emulator)  # what had left before the SIGKILL still arrives
    emulator.clear_faults()

    at_kill = statuses(ledger)
    in_flight = keys_in(at_kill, "SUBMITTING")
    recorded = keys_in(at_kill, "SUBMITTED")
    untouched = keys_in(at_kill, "PENDING")
    assert in_flight | recorded | untouched == set(keys), at_kill
    assert len(in_flight) <= CONCURRENCY  # the most a killed submitter can leave in doubt
    sent = jobs_per_key(emulator.jobs, rows)
    assert set(sent) <= in_flight | recorded  # a row that held nothing was never sent
    assert all(sent[k] == 1 for k in recorded)  # a recorded request_id is a real job
    claims = in_flight | recorded
    # (a hook counts calls; up to CONCURRENCY - 1 other threads may be mid-transaction at the
    # kill, and a transaction the SIGKILL cut short was never committed)
    if kp.hook == "claim_entry":
        assert len(claims) >= kp.n - CONCURRENCY and emulator.jobs_created <= len(claims)
        if kp.n == 1:
            assert claims == set() and emulator.stats["generate"] == 0
    elif kp.hook == "claim_return":
        assert len(claims) >= kp.n
        assert in_flight - set(sent), "the claim killed before its send has no job"
    elif kp.hook == "record_entry":
        assert len(recorded) >= kp.n - CONCURRENCY
        assert in_flight & set(sent), "the answer killed before its record has a job"
    elif kp.hook in ("record_return", "pause_after_record"):
        assert len(recorded) >= kp.n
    if kp.hold:
        assert in_flight & set(sent), "a held generate's job exists"
    if kp.hold and not kp.hold_after and kp.hook == "none":  # the first wave
        assert in_flight == set(sent), "a row is claimed only when its generate leaves"
    if kp.hold_after:
        assert len(in_flight) == CONCURRENCY and in_flight <= set(sent)
    if kp.done:
        assert recorded == set(keys)

    # the very next run: the dead submitter's claims are UNCERTAIN at once, every row that
    # held nothing is sent exactly once, nothing else is sent again
    outcomes = {o.partition_key: o for o in submit(emulator.base_url, ledger, rows)}
    assert {k for k, o in outcomes.items() if o.action is SubmitAction.SUBMITTED} == untouched
    after = jobs_per_key(emulator.jobs, rows)
    assert all(after[k] == 1 for k in untouched | recorded), after
    assert all(after[k] <= 1 for k in in_flight), after
    poll_until_settled(emulator.base_url, ledger, data_dir / "videos")
    final = statuses(ledger)
    assert keys_in(final, "UNCERTAIN") == in_flight  # only the claims in flight at the kill
    assert keys_in(final, "COMPLETED") == set(keys) - in_flight
    for row in ledger.rows(in_flight):
        assert row.error and "stopped while this request's generate was in flight" in row.error
    assert_accounted(emulator.jobs, ledger, rows)
    assert_generates_counted(emulator)


# ---------------------------------------------------------------------------------------------
# c. a burst into a listen backlog of 5


def test_a_burst_of_200_into_a_backlog_of_5_creates_200_jobs_and_no_doubt(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = quick_emulator(emulator_factory)
    assert emulator.config.backlog == 5  # the standard library's, as small real servers have
    keys = [f"k{i:03d}" for i in range(200)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)
    register_table(ledger, load_prompt_table(prompts))
    outcomes = submit(emulator.base_url, ledger, rows)  # generate_concurrency: the default
    assert DEFAULT_GENERATE_CONCURRENCY == 4
    assert Counter(o.action for o in outcomes) == {SubmitAction.SUBMITTED: len(keys)}
    assert emulator.stats["generate"] == emulator.jobs_created == len(keys)
    assert emulator.stats[("generate", 0)] == 0  # no request dropped
    assert jobs_per_key(emulator.jobs, rows) == dict.fromkeys(keys, 1)
    assert ledger.counts_by_status() == {VideoStatus.SUBMITTED: len(keys)}
    poll_until_settled(emulator.base_url, ledger, data_dir / "videos")  # 32 polls at once
    assert ledger.counts_by_status() == {VideoStatus.COMPLETED: len(keys)}
    assert emulator.jobs_created == len(keys)
    assert_accounted(emulator.jobs, ledger, rows)


# ---------------------------------------------------------------------------------------------
# d. the database refuses the request_id of a paid generate


def test_a_database_error_after_a_paid_generate_loses_no_request_id(
    emulator: KvidEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = ["k0", "k1", "k2"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)
    register_table(ledger, load_prompt_table(prompts))
    jobs_table = ledger.tables.jobs.name
    refused: list[str] = []

    def refuse_request_ids(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        head = statement.split("WHERE")[0]  # the table and the columns it sets
        updating = statement.lstrip().upper().startswith("UPDATE") and jobs_table in head
        if updating and "request_id" in head:  # recording a request_id: every attempt fails
            refused.append(statement)
            raise sa.exc.OperationalError(
                statement, parameters, Exception("disk I/O error (injected)")
            )

    sa.event.listen(ledger.engine, "before_cursor_execute", refuse_request_ids)
    with caplog.at_level(logging.ERROR, logger="kvid_dagster"):
        outcomes = submit(emulator.base_url, ledger, rows)
    # the run completes: every generate was paid for, and its request_id is somewhere durable
    assert [o.action for o in outcomes] == [SubmitAction.SUBMITTED] * 3
    request_ids = {o.request_id for o in outcomes}
    assert request_ids == set(emulator.jobs) and emulator.jobs_created == 3
    assert len(refused) >= 3 * 2  # retried before journalling
    journal = data_dir / "kvid-journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {e["request_id"] for e in entries} == request_ids
    assert {e["partition_key"] for e in entries} == set(keys)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert all(rid in logged for rid in request_ids if rid), logged
    assert "journalled" in logged
    # the ledger holds the claims meanwhile: nothing is sent again
    assert set(statuses(ledger).values()) == {"SUBMITTING"}

    # the database is back: the next start records every request_id and removes the journal
    sa.event.remove(ledger.engine, "before_cursor_execute", refuse_request_ids)
    ledger.close()
    ledger = Ledger.for_data_dir(data_dir)
    report = ledger.recover()
    assert {s.request_id for s in report.replayed} == request_ids
    assert report.settled == []
    assert set(statuses(ledger).values()) == {"SUBMITTED"}
    assert {r.request_id for r in ledger.rows()} == request_ids
    assert not journal.exists() and not list(data_dir.glob(".kvid-journal.jsonl.*"))
    poll_until_settled(emulator.base_url, ledger, data_dir / "videos")
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    assert emulator.stats["generate"] == emulator.jobs_created == 3
    assert_accounted(emulator.jobs, ledger, rows)
