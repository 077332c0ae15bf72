"""The kvid-dagster benchmark suite: every yardstick and target in one run, against the emulator.

    .venv/bin/python bench/run.py            # full: a few minutes on two cores
    .venv/bin/python bench/run.py --quick    # CI smoke test: small sizes, under a minute
    .venv/bin/python bench/run.py --only backfill,vendor --out bench/results-mine.json

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

# name -> (command after the interpreter, what it measures)
PHASES: dict[str, tuple[list[str], str]] = {
    "floor": (["-m", "bench.dagster_floor"], "Dagster's floor: the cost of a run"),
    "vendor": (["-m", "bench.vendor_loop"], "the vendor's loop, one job at a time"),
    "bare": (["-m", "bench.bare_client"], "a bare asyncio client, no Dagster"),
    "backfill": (["-m", "bench.backfill"], "the backfill through Dagster"),
    "sensor": (["-m", "bench.sensor_tick"], "one status-sensor tick over many pending jobs"),
    "catalog": (["bench/bench_catalog.py"], "the Parquet catalog (bench/bench_catalog.py)"),
}
MEMORY_TARGET_MB = 500.0


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


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_phase(name: str, quick: bool, workdir: Path, extra: list[str]) -> PhaseRun:
    """Run one phase in its own process; collect its figures and its own resource usage."""
    command, _ = PHASES[name]
    out = workdir / f"{name}.json"
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, *command, "--out", str(out), *(["--quick"] if quick else []), *extra]
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


def yardstick_rows(runs: dict[str, PhaseRun], quick: bool) -> list[Row]:
    rows: list[Row] = []
    sec = "yardsticks"
    backfill = runs.get("backfill")
    bf = backfill.figures if backfill and backfill.ok else {}
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
                f"bare asyncio client, no Dagster/catalog (N={f['n']})",
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


def backfill_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    run = runs.get("backfill")
    if not run or not run.ok:
        return []
    f = run.figures
    w = f["watches"]
    sec = f"backfill N={f['n']} (C={f['workers']}, L={f['job_duration_s']:g} s)"
    rows = [
        Row(
            sec,
            "backfill launched → every video downloaded, in the catalog, materialized",
            _s(f["elapsed_s"], 1),
            f"{f['throughput_jobs_per_s']:.2f} jobs/s; {f['backfill_runs']} run, "
            f"{f['ticks']} sensor ticks",
        ),
        Row(
            sec,
            "ratio to the physical limit",
            f"{f['ratio_to_limit']:.3f}x",
            f"limit {f['limit_with_interval_s']:.1f} s",
            "≤ 1.25x",
            f["ratio_to_limit"] <= 1.25,
        ),
    ]
    vendor = runs.get("vendor")
    if vendor and vendor.ok:
        ratio = f["throughput_jobs_per_s"] / vendor.figures["throughput_jobs_per_s"]
        rows.append(
            Row(sec, "throughput vs the vendor loop", f"{ratio:.1f}x", "", "≥ 20x", ratio >= 20)
        )
    step = f.get("step_start_s")
    rows += [
        Row(sec, "  backfill added → run started (daemon iteration)", _s(f["launch_s"])),
        Row(
            sec,
            "  run started → step started (in-process executor: no step process)",
            _s(step - f["launch_s"] if step is not None else None),
        ),
        Row(
            sec,
            "  → first job submitted",
            _s(f["first_submitted_s"]),
            "after the backfill was added",
        ),
        Row(
            sec,
            f"  submission of {f['n']} jobs (first → last generate)",
            _s(f["last_submitted_s"] - f["first_submitted_s"]),
            "async client, 32 in flight, catalog row per job",
        ),
        Row(
            sec,
            "  last submitted → run ended",
            _s(f["run_end_s"] - f["last_submitted_s"]),
            f"{f['n']} kvid_video_jobs materializations stored",
        ),
        Row(
            sec,
            "  waiting on the service (first job created → last job done)",
            _s(f["service_end_s"] - f["first_submitted_s"]),
            "emulator booking replayed from the submission times",
        ),
        Row(
            sec,
            "  last job done → noticed, downloaded, stored",
            _s(f["notice_lag_s"]),
        ),
        Row(
            sec,
            "  sensor ticks (total; max)",
            f"{w['sensor_tick']['total_s']:.2f} s; {w['sensor_tick']['max_s']:.2f} s",
            f"{w['sensor_tick']['count']} ticks, every {f['interval_s']:g} s start to start",
        ),
        Row(
            sec,
            "    poll_pending: status polls, results, downloads",
            _s(w["poll_pending"]["total_s"]),
            f"{f['emulator']['requests']['status']} status requests; "
            f"{w['download']['count']} downloads ({w['download']['total_s']:.1f} s summed "
            f"over concurrent ones); probes {w['probe']['total_s']:.2f} s",
        ),
        Row(
            sec,
            "    event storage (report_runless_asset_event)",
            _s(w["event_storage"]["total_s"]),
            f"{w['event_storage']['count']} events "
            f"({1e3 * w['event_storage']['total_s'] / max(1, w['event_storage']['count']):.0f}"
            " ms each)",
        ),
        Row(
            sec,
            "    catalog reads / writes in the ticks",
            f"{w['catalog_read']['total_s']:.2f} s / {w['catalog_write']['total_s']:.2f} s",
            f"{w['catalog_read']['count']} reads, {w['catalog_write']['count']} writes",
        ),
        Row(
            sec,
            "  publishing the Parquet catalog afterwards (kvid_catalog run)",
            _s(f["publish_catalog_run_s"]),
            "not in the figure above",
        ),
        Row(
            sec,
            "  set-up, not counted: code location (gRPC server) / kvid_prompts run",
            f"{f['setup_workspace_s']:.2f} s / {f['setup_prompts_run_s']:.2f} s",
        ),
    ]
    return rows


def sensor_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    run = runs.get("sensor")
    if not run or not run.ok:
        return []
    f = run.figures
    sec = f"status-sensor tick, {f['n']:,} pending jobs"
    rows = []
    for label, tick in (
        (f"first tick (catalog log: {f['log_parts_after_submission']:,} parts)", f["first_tick"]),
        ("second tick", f["second_tick"]),
    ):
        rows.append(
            Row(
                sec,
                label,
                _s(tick["tick_s"], 1),
                f"{tick['tick_s'] / f['sensor_timeout_s']:.0%} of the 60 s sensor timeout; "
                f"polled {tick['polled']:,}/{tick['pending']:,}; catalog reads "
                f"{tick['catalog_read_s']:.1f} s",
                "well inside 60 s",
                tick["tick_s"] < 0.75 * f["sensor_timeout_s"] and tick["deferred"] == 0,
            )
        )
    second = f["second_tick"]
    rows.append(
        Row(
            sec,
            "poll rate (status requests/s, emulator on the same 2 cores)",
            f"{second['poll_rate_per_s']:.0f} /s",
            f"{second['status_requests']:,} in {second['status_span_s']:.1f} s; mean latency "
            f"{second['status_latency_mean_ms']:.0f} ms at 32 in flight",
        )
    )
    carried = f["carried_ticks"]
    rows.append(
        Row(
            sec,
            f"budget {f['carried_budget_s']:g} s: ticks carry the rest by the cursor",
            " → ".join(f"{c['polled']:,}" for c in carried),
            "polled per tick, each starting after the previous tick's last key ("
            + ", ".join(str(c["last_key"]) for c in carried)
            + ")",
        )
    )
    peak = max(f["first_tick"]["peak_rss_mb"], f["second_tick"]["peak_rss_mb"])
    rows.append(
        Row(
            sec,
            "peak RSS of the sensor's process during the ticks",
            _mb(peak),
            f"before the first tick {f['first_tick']['rss_before_mb']:.0f} MB "
            "(Dagster, pandas, pyarrow loaded)",
            f"< {MEMORY_TARGET_MB:.0f} MB",
            peak < MEMORY_TARGET_MB,
        )
    )
    return rows


def catalog_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    run = runs.get("catalog")
    if not run or not run.ok:
        return []
    f = run.figures
    sec = f"catalog, {f['rows']:,} rows"
    u = f["update_one_ms"]
    c1, c2 = f["compact1"], f["compact2"]
    return [
        Row(sec, "latest(), compacted", _s(f["latest_compacted_s"], 3), "", "< 1 s",
            f["latest_compacted_s"] < 1),
        Row(sec, f"latest() with {f['log_parts']} log parts", _s(f["latest_with_log_s"], 3), "",
            "< 1 s", f["latest_with_log_s"] < 1),
        Row(sec, "update(): one status change (durable, fsync)", f"{u['median']:.2f} ms",
            f"p95 {u['p95']:.2f} ms, max {u['max']:.2f} ms over {u['n']}", "< 20 ms",
            u["p95"] < 20),
        Row(sec, f"compaction #1 ({c1['rows']:,} rows, {c1['submission_rows']:,} events)",
            _s(c1["seconds"]), f"peak RSS {c1['rss_peak_mb']:.0f} MB "
            f"(baseline {c1['rss_before_mb']:.0f}), Arrow {c1['arrow_peak_mb']:.0f} MB"),
        Row(sec, f"compaction #2 ({c2['parts']} parts folded)", _s(c2["seconds"]),
            f"peak RSS {c2['rss_peak_mb']:.0f} MB, Arrow {c2['arrow_peak_mb']:.0f} MB"),
        Row(sec, "pandas.read_parquet(catalog/videos)", _s(f["read_parquet_s"], 3),
            f"published file {f['published_mb']:.1f} MB"),
    ]  # fmt: skip


def memory_rows(runs: dict[str, PhaseRun]) -> list[Row]:
    sec = f"peak resident memory (target < {MEMORY_TARGET_MB:.0f} MB)"
    rows = []
    bf = runs.get("backfill")
    if bf and bf.ok:
        f = bf.figures
        rows_memory = [
            (
                "backfill: daemon iteration + run launcher process (the run executes in it)",
                f["run_process_peak_rss_mb"],
            ),
        ]
        if f["step_process_peak_rss_mb"] is not None:  # a multiprocess executor was configured
            rows_memory.append(
                (
                    "backfill: the run's step process (submits every job)",
                    f["step_process_peak_rss_mb"],
                )
            )
        for label, value in (
            *rows_memory,
            (f"backfill: status-sensor ticks over {f['n']} jobs", f["sensor_peak_rss_mb"]),
            ("backfill: the code location's gRPC server", f["code_server_peak_rss_mb"]),
        ):
            ok = None if value is None else value < MEMORY_TARGET_MB
            rows.append(Row(sec, label, _mb(value), "", f"< {MEMORY_TARGET_MB:.0f} MB", ok))
    for name, run in runs.items():
        if run.ok:
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
    parser.add_argument("--quick", action="store_true", help="CI smoke-test sizes (under ~60 s)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results.json", help="JSON output"
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated phases (default all: {','.join(PHASES)})"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and scratch here")
    parser.add_argument("--profile", action="store_true", help="cProfile the backfill and tick")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PHASES)
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")

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
    for name in names:
        extra: list[str] = []
        if args.profile and name in ("backfill", "sensor"):
            extra = ["--profile", str(workdir / f"{name}.prof")]
        if name != "catalog":
            extra += ["--workdir", str(workdir)]
        print(f"  {name}: {PHASES[name][1]} ...", end=" ", flush=True)
        run = runs[name] = run_phase(name, args.quick, workdir, extra)
        others = "" if run.others_cores is None else f", others used {run.others_cores:.2f} cores"
        state = "ok" if run.ok else "FAILED"
        print(f"{state} in {run.wall_s:.1f} s (cpu {run.cpu_s:.1f} s{others})", flush=True)
        if not run.ok:
            print(run.log, file=sys.stderr)

    rows = (
        yardstick_rows(runs, args.quick)
        + backfill_rows(runs)
        + sensor_rows(runs)
        + catalog_rows(runs)
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
    print(f"\n{len(runs)} phases in {total:.0f} s; figures in {args.out}")
    if args.workdir is None and all(r.ok for r in runs.values()) and not args.profile:
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.workdir is None:
        print(f"logs and profiles kept in {workdir}")
    return 0 if all(r.ok for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
