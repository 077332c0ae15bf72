"""The backfill target: N prompts through Dagster's own backfill machinery, to the last video.

The emulator (its own process) runs each job in exactly L seconds on C workers, and serves one
shared render (``reuse_renders``) so that its encoder is not what is measured. The ledger is a
fresh database (``--backend``: the SQLite file ``<data_dir>/kvid.db``, or a PostgreSQL database
created for the run and dropped after it; ``deployed``: that PostgreSQL database holds the Dagster
instance too, and videos and catalogs go to S3, moto's server in its own process). The clock
starts when the backfill is added to the instance (what the UI's "Launch backfill" does) and
stops when every video is downloaded, recorded COMPLETED in the ledger and materialized in the
instance:

1. the backfill daemon's iteration (``execute_backfill_iteration``, in-process, synchronous run
   launcher) turns the N partitions into ONE run (single-run backfill policy), which submits
   every job concurrently on the async client;
2. the status sensor's logic (``evaluate_status_sensor``: evaluation plus storing its events the
   way the sensor daemon does) ticks every ``--interval`` seconds, start to start, until done.

Each step is timed by wrapping the functions it calls, for the breakdown. Set up beforehand and
not counted: the code location (a gRPC server process, as the daemon keeps one) and the
``kvid_prompts`` run that adds the partitions.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import heapq
import logging
import math
import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
from upath import UPath

from bench.common import (
    API_KEY,
    DEPLOYED,
    LEDGER_WATCHES,
    ROOT,
    DatabaseUnavailable,
    DescendantPeaks,
    Emulator,
    Stopwatch,
    dagster_postgres_storage,
    ledger_database,
    phase_args,
    proc_status_mb,
    quiet_dagster,
    redacted,
    reset_peak_rss,
    s3_storage,
    scratch,
    wrap_async,
    wrap_ledger,
    wrap_sync,
    write_prompts,
    write_result,
    write_skipped,
)

BACKFILL_TAG = "dagster/backfill"


def service_end(created: list[float], workers: int, duration: float) -> float:
    """When the emulator finishes the last job, given the instants its jobs were created: each
    is booked on the worker slot that frees first (what ``emulator/jobs.py`` does)."""
    slots = [0.0] * workers
    heapq.heapify(slots)
    end = 0.0
    for t in sorted(created):
        start = max(t, heapq.heappop(slots))
        heapq.heappush(slots, start + duration)
        end = max(end, start + duration)
    return end


def main() -> int:
    args = _args()
    try:
        return run(args)
    except DatabaseUnavailable as exc:
        write_skipped(args.out, args.backend, str(exc))
        return 0


def _args() -> argparse.Namespace:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, default=None, help="prompts (default 200; quick 32)")
        parser.add_argument("--workers", type=int, default=16, help="emulator capacity C")
        parser.add_argument("--job-duration", type=float, default=2.0, help="L, seconds per job")
        parser.add_argument("--interval", type=float, default=0.5, help="sensor tick interval")
        parser.add_argument("--profile", type=Path, default=None, help="write a cProfile here")

    return phase_args(__doc__.splitlines()[0], add)


def run(args: argparse.Namespace) -> int:
    n = args.n or (32 if args.quick else 200)
    quiet_dagster()

    from dagster import AssetKey, AssetMaterialization, instance_for_test
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    import kvid_dagster.core.poll as poll_module
    import kvid_dagster.sensor_builder as sensors_module
    from kvid_dagster.cli.runner import QUIET_RUN_CONFIG, evaluate_status_sensor
    from kvid_dagster.client import AsyncKvidClient
    from kvid_dagster.core.project import KvidProject
    from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, build_kvid_definitions
    from kvid_dagster.ledger import VideoStatus
    from kvid_dagster.resources import KvidResource

    # --- instrumentation: time what the sensor's tick calls (in this process) ------------------
    watches = {name: Stopwatch() for name in (
        "status", "result", "download", "probe", "poll_pending", "event_storage", "sensor_tick",
        "backfill_iteration", "sleep", *LEDGER_WATCHES,
    )}  # fmt: skip
    wrap_async(AsyncKvidClient, "status", watches["status"])
    wrap_async(AsyncKvidClient, "result", watches["result"])
    wrap_async(AsyncKvidClient, "download", watches["download"])
    wrap_sync(poll_module, "probe_video", watches["probe"])
    wrap_ledger(watches)
    wrap_async(sensors_module, "poll_pending", watches["poll_pending"])
    # the ledger's share of the ticks, apart from the run's (same process, never at once)
    in_ticks = {name: 0.0 for name in LEDGER_WATCHES}
    in_ticks_count = {name: 0 for name in LEDGER_WATCHES}

    deployed = args.backend == DEPLOYED
    with (
        scratch(args.workdir, "kvid-bench-backfill-") as tmp,
        ledger_database(args.backend, tmp / "data") as database_url,
        s3_storage() if deployed else nullcontext() as storage_url,
        Emulator(
            workers=args.workers, job_duration=args.job_duration, output_dir=tmp / "emulator"
        ) as emulator,
    ):
        peaks = DescendantPeaks().start()
        prompts = tmp / "prompts.csv"
        data_dir = tmp / "data"
        keys = write_prompts(prompts, n)
        os.environ.update(
            {
                "KVID_PROMPTS": str(prompts),
                "KVID_DATA_DIR": str(data_dir),
                "KVID_BASE_URL": emulator.base_url,
                "KVID_API_KEY": API_KEY,
                # the code location (definitions.py) and the run read the ledger's URL here
                "KVID_DATABASE_URL": database_url,
                **({"KVID_STORAGE_URL": storage_url} if storage_url else {}),
            }
        )
        project = KvidProject(prompts, data_dir, database_url=database_url)
        resource = KvidResource(api_key=API_KEY, base_url=emulator.base_url)
        defs = build_kvid_definitions(project, resource=resource)
        target = PythonFileTarget(
            python_file=str(ROOT / "definitions.py"),
            attribute="defs",
            working_directory=str(ROOT),
            location_name="kvid_dagster",
        )
        (tmp / "home").mkdir()
        log = logging.getLogger("bench.backfill")
        log.setLevel(logging.ERROR)
        figures: dict[str, Any] = {
            "n": n,
            "backend": args.backend,
            "database": redacted(database_url),
            "workers": args.workers,
            "job_duration_s": args.job_duration,
            "interval_s": args.interval,
            "generate_concurrency": resource.generate_concurrency,
            "storage": storage_url or "the data dir",
        }
        with (
            instance_for_test(
                overrides={"storage": dagster_postgres_storage(database_url)} if deployed else None,
                temp_dir=str(tmp / "home"),
                synchronous_run_coordinator=True,
                synchronous_run_launcher=True,
            ) as instance,
            ExitStack() as stack,
        ):
            t = time.perf_counter()
            workspace = stack.enter_context(create_test_daemon_workspace_context(target, instance))
            asset_graph = workspace.create_request_context().asset_graph
            figures["setup_workspace_s"] = time.perf_counter() - t
            t = time.perf_counter()
            prompts_run = defs.resolve_job_def(PROMPTS_JOB).execute_in_process(
                instance=instance, run_config=QUIET_RUN_CONFIG
            )
            assert prompts_run.success
            figures["setup_prompts_run_s"] = time.perf_counter() - t
            assert instance.get_dynamic_partitions(project.partitions_name) == keys

            materialized = 0
            original_report = instance.report_runless_asset_event

            def report(event: Any) -> None:
                nonlocal materialized
                with watches["event_storage"]:
                    original_report(event)
                if isinstance(event, AssetMaterialization):
                    materialized += 1

            instance.report_runless_asset_event = report  # type: ignore[method-assign]
            for watch in watches.values():  # setup is not part of the figures
                watch.reset()
            reset_peak_rss()
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()

            # --- the clock starts: the backfill is launched ------------------------------------
            t0_wall, t0 = time.time(), time.monotonic()
            backfill = PartitionBackfill.from_asset_partitions(
                backfill_id="benchmark",
                asset_graph=asset_graph,
                partition_names=keys,
                asset_selection=[AssetKey("kvid_video_jobs")],
                backfill_timestamp=t0_wall,
                tags={},
                dynamic_partitions_store=instance,
                all_partitions=False,
                title="kvid benchmark",
                description=None,
                run_config=QUIET_RUN_CONFIG,
            )
            instance.add_backfill(backfill)
            backfill_done = False
            run_peak_mb: float | None = None
            cursor: str | None = None
            ticks = 0
            next_tick = t0
            while not (backfill_done and materialized >= n):
                if time.monotonic() - t0 > 900:
                    raise RuntimeError(f"not done after 900 s: {materialized} of {n}")
                if not backfill_done:
                    with watches["backfill_iteration"]:
                        list(execute_backfill_iteration(workspace, log))
                    status = instance.get_backfill("benchmark").status  # type: ignore[union-attr]
                    if status not in (
                        BulkActionStatus.REQUESTED,
                        BulkActionStatus.COMPLETED_SUCCESS,
                    ):
                        raise RuntimeError(f"the backfill ended {status}")
                    backfill_done = status == BulkActionStatus.COMPLETED_SUCCESS
                    if run_peak_mb is None and len(instance.get_run_records()) > 1:
                        run_peak_mb = proc_status_mb("VmHWM")  # the run has executed
                        reset_peak_rss()
                        continue
                now = time.monotonic()
                if now < next_tick:
                    with watches["sleep"]:
                        time.sleep(next_tick - now)
                next_tick = time.monotonic() + args.interval
                before = {k: (watches[k].total_s, watches[k].count) for k in LEDGER_WATCHES}
                with watches["sensor_tick"]:
                    _, cursor = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
                for k, (total, count) in before.items():
                    in_ticks[k] += watches[k].total_s - total
                    in_ticks_count[k] += watches[k].count - count
                ticks += 1
            elapsed = time.monotonic() - t0
            # --- the clock stops ---------------------------------------------------------------
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(args.profile))
            sensor_peak_mb = proc_status_mb("VmHWM")
            peaks.stop()

            t = time.perf_counter()
            publish = defs.resolve_job_def(CATALOG_JOB).execute_in_process(
                instance=instance, run_config=QUIET_RUN_CONFIG
            )
            assert publish.success
            figures["publish_catalog_run_s"] = time.perf_counter() - t

            # --- verification (outside the clock) -------------------------------------------
            runs = [r for r in instance.get_run_records() if r.dagster_run.tags.get(BACKFILL_TAG)]
            assert len(runs) == 1, f"{len(runs)} backfill runs"
            run = runs[0]
            videos = instance.get_materialized_partitions(AssetKey("kvid_videos"))
            assert videos == set(keys), f"{len(videos)} of {n} partitions materialized"
            jobs_done = instance.get_materialized_partitions(AssetKey("kvid_video_jobs"))
            assert jobs_done == set(keys)
            ledger = project.ledger()
            counts = ledger.counts_by_status()
            assert counts == {VideoStatus.COMPLETED: n}, f"ledger: {counts}"
            latest = pd.read_parquet(str(project.catalog_dir / "videos"))
            assert len(latest) == n and (latest["status"] == "COMPLETED").all()
            for record in latest.to_dict(orient="records"):
                data = UPath(record["local_path"]).read_bytes()  # a path, or an s3:// URI
                assert hashlib.sha256(data).hexdigest() == record["sha256"]
            stats = emulator.stats()
            assert stats["jobs_created"] == n, stats
            run_events = {
                str(e.dagster_event_type): e.timestamp - t0_wall
                for e in instance.all_logs(run.dagster_run.run_id)
                if e.dagster_event_type is not None
            }
            subs = ledger.submissions()
            assert len(subs) == n, f"{len(subs)} submissions for {n} rows"
            created = [s.submitted_at.timestamp() - t0_wall for s in subs if s.submitted_at]
            figures["completed_rows"] = counts.get(VideoStatus.COMPLETED, 0)
            project.ledger().close()

    # --- figures ---------------------------------------------------------------------------
    assert run.start_time is not None and run.end_time is not None
    limit = math.ceil(n / args.workers) * args.job_duration
    step = "DagsterEventType.STEP_START"
    figures.update(
        {
            "elapsed_s": elapsed,
            "limit_s": limit,
            "limit_with_interval_s": limit + args.interval,
            "ratio_to_limit": elapsed / (limit + args.interval),
            "throughput_jobs_per_s": n / elapsed,
            "backfill_runs": len(runs),
            "launch_s": run.start_time - t0_wall,
            "step_start_s": run_events.get(step),
            "first_submitted_s": min(created),
            "last_submitted_s": max(created),
            "step_end_s": run_events.get("DagsterEventType.STEP_SUCCESS"),
            "run_end_s": run.end_time - t0_wall,
            "service_end_s": service_end(created, args.workers, args.job_duration),
            "ticks": ticks,
            "run_process_peak_rss_mb": run_peak_mb,
            "step_process_peak_rss_mb": peaks.peak_of("spawn_main"),
            "code_server_peak_rss_mb": peaks.peak_of("dagster", "grpc"),
            "sensor_peak_rss_mb": sensor_peak_mb,
            "emulator": stats,
            "watches": {k: w.as_dict() for k, w in watches.items()},
            "ledger_in_ticks": {
                k: {"total_s": in_ticks[k], "count": in_ticks_count[k]} for k in LEDGER_WATCHES
            },
        }
    )
    figures["notice_lag_s"] = elapsed - figures["service_end_s"]
    write_result(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
