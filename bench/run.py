"""The kvid-dagster benchmark suite: every yardstick and target in one run, against the emulator.

    .venv/bin/python bench/run.py            # full: a few minutes on two cores
    .venv/bin/python bench/run.py --quick    # CI smoke test: small sizes, about a minute
    .venv/bin/python bench/run.py --only backfill,vendor --out bench/results-mine.json
    .venv/bin/python bench/run.py --backends sqlite      # no PostgreSQL column

The ledger, backfill and sensor phases run once per ledger backend, each on a fresh database:
a SQLite file in the phase's scratch folder, and a PostgreSQL database created on the server at
``KVID_TEST_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``, what CI
starts) and dropped afterwards. The backfill has a third column, ``deployed``: the ledger and
the Dagster instance in one fresh PostgreSQL database, videos and catalogs on S3 (moto's server
in its own process), beside the all-local SQLite figure of the same run. When PostgreSQL is
unreachable those phases say so and the table shows its column as skipped: the run still goes
end to end.

Each phase runs in its own process (``python -m bench.<module>``), so that its peak memory is its
own: the phase reports its ``VmHWM``, and this process, which imports nothing heavy, records the
child's ``ru_maxrss`` from ``wait4`` as a cross-check. Prints a table of figures and ratios and
writes everything to ``--out`` (default ``bench/results.json``). Targets are reported as met or
missed, never asserted: the exit status is non-zero only when a phase crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (command after the interpreter, what it measures, runs once per ledger backend)
PHASES: dict[str, tuple[list[str], str, bool]] = {
    "floor": (["-m", "bench.dagster_floor"], "Dagster's floor: the cost of a run", False),
    "vendor": (["-m", "bench.vendor_loop"], "the vendor's loop, one job at a time", False),
    "bare": (["-m", "bench.bare_client"], "a bare asyncio client, no Dagster", False),
    "ledger": (["-m", "bench.bench_ledger"], "the job ledger: apply, queries, publish", True),
    "backfill": (["-m", "bench.backfill"], "the backfill through Dagster", True),
    "sensor": (["-m", "bench.sensor_tick"], "one status-sensor tick over many pending jobs", True),
    "sources": (["-m", "bench.prompt_sources"], "a prompt table from each source", False),
    "checks": (["-m", "bench.video_checks"], "the video checks' cost per fetched video", False),
}
BACKENDS = ("sqlite", "postgresql")
#: the backfill's deployment column (bench/common.py's DEPLOYED): the ledger and the Dagster
#: instance on PostgreSQL, videos and catalogs on S3; run wherever PostgreSQL is
DEPLOYED = "deployed"
SHORT = {"sqlite": "SQLite", "postgresql": "PostgreSQL", DEPLOYED: "PostgreSQL+S3"}
#: phases that --quick runs on SQLite only: at N=32 a backfill is Dagster's fixed costs (~15 s
#: of CPU a run), the ledger's share of it is what the full run shows on both backends (the
#: deployment column still runs, so that CI runs its code end to end)
QUICK_SQLITE_ONLY = frozenset({"backfill"})
MEMORY_TARGET_MB = 500.0
#: the catalog engine's second 5,000-job tick (docs/BENCHMARKS.md, 2026-11-26), for the text
CATALOG_ENGINE_TICK_S = 8.3


@dataclass
class PhaseRun:
    name: str
    ok: bool
    wall_s: float
    cpu_s: float  # the phase's process and the children it waited for
    ru_maxrss_mb: float
    others_cores: float | None  # CPU the rest of the machine used meanwhile, in cores
    figures: dict[str, Any] = field(default_factory=dict)
    log: str = ""

    @property
    def skipped(self) -> str | None:
        """Why the phase did not measure (its database is not there), or None."""
        return self.figures.get("skipped") if self.ok else None

    @property
    def measured(self) -> bool:
        return self.ok and not self.skipped


def run_name(phase: str, backend: str | None) -> str:
    return phase if backend is None else f"{phase}/{backend}"


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_phase(
    phase: str, backend: str | None, quick: bool, workdir: Path, extra: list[str]
) -> PhaseRun:
    """Run one phase in its own process; collect its figures and its own resource usage."""
    command, _, _ = PHASES[phase]
    name = run_name(phase, backend)
    stem = name.replace("/", "-")
    out = workdir / f"{stem}.json"
    log_path = workdir / f"{stem}.log"
    cmd = [sys.executable, *command, "--out", str(out), *(["--quick"] if quick else []), *extra]
    if backend is not None:
        cmd += ["--backend", backend]
    busy0, t0 = machine_busy_s(), time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    busy1 = machine_busy_s()
    cpu = usage.ru_utime + usage.ru_stime
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    ok = proc.returncode == 0 and out.exists()
    figures = json.loads(out.read_text()) if ok else {}
    tail = "" if ok else "".join(log_path.read_text(errors="replace").splitlines(True)[-40:])
    return PhaseRun(name, ok, wall, cpu, usage.ru_maxrss / 1024, others, figures, tail)


# --- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    measure: str
    value: str
    note: str = ""
    target: str = ""
    met: bool | None = None


def _s(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} s"


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


class Side:
    """One phase's runs on each ledger backend, for a table whose values read SQLite | PostgreSQL
    (a backend that was skipped shows as such, a crashed one as FAILED)."""

    def __init__(self, runs: dict[str, PhaseRun], phase: str) -> None:
        self.pairs = [
            (b, runs[run_name(phase, b)])
            for b in (*BACKENDS, DEPLOYED)
            if run_name(phase, b) in runs
        ]
        self.figures = {b: r.figures for b, r in self.pairs if r.measured}

    def __bool__(self) -> bool:
        return bool(self.figures)

    @property
    def header(self) -> str:
        return " | ".join(SHORT[b] for b, _ in self.pairs)

    @property
    def first(self) -> dict[str, Any]:
        return next(iter(self.figures.values()))

    def value(self, fn: Callable[[dict[str, Any]], str]) -> str:
        return " | ".join(
            fn(r.figures) if r.measured else ("skipped" if r.skipped else "FAILED")
            for _, r in self.pairs
        )

    def met(self, fn: Callable[[dict[str, Any]], bool]) -> bool | None:
        verdicts = [fn(f) for f in self.figures.values()]
        return all(verdicts) if verdicts else None

    def ratio(self, fn: Callable[[dict[str, Any]], float]) -> str:
        """PostgreSQL's figure over SQLite's, when both ran."""
        if "sqlite" not in self.figures or "postgresql" not in self.figures:
            return ""
        base = fn(self.figures["sqlite"])
        return f"PostgreSQL/SQLite {fn(self.figures['postgresql']) / base:.2f}x" if base else ""

    def skipped_note(self) -> list[Row]:
        return [
            Row("", f"{SHORT[b]}: skipped", "", r.skipped or "") for b, r in self.pairs if r.skipped
        ]


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def yardstick_rows(runs: dict[str, PhaseRun], quick: bool) -> list[Row]:
    rows: list[Row] = []
    sec = "yardsticks"
    side = Side(runs, "backfill")
    bf = side.first if side else {}
    n = bf.get("n") or (32 if quick else 200)
    workers, duration, interval = bf.get("workers", 16), bf.get("job_duration_s", 2.0), 0.5
    limit = math.ceil(n / workers) * duration
    rows.append(
        Row(
            sec,
            f"physical limit ⌈N/C⌉·L + 1 poll, N={n} C={workers} L={duration:g} s",
            _s(limit + interval, 1),
            f"{n / (limit + interval):.2f} jobs/s",
        )
    )
    bare = runs.get("bare")
    if bare and bare.ok:
        f = bare.figures
        rows.append(
            Row(
                sec,
                f"bare asyncio client, no Dagster/ledger (N={f['n']})",
                _s(f["elapsed_s"], 1),
                f"{f['ratio_to_limit']:.3f}x limit, {f['throughput_jobs_per_s']:.2f} jobs/s",
            )
        )
    vendor = runs.get("vendor")
    if vendor and vendor.ok:
        f = vendor.figures
        per_job = f["elapsed_s"] / f["jobs"]
        rows.append(
            Row(
                sec,
                f"vendor loop (requests, 1 job at a time, 5 s polls), {f['jobs']} job(s) measured",
                f"{f['throughput_jobs_per_s']:.3f} jobs/s",
                f"{per_job:.2f} s/job; {n} jobs ≈ {n * per_job:.0f} s (extrapolated, not run)",
            )
        )
    floor = runs.get("floor")
    if floor and floor.ok:
        f = floor.figures
        rows.append(Row(sec, "import dagster (fresh interpreter)", _s(f["import_dagster_s"])))
        rows.append(
            Row(
                sec,
                "in-process run of a trivial partitioned asset (SQLite instance)",
                _s(f["in_process_run_s"]),
                f"first {f['in_process_first_run_s']:.2f} s; run per partition x{n} "
                f"≈ {n * f['in_process_run_s']:.0f} s",
            )
        )
        if f.get("cli_run_s"):
            cli = f["cli_run_s"]
            cores = f.get("cpus") or 1
            rows.append(
                Row(
                    sec,
                    "`dagster asset materialize` one partition (a process per run)",
                    _s(cli),
                    f"process per partition x{n} ≈ {n * cli:.0f} s serial, "
                    f"≥ {n * cli / cores:.0f} s on {cores} cores (extrapolated)",
                )
            )
    return rows


def _tick_ledger(f: dict[str, Any], name: str) -> float:
    return float(f["ledger_in_ticks"][name]["total_s"])


def backfill_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    side = Side(runs, "backfill")
    if not side:
        return []
    f0 = side.first
    sec = (
        f"backfill N={f0['n']} (C={f0['workers']}, L={f0['job_duration_s']:g} s), "
        f"ledger on {side.header}"
    )
    v = side.value

    def submit_in_run(f: dict[str, Any]) -> float:
        return f["watches"]["ledger_submit"]["total_s"] - _tick_ledger(f, "ledger_submit")

    rows = [
        Row(
            sec,
            "backfill launched → every video downloaded, in the ledger, materialized",
            v(lambda f: _s(f["elapsed_s"], 1)),
            v(lambda f: f"{f['throughput_jobs_per_s']:.2f} jobs/s {f['ticks']} ticks"),
        ),
        Row(
            sec,
            "rows COMPLETED in the ledger (and in the published catalog)",
            v(lambda f: f"{f['completed_rows']}/{f['n']}"),
            "each video re-hashed against its sha256; one backfill run; N jobs billed",
            "all",
            side.met(lambda f: f["completed_rows"] == f["n"]),
        ),
        Row(
            sec,
            "ratio to the physical limit",
            v(lambda f: f"{f['ratio_to_limit']:.3f}x"),
            _join(
                f"limit {f0['limit_with_interval_s']:.1f} s", side.ratio(lambda f: f["elapsed_s"])
            ),
            "≤ 1.25x",
            side.met(lambda f: f["ratio_to_limit"] <= 1.25),
        ),
    ]
    if DEPLOYED in side.figures and "sqlite" in side.figures:
        local, deployed = side.figures["sqlite"], side.figures[DEPLOYED]
        rows.append(
            Row(
                sec,
                "deployed (Dagster and the ledger on PostgreSQL, videos and catalogs on S3) "
                "vs all-local (SQLite, the data dir)",
                f"{deployed['elapsed_s'] / local['elapsed_s']:.2f}x",
                f"{deployed['elapsed_s']:.1f} vs {local['elapsed_s']:.1f} s, same run; S3 is "
                "moto's server on loopback",
            )
        )
    vendor = runs.get("vendor")
    if vendor and vendor.ok:
        per_s = vendor.figures["throughput_jobs_per_s"]
        rows.append(
            Row(
                sec,
                "throughput vs the vendor loop",
                v(lambda f: f"{f['throughput_jobs_per_s'] / per_s:.1f}x"),
                "",
                "≥ 20x",
                side.met(lambda f: f["throughput_jobs_per_s"] / per_s >= 20),
            )
        )

    def step(f: dict[str, Any]) -> str:
        start = f.get("step_start_s")
        return _s(start - f["launch_s"] if start is not None else None)

    def ticks_ledger(f: dict[str, Any]) -> str:
        parts = [_tick_ledger(f, k) for k in ("ledger_read", "ledger_apply", "publish")]
        return " / ".join(f"{x:.2f}" for x in parts) + " s"

    rows += [
        Row(
            sec, "  backfill added → run started (daemon iteration)", v(lambda f: _s(f["launch_s"]))
        ),
        Row(sec, "  run started → step started (in-process executor)", v(step)),
        Row(
            sec,
            "  → first job submitted",
            v(lambda f: _s(f["first_submitted_s"])),
            "after the backfill was added",
        ),
        Row(
            sec,
            f"  submission of {f0['n']} jobs (first → last generate)",
            v(lambda f: _s(f["last_submitted_s"] - f["first_submitted_s"])),
            f"generate_concurrency {f0['generate_concurrency']}: a committed claim before each "
            "generate, its request_id after",
        ),
        Row(
            sec,
            "    ledger calls of the submission (claims, request_ids; summed)",
            v(lambda f: _s(submit_in_run(f))),
            v(lambda f: f"{f['watches']['ledger_submit']['count']} calls")
            + ", concurrent ones overlap",
        ),
        Row(
            sec,
            "  last submitted → run ended",
            v(lambda f: _s(f["run_end_s"] - f["last_submitted_s"])),
            f"{f0['n']} kvid_video_jobs materializations stored, catalog published",
        ),
        Row(
            sec,
            "  waiting on the service (first job created → last job done)",
            v(lambda f: _s(f["service_end_s"] - f["first_submitted_s"])),
            "emulator booking replayed from the submission times",
        ),
        Row(
            sec, "  last job done → noticed, downloaded, stored", v(lambda f: _s(f["notice_lag_s"]))
        ),
        Row(
            sec,
            "  sensor ticks (total; max)",
            v(
                lambda f: (
                    f"{f['watches']['sensor_tick']['total_s']:.2f}; "
                    f"{f['watches']['sensor_tick']['max_s']:.2f} s"
                )
            ),
            f"every {f0['interval_s']:g} s start to start",
        ),
        Row(
            sec,
            "    poll_pending: status polls, results, downloads",
            v(lambda f: _s(f["watches"]["poll_pending"]["total_s"])),
            v(lambda f: f"{f['emulator']['requests']['status']} status requests")
            + f"; {f0['watches']['download']['count']} downloads",
        ),
        Row(
            sec,
            "    event storage (report_runless_asset_event)",
            v(lambda f: _s(f["watches"]["event_storage"]["total_s"])),
            v(lambda f: f"{f['watches']['event_storage']['count']} events"),
        ),
        Row(
            sec,
            "    ledger in the ticks: reads / apply / publish",
            v(ticks_ledger),
            v(
                lambda f: (
                    f"{f['ledger_in_ticks']['ledger_read']['count']} reads, "
                    f"{f['ledger_in_ticks']['publish']['count']} publications"
                )
            ),
        ),
        Row(
            sec,
            "  publishing the Parquet catalog afterwards (kvid_catalog run)",
            v(lambda f: _s(f["publish_catalog_run_s"])),
            "not in the figure above",
        ),
        Row(
            sec,
            "  set-up, not counted: code location (gRPC server) / kvid_prompts run",
            v(lambda f: f"{f['setup_workspace_s']:.2f} / {f['setup_prompts_run_s']:.2f} s"),
        ),
    ]
    return rows + [Row(sec, r.measure, r.value, r.note) for r in side.skipped_note()]


def sensor_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    side = Side(runs, "sensor")
    if not side:
        return []
    f0 = side.first
    n = f0["n"]
    sec = f"status-sensor tick, {n:,} pending jobs, ledger on {side.header}"
    v = side.value
    timeout = f0["sensor_timeout_s"]

    def inside(tick: str) -> Callable[[dict[str, Any]], bool]:
        return lambda f: f[tick]["tick_s"] < 0.75 * timeout and f[tick]["deferred"] == 0

    def ledger_parts(tick: str) -> Callable[[dict[str, Any]], str]:
        def fmt(f: dict[str, Any]) -> str:
            led = f[tick]["ledger"]
            read = led["ledger_read"]["total_s"] + led["ledger_recover"]["total_s"]
            parts = (read, led["ledger_apply"]["total_s"], led["publish"]["total_s"])
            return " / ".join(f"{x:.2f}" for x in parts) + " s"

        return fmt

    rows = []
    for label, tick in (
        (f"first tick ({n:,} SUBMITTED → IN_QUEUE applied, catalogs published)", "first_tick"),
        ("second tick (nothing new: only running jobs can move)", "second_tick"),
    ):
        rows += [
            Row(
                sec,
                label,
                v(lambda f, t=tick: _s(f[t]["tick_s"], 1)),
                _join(
                    v(lambda f, t=tick: f"{f[t]['tick_s'] / timeout:.0%}") + " of the 60 s timeout",
                    v(lambda f, t=tick: f"polled {f[t]['polled']:,}/{f[t]['pending']:,}"),
                    v(lambda f, t=tick: f"{f[t]['changed']:,} changed"),
                    side.ratio(lambda f, t=tick: f[t]["tick_s"]),
                ),
                "well inside 60 s",
                side.met(inside(tick)),
            ),
            Row(
                sec,
                "  its status polls (first request sent → last answered)",
                v(lambda f, t=tick: _s(f[t]["status_span_s"], 1)),
                v(lambda f, t=tick: f"{f[t]['poll_rate_per_s']:.0f}/s")
                + " at 32 in flight; emulator on the same 2 cores",
            ),
            Row(
                sec,
                "  its ledger calls: reads (jobs_to_poll, rows, recover) / apply / publish",
                v(ledger_parts(tick)),
                v(lambda f, t=tick: f"{f[t]['ledger']['ledger_read']['count']} reads"),
            ),
        ]
    carried = f0["carried_ticks"]
    rows.append(
        Row(
            sec,
            f"budget {f0['carried_budget_s']:g} s: ticks carry the rest by the cursor",
            " → ".join(f"{c['polled']:,}" for c in carried),
            f"{SHORT[next(iter(side.figures))]}: polled per tick, each starting after the previous "
            "tick's last submission_id ("
            + ", ".join(str(c["last_submission_id"]) for c in carried)
            + ")",
        )
    )
    rows.append(
        Row(
            sec,
            f"set-up, not counted: register_table + submit_rows of {n:,} rows",
            v(lambda f: _s(f["setup"]["submit_s"], 1)),
            v(lambda f: f"{f['setup']['submitted'] / f['setup']['submit_s']:.0f} rows/s")
            + f", generate_concurrency {f0['setup']['generate_concurrency']}",
        )
    )

    def peak(f: dict[str, Any]) -> float:
        return float(max(f["first_tick"]["peak_rss_mb"], f["second_tick"]["peak_rss_mb"]))

    rows.append(
        Row(
            sec,
            "peak RSS of the sensor's process during the ticks",
            v(lambda f: _mb(peak(f))),
            v(lambda f: f"{f['first_tick']['rss_before_mb']:.0f} MB")
            + " before the first tick (Dagster, pandas, pyarrow loaded)",
            f"< {MEMORY_TARGET_MB:.0f} MB",
            side.met(lambda f: peak(f) < MEMORY_TARGET_MB),
        )
    )
    return rows + [Row(sec, r.measure, r.value, r.note) for r in side.skipped_note()]


def ledger_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    side = Side(runs, "ledger")
    if not side:
        return []
    f0 = side.first
    rows_n, pending, changes = f0["rows"], f0["pending"], f0["changes"]
    sec = f"ledger, {rows_n:,} rows ({pending:,} pending), {side.header}"
    v = side.value
    return [
        Row(
            sec,
            f"Ledger.apply: {changes:,} status changes, one transaction",
            v(lambda f: _s(f["apply_s"], 3)),
            _join(
                "vs one executemany UPDATE of the same: "
                + v(lambda f: f"{f['apply_s'] / f['plain_update_s']:.1f}x"),
                side.ratio(lambda f: f["apply_s"]),
            ),
        ),
        Row(
            sec,
            "Ledger.apply: one change, one commit (median; p95)",
            v(lambda f: f"{f['apply_one_ms']['median']:.1f}; {f['apply_one_ms']['p95']:.1f} ms"),
            f"over {f0['apply_one_ms']['n']}; SQLite synchronous=FULL (an fsync per commit)",
        ),
        Row(
            sec,
            "a submitted row: claim / record_submitted (one commit each)",
            v(lambda f: f"{f['claim_ms']:.1f} / {f['record_submitted_ms']:.1f} ms"),
            "medians; the claim is committed before the generate leaves",
        ),
        Row(
            sec,
            f"ledger.jobs_to_poll(): the {pending:,} pending jobs",
            v(lambda f: _s(f["jobs_to_poll_s"], 3)),
            _join(
                "vs a plain SELECT of the same rows: "
                + v(lambda f: f"{f['jobs_to_poll_s'] / f['plain_select_s']:.1f}x"),
                side.ratio(lambda f: f["jobs_to_poll_s"]),
            ),
        ),
        Row(
            sec,
            f"ledger.rows(): all {rows_n:,} (a status sensor's first tick)",
            v(lambda f: _s(f["rows_s"], 2)),
            side.ratio(lambda f: f["rows_s"]),
        ),
        Row(
            sec,
            f"ledger.rows_changed_since(): after {changes:,} changes (each later tick)",
            v(lambda f: _s(f["rows_changed_since_s"], 2)),
            _join("sensors.unreported_events", side.ratio(lambda f: f["rows_changed_since_s"])),
        ),
        Row(
            sec,
            f"publish(ledger, dir) after {changes:,} changes: merged into the previous files",
            v(lambda f: _s(f["publish_incremental_s"], 2)),
            _join(
                "what each status tick does; "
                + v(lambda f: f"{f['publish_incremental_s'] / f['publish_s']:.2f}x")
                + " of the first publication",
                side.ratio(lambda f: f["publish_incremental_s"]),
            ),
            "< 2 s",
            side.met(lambda f: f["publish_incremental_s"] < 2.0),
        ),
        Row(
            sec,
            f"publish(ledger, dir), the first: {rows_n:,} rows + {f0['publish_events']:,} events",
            v(lambda f: _s(f["publish_s"], 2)),
            _join(
                "vs a plain pyarrow write of the same tables: "
                + v(lambda f: f"{f['publish_s'] / f['plain_pyarrow_write_s']:.1f}x"),
                side.ratio(lambda f: f["publish_s"]),
            ),
            "< 2 s",
            side.met(lambda f: f["publish_s"] < 2.0),
        ),
        Row(
            sec,
            "  its read_tables (one consistent read into Arrow) / the rest (fsynced writes)",
            v(lambda f: f"{f['publish_read_tables_s']:.2f} / {f['publish_write_s']:.2f} s"),
            "plain pyarrow write " + v(lambda f: _s(f["plain_pyarrow_write_s"])),
        ),
        Row(
            sec,
            "  peak RSS while publishing",
            v(lambda f: _mb(f["publish_peak_rss_mb"])),
            "before " + v(lambda f: _mb(f["publish_rss_before_mb"])),
        ),
        Row(
            sec,
            "pandas.read_parquet(catalog/videos)",
            v(lambda f: _s(f["read_parquet_s"], 3)),
            f"published files {f0['published_videos_mb']:.1f} MB + "
            f"{f0['published_submissions_mb']:.1f} MB",
        ),
        Row(
            sec,
            "set-up, not counted: bulk load (driver executemany)",
            v(lambda f: f"{f['load']['rows'] / f['load']['seconds']:,.0f} rows/s"),
            f"{f0['load']['events']:,} events too",
        ),
    ] + [Row(sec, r.measure, r.value, r.note) for r in side.skipped_note()]


SOURCE_NAMES = {
    "csv": "local CSV",
    "s3-parquet": "Parquet on S3",
    "postgresql": "PostgreSQL table",
    "sqlite": "SQLite table",
}


def source_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    run = runs.get("sources")
    if not run or not run.measured:
        return []
    f = run.figures
    sec = f"prompt table, {f['rows']:,} rows, from each source (median of {f['repeat']})"
    rows = [
        Row(
            sec,
            "the same partition keys and request hashes from every source",
            "yes" if f["same_requests"] else "NO",
            "" if f["same_requests"] else "a bug: see the phase's JSON, requests_digest",
        )
    ]
    for name, label in SOURCE_NAMES.items():
        s = f["sources"].get(name)
        if s is None:
            continue
        if "skipped" in s:
            rows.append(Row(sec, f"{label}: skipped", "", s["skipped"]))
            continue
        rows.append(
            Row(
                sec,
                f"{label}: load_prompt_table (read + validate)",
                _s(s["load_s"]),
                f"its read {s['read_s']:.3f} s; a plain pandas read {s['pandas_s']:.3f} s "
                f"({s['load_s'] / s['pandas_s']:.0f}x)",
            )
        )
        token = Row(
            sec,
            f"{label}: change_token(), unchanged",
            f"{s['token_ms']:.3f} ms",
            f"{s['token_ms'] / 1e3 / s['load_s']:.2%} of a load",
        )
        if "file_sha256_ms" in s:
            token.note += (
                f"; sha256 of the {s['file_mb']:.1f} MB file (the check before tokens) "
                f"{s['file_sha256_ms']:.1f} ms"
            )
        if "md5_sorted_ms" in s:
            token.note += f"; md5 of the sorted rows' md5s {s['md5_sorted_ms']:.1f} ms"
        rows.append(token)
    return rows


def check_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    """What verifying a fetched video costs with the quality checks, beside the probe alone."""
    run = runs.get("checks")
    if not run or not run.measured:
        return []
    f = run.figures
    sec = f"video checks per fetched video, the emulator's clips (median of {f['repeat']})"
    rows = []
    for name, c in f["clips"].items():
        rows.append(
            Row(
                sec,
                f"{name} ({c['width']}x{c['height']}, {c['frames']} frames at {c['fps']} fps, "
                f"{c['size_kb']} kB): probe + checks",
                f"{c['verified_ms']:.1f} ms",
                f"probe alone {c['probe_ms']:.2f} ms ({c['ratio']:.0f}x): the checks add "
                f"{c['added_ms']:.1f} ms; the preview made in the same tick "
                f"{c['preview_ms']:.0f} ms",
            )
        )
    e = f.get("events")
    if e:
        rows.append(
            Row(
                sec,
                f"their results in Dagster's event storage, {e['partitions']} videos (SQLite "
                "instance, stored one by one as the sensor daemon does)",
                f"{e['added_ms_per_video']:.1f} ms",
                f"{e['events_added'] // e['partitions']} more events a video, "
                f"{e['ms_per_added_event']:.1f} ms each, beside {e['before_ms_per_video']:.1f} "
                "ms for the materialization and video_ok stored before the checks",
            )
        )
    return rows


def memory_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    sec = f"peak resident memory (target < {MEMORY_TARGET_MB:.0f} MB)"
    rows = []
    for backend in BACKENDS:
        bf = runs.get(run_name("backfill", backend))
        if not bf or not bf.measured:
            continue
        f = bf.figures
        where = f"backfill ({SHORT[backend]})"
        rows_memory = [
            (
                f"{where}: daemon iteration + run launcher process (the run executes in it)",
                f["run_process_peak_rss_mb"],
            ),
        ]
        if f["step_process_peak_rss_mb"] is not None:  # a multiprocess executor was configured
            rows_memory.append(
                (
                    f"{where}: the run's step process (submits every job)",
                    f["step_process_peak_rss_mb"],
                )
            )
        for label, value in (
            *rows_memory,
            (f"{where}: status-sensor ticks over {f['n']} jobs", f["sensor_peak_rss_mb"]),
            (f"{where}: the code location's gRPC server", f["code_server_peak_rss_mb"]),
        ):
            ok = None if value is None else value < MEMORY_TARGET_MB
            rows.append(Row(sec, label, _mb(value), "", f"< {MEMORY_TARGET_MB:.0f} MB", ok))
    for name, run in runs.items():
        if run.measured:
            own = run.figures.get("process_peak_rss_mb")
            rows.append(
                Row(
                    sec,
                    f"phase process '{name}' (VmHWM; ru_maxrss from wait4)",
                    _mb(own),
                    f"ru_maxrss {run.ru_maxrss_mb:.0f} MB (max over its waited children too)",
                )
            )
    return rows


def condition_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    """How long each phase took, its own CPU, and what the rest of the machine used meanwhile
    (other processes on a shared machine slow every figure above)."""
    sec = "conditions (per phase process, its children included)"
    return [
        Row(
            sec,
            f"{name}: wall / CPU",
            f"{r.wall_s:.1f} s / {r.cpu_s:.1f} s",
            "FAILED; see the JSON's log_tail"
            if not r.ok
            else f"skipped: {r.skipped}"
            if r.skipped
            else (
                ""
                if r.others_cores is None
                else f"other processes used {r.others_cores:.2f} cores meanwhile"
            ),
        )
        for name, r in runs.items()
    ]


def print_table(rows: list[Row], out: Callable[[str], Any] = print) -> None:
    width = max(len(r.measure) for r in rows)
    vwidth = max(len(r.value) for r in rows)
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            out(f"\n== {section}")
        verdict = "" if r.met is None else ("MET" if r.met else "MISSED")
        target = f"[{r.target}{': ' + verdict if verdict else ''}]" if r.target else ""
        note = f"  {r.note}" if r.note else ""
        out(f"{r.measure:<{width}}  {r.value:>{vwidth}}  {target}{note}")


def machine_info() -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    mem_kb = None
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gb": None if mem_kb is None else round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            p: version(p) for p in ("dagster", "httpx", "pandas", "pyarrow", "av", "requests")
        },
        "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke-test sizes (~1 minute)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results.json", help="JSON output"
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated phases (default all: {','.join(PHASES)})"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="the ledger's databases for the ledger, backfill and sensor phases, each a fresh "
        "one (default both; PostgreSQL: KVID_TEST_DATABASE_URL, skipped when unreachable; "
        "--quick runs the backfill on SQLite only unless this is given)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and scratch here")
    parser.add_argument("--profile", action="store_true", help="cProfile the backfill and tick")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PHASES)
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    backends = [b.strip() for b in (args.backends or ",".join(BACKENDS)).split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        parser.error(f"--backends: some of {', '.join(BACKENDS)}")

    def backends_of(phase: str) -> list[str | None]:
        if not PHASES[phase][2]:
            return [None]
        chosen: list[str | None] = list(backends)
        if args.quick and args.backends is None and phase in QUICK_SQLITE_ONLY:
            chosen = ["sqlite"]
        if phase == "backfill" and (args.backends is None or "postgresql" in backends):
            chosen.append(DEPLOYED)
        return chosen

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvid-bench-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info = machine_info()
    mode = "quick" if args.quick else "full"
    print(
        f"kvid-dagster benchmarks ({mode}): {info['nproc']} CPUs, {info['ram_gb']} GB, Python "
        f"{info['python']}, dagster {info['versions']['dagster']}, httpx "
        f"{info['versions']['httpx']}; load average {info['loadavg_start'][0]:.2f}",
        flush=True,
    )
    runs: dict[str, PhaseRun] = {}
    for phase in names:
        for backend in backends_of(phase):
            name = run_name(phase, backend)
            extra: list[str] = ["--workdir", str(workdir)]
            if args.profile and phase in ("backfill", "sensor"):
                extra += ["--profile", str(workdir / f"{name.replace('/', '-')}.prof")]
            print(f"  {name}: {PHASES[phase][1]} ...", end=" ", flush=True)
            run = runs[name] = run_phase(phase, backend, args.quick, workdir, extra)
            others = (
                "" if run.others_cores is None else f", others used {run.others_cores:.2f} cores"
            )
            state = "ok" if run.ok else "FAILED"
            if run.skipped:
                state = f"SKIPPED ({run.skipped})"
            print(f"{state} in {run.wall_s:.1f} s (cpu {run.cpu_s:.1f} s{others})", flush=True)
            if not run.ok:
                print(run.log, file=sys.stderr)

    rows = (
        yardstick_rows(runs, args.quick)
        + backfill_rows(runs)
        + sensor_rows(runs)
        + ledger_rows(runs)
        + source_rows(runs)
        + check_rows(runs)
        + memory_rows(runs)
        + condition_rows(runs)
    )
    if args.quick:  # the targets are stated for the full sizes: no verdict on the small ones
        for row in rows:
            if row.target:
                row.target, row.met = f"full-size target {row.target}", None
    if rows:
        print_table(rows)
    total = time.monotonic() - started
    info["loadavg_end"] = os.getloadavg()
    result = {
        "mode": mode,
        "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_s": total,
        "machine": info,
        "phases": {
            name: {
                "ok": r.ok,
                "wall_s": r.wall_s,
                "cpu_s": r.cpu_s,
                "ru_maxrss_mb": r.ru_maxrss_mb,
                "others_cores": r.others_cores,
                "figures": r.figures,
                **({"log_tail": r.log} if not r.ok else {}),
            }
            for name, r in runs.items()
        },
        "table": [r.__dict__ for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    skipped = [name for name, r in runs.items() if r.skipped]
    print(
        f"\n{len(runs)} phases in {total:.0f} s"
        + (f" ({', '.join(skipped)} skipped)" if skipped else "")
        + f"; figures in {args.out}"
    )
    if args.workdir is None and all(r.ok for r in runs.values()) and not args.profile:
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.workdir is None:
        print(f"logs and profiles kept in {workdir}")
    return 0 if all(r.ok for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
