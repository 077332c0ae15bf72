"""What the benchmark modules share: the emulator in its own process, prompt tables, memory
figures of this process, a fresh ledger database per run (SQLite file or PostgreSQL database),
and the ``--out`` JSON protocol between a phase and ``bench/run.py``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
#: the ledger backends a phase can run on (``--backend``)
BACKENDS = ("sqlite", "postgresql")
#: the backfill's deployment column: the ledger and the Dagster instance on PostgreSQL (one
#: fresh database), videos and catalogs on S3 (moto's server on loopback, in the phase)
DEPLOYED = "deployed"
#: the PostgreSQL server (an admin URL) a benchmark creates its fresh database in; what CI
#: starts (``.ci/run``) and the tests use (``tests/conftest.py``)
DEFAULT_POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The prompt row every benchmark job uses: v1 text-to-video at 480p (81 frames, 16 fps).
RESOLUTION = "480p"


def proc_status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB, from /proc/self/status.

    Not ``ru_maxrss``: on Linux the peak survives ``execve``, so a child started by a big parent
    would report the parent's size at fork. ``bench/run.py`` keeps itself small for that reason
    and records ``ru_maxrss`` too, as a cross-check.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_peak_before_resets_mb = 0.0


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5), so the next
    reading is the peak of what follows; False when the kernel does not allow it. The peak so far
    is remembered for :func:`process_peak_mb`."""
    global _peak_before_resets_mb
    _peak_before_resets_mb = max(_peak_before_resets_mb, proc_status_mb("VmHWM"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


class DescendantPeaks:
    """Samples the peak RSS (``VmHWM``) of every descendant process every ``interval`` seconds
    in a thread: the only way to see the peak of a process this one did not write (Dagster's
    step process), since a child's ``ru_maxrss`` includes its parent's size at fork. A lower
    bound by at most the growth in its last ``interval``."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval = interval
        self.peaks: dict[int, tuple[str, float]] = {}  # pid -> (command line, peak MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watcher", daemon=True)

    def _descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                    parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found, frontier = [], [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [c for c, p in parents.items() if p == pid]
            found += children
            frontier += children
        return found

    def sample(self) -> None:
        for pid in self._descendants():
            try:
                status = _read_status(pid)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            peak = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
            previous = self.peaks.get(pid, ("", 0.0))[1]
            self.peaks[pid] = (cmdline, max(previous, peak))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> DescendantPeaks:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_of(self, *needles: str) -> float | None:
        """The largest peak among descendants whose command line contains every needle."""
        found = [mb for cmd, mb in self.peaks.values() if all(n in cmd for n in needles)]
        return max(found) if found else None


def process_peak_mb() -> float:
    """This process's peak RSS over its whole life, resets included."""
    return max(_peak_before_resets_mb, proc_status_mb("VmHWM"))


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_prompts(path: Path, n: int, *, prefix: str = "row") -> list[str]:
    """A prompt table of ``n`` distinct v1 text-to-video rows; returns the partition keys."""
    keys = [f"{prefix}-{i:05d}" for i in range(n)]
    lines = ["prompt_id,prompt,resolution"]
    lines += [f"{k},A calm lake at dawn number {i},{RESOLUTION}" for i, k in enumerate(keys)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return keys


def quiet_dagster() -> None:
    """Silence what Dagster prints that is not a result (warnings, its loggers)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("dagster").setLevel(logging.ERROR)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


class Emulator:
    """A kvid emulator in its own process (``bench.emulator_proc``), as the real service would
    be: its CPU and GIL are not the benchmarked process's. ``stats()`` asks it for its counters.
    """

    def __init__(
        self,
        *,
        workers: int,
        job_duration: float,
        reuse_renders: bool = True,
        output_dir: Path | None = None,
        backlog: int = 256,
    ) -> None:
        # a large listen backlog: benchmarks open many connections at once (the default is 5)
        cmd = [
            sys.executable, "-m", "bench.emulator_proc",
            "--workers", str(workers), "--job-duration", str(job_duration),
            "--backlog", str(backlog),
        ]  # fmt: skip
        if reuse_renders:
            cmd.append("--reuse-renders")
        if output_dir is not None:
            cmd += ["--output-dir", str(output_dir)]
        self._proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"the emulator did not start (said {line!r})")
        self.base_url = line

    def stats(self) -> dict[str, Any]:
        """Request counts by endpoint, ``jobs_created``, and the emulator's CPU seconds and RSS."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return dict(json.loads(self._proc.stdout.readline()))

    def stop(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.terminate()
                self._proc.wait(timeout=15)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Stopwatch:
    """Accumulates the durations of calls of one kind: ``with watch: ...`` or ``watch.add(s)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # add() is called from worker threads too
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.first_start: float | None = None  # perf_counter instants: the span of all calls
        self.last_end: float | None = None
        self._t0 = 0.0

    def add(self, seconds: float) -> None:
        end = time.perf_counter()
        start = end - seconds
        with self._lock:
            self.count += 1
            self.total_s += seconds
            self.max_s = max(self.max_s, seconds)
            self.first_start = start if self.first_start is None else min(self.first_start, start)
            self.last_end = end if self.last_end is None else max(self.last_end, end)

    @property
    def span_s(self) -> float:
        """From the first call's start to the last call's end (concurrent calls overlap)."""
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.add(time.perf_counter() - self._t0)

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "total_s": self.total_s,
            "max_s": self.max_s,
            "span_s": self.span_s,
        }


_outermost = threading.local()


def wrap_sync(owner: Any, name: str, watch: Stopwatch, *, outermost: bool = False) -> None:
    """Time every call of ``owner.name`` (a function or method) into ``watch``; if the code under
    test no longer has that name, ``watch`` just stays at zero (figures, not assertions).

    ``outermost``: among the functions wrapped with it, a call made (on the same thread) from
    inside another one is not timed again, so ``Ledger.recover`` calling ``submissions`` counts
    once, in the watch of ``recover``."""
    original = getattr(owner, name, None)
    if original is None:
        print(f"bench: cannot time {owner.__name__}.{name}: not found", file=sys.stderr)
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        # not ``with watch``: calls run on several threads at once (asyncio.to_thread)
        if outermost:
            if getattr(_outermost, "inside", False):
                return original(*args, **kwargs)
            _outermost.inside = True
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            watch.add(time.perf_counter() - t0)
            if outermost:
                _outermost.inside = False

    setattr(owner, name, timed)


#: what the ledger's public methods do, for the breakdowns (each timed as its outermost call)
LEDGER_READS = (
    "rows", "rows_for_submissions", "latest_submissions", "latest_submission", "submission",
    "submissions", "jobs_to_poll", "counts_by_status", "events", "revision",
)  # fmt: skip
LEDGER_SUBMIT_WRITES = ("claim", "record_submitted", "release", "mark_uncertain", "heartbeat")


def wrap_ledger(watches: dict[str, Stopwatch]) -> None:
    """Time the ledger's calls into ``watches``: ``ledger_read``, ``ledger_recover``,
    ``ledger_apply`` (the poller's one transaction), ``ledger_submit`` (claims and request_ids),
    ``ledger_register`` and ``publish`` (the Parquet catalogs)."""
    # not `import kvid_dagster.ledger.publish as ...`: the package's `publish` is the function
    publish_module = importlib.import_module("kvid_dagster.ledger.publish")
    import kvid_dagster.core.project as project_module
    from kvid_dagster.ledger import Ledger

    for name in LEDGER_READS:
        wrap_sync(Ledger, name, watches["ledger_read"], outermost=True)
    for name in LEDGER_SUBMIT_WRITES:
        wrap_sync(Ledger, name, watches["ledger_submit"], outermost=True)
    wrap_sync(Ledger, "recover", watches["ledger_recover"], outermost=True)
    wrap_sync(Ledger, "apply", watches["ledger_apply"], outermost=True)
    wrap_sync(Ledger, "register", watches["ledger_register"], outermost=True)
    # KvidProject.publish calls the name it imported; time both spellings, once
    wrap_sync(project_module, "publish", watches["publish"], outermost=True)
    wrap_sync(publish_module, "publish", watches["publish"], outermost=True)


LEDGER_WATCHES = (
    "ledger_read", "ledger_recover", "ledger_apply", "ledger_submit", "ledger_register", "publish",
)  # fmt: skip


def wrap_async(
    owner: Any, name: str, watch: Stopwatch, on_done: Callable[[float], Any] | None = None
) -> None:
    """Time every await of ``owner.name`` (a coroutine method) into ``watch``; ``on_done`` gets
    the ``time.monotonic()`` at which each call returned. Missing names are skipped."""
    original = getattr(owner, name, None)
    if original is None:
        print(f"bench: cannot time {owner.__name__}.{name}: not found", file=sys.stderr)
        return

    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            watch.add(time.perf_counter() - t0)
            if on_done is not None:
                on_done(time.monotonic())

    setattr(owner, name, timed)


class DatabaseUnavailable(RuntimeError):
    """The PostgreSQL server (or its driver) is not there: the phase reports itself skipped."""


def postgres_admin_url() -> str:
    """``KVID_TEST_DATABASE_URL`` (what CI and the tests use), else the local default."""
    return os.environ.get("KVID_TEST_DATABASE_URL") or DEFAULT_POSTGRES_ADMIN_URL


@contextmanager
def fresh_postgres_database(prefix: str = "kvid_bench") -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty PostgreSQL database, dropped (``WITH (FORCE)``) on
    exit, as ``tests/conftest.py`` makes one per test; :class:`DatabaseUnavailable` when the
    server cannot be reached or psycopg is not installed."""
    import sqlalchemy as sa

    admin_url = sa.make_url(postgres_admin_url()).set(drivername="postgresql+psycopg")
    shown = admin_url.render_as_string(hide_password=True)
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        admin = sa.create_engine(
            admin_url,
            isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
            poolclass=sa.NullPool,
            connect_args={"connect_timeout": 5},
        )
    except ImportError as exc:  # no psycopg
        raise DatabaseUnavailable(f"no PostgreSQL driver ({exc})") from exc
    try:
        try:
            with admin.connect() as connection:
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise DatabaseUnavailable(f"PostgreSQL unreachable at {shown} ({reason})") from exc
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:  # FORCE: a leaked connection must not keep it
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def ledger_database(backend: str, folder: Path) -> Iterator[str]:
    """A fresh, empty ledger database for one run: the SQLite file ``folder/kvid.db`` (the
    default a data folder gets) or a new PostgreSQL database, dropped afterwards."""
    if backend == "sqlite":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "kvid.db"
        if path.exists():
            raise RuntimeError(f"{path} exists: not a fresh database")
        yield f"sqlite:///{path}"
    elif backend in ("postgresql", DEPLOYED):
        with fresh_postgres_database() as url:
            yield url
    else:
        raise ValueError(f"backend {backend!r}: one of {', '.join((*BACKENDS, DEPLOYED))}")


@contextmanager
def s3_storage() -> Iterator[str]:
    """``KVID_STORAGE_URL`` on a fresh bucket of moto's S3 server, in its own process on
    loopback as the emulator is (its CPU is not the benchmarked process's), with the ``AWS_*``
    environment s3fs reads pointed at it; yields the URL."""
    import boto3
    from botocore.exceptions import EndpointConnectionError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        bucket = f"kvid-bench-{secrets.token_hex(4)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=bucket)
                break
            except EndpointConnectionError:  # not listening yet
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"s3://{bucket}/kvid"
    finally:
        server.terminate()
        server.wait(timeout=10)


def dagster_postgres_storage(database_url: str) -> dict[str, Any]:
    """The Dagster instance's ``storage`` config on the ledger's database (as
    deploy/dagster.yaml: dagster-postgres on psycopg2)."""
    import sqlalchemy as sa

    url = sa.make_url(database_url).set(drivername="postgresql+psycopg2")
    return {"postgres": {"postgres_url": url.render_as_string(hide_password=False)}}


def redacted(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def phase_args(
    description: str, add: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The arguments every phase takes: ``--out`` (JSON written there), ``--quick`` and
    ``--backend`` (the ledger's database; phases without a ledger ignore it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="write the figures here (JSON)")
    parser.add_argument("--quick", action="store_true", help="the CI smoke-test sizes")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, DEPLOYED),
        default="sqlite",
        help=f"the ledger's database (fresh); {DEPLOYED}: see DEPLOYED",
    )
    if add is not None:
        add(parser)
    return parser.parse_args()


def write_skipped(path: Path, backend: str, reason: str) -> None:
    """What a phase writes when its database is not there: ``bench/run.py`` shows the column as
    skipped, with the reason, instead of failing (CI without PostgreSQL still runs end to end)."""
    print(f"bench: {backend} skipped: {reason}", file=sys.stderr)
    write_result(path, {"backend": backend, "skipped": reason})


def write_result(path: Path, figures: dict[str, Any]) -> None:
    """Write a phase's figures, with this process's own peak RSS (``VmHWM``) added."""
    figures = {**figures, "process_peak_rss_mb": process_peak_mb(), "process_cpu_s": cpu_s()}
    path.write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")


@contextmanager
def scratch(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """A temporary folder (inside ``workdir`` when given), removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir, prefix=prefix) as tmp:
        yield Path(tmp)
