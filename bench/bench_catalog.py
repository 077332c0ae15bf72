"""Benchmark of the Parquet catalog: prints a table of timings and memory.

    python bench/bench_catalog.py [--rows 100000] [--quick] [--dir PATH] [--out FIGURES.json]

Targets (with 100,000 rows): ``latest()`` < 1 s, one ``update()`` < 20 ms. Compactions run in a
fresh spawned process so that their peak memory is their own: peak RSS (VmHWM; the baseline is
the RSS after imports), the Arrow memory pool's peak, and the Python heap peak (tracemalloc,
which does not see Arrow's buffers). Timings on a shared machine are noisy: compare medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pandas as pd
import pyarrow as pa

from bench.common import proc_status_mb
from kvid_dagster.catalog import KvidCatalog

STATUSES = ["PENDING", "SUBMITTED", "IN_QUEUE", "PROCESSING", "COMPLETED", "FAILED"]


def _row(i: int, rng: random.Random) -> dict[str, Any]:
    """A realistic row: the sizes of prompts, hashes and JSON matter for the file size."""
    done = rng.random() < 0.7
    return {
        "partition_key": f"row-{i:08d}",
        "prompt": f"a cinematic shot of scene {i}, golden hour, slow dolly-in, 35mm film look",
        "job_kind": "text-to-video",
        "model": "v1",
        "request_hash": f"{rng.getrandbits(256):064x}",
        "params_json": json.dumps({"aspect_ratio": "16:9", "duration": 5, "seed": i}),
        "request_id": f"{rng.getrandbits(128):032x}",
        "status": "COMPLETED" if done else rng.choice(STATUSES),
        "progress": 100 if done else rng.randrange(100),
        "url": f"https://files.example/{i}.mp4" if done else None,
        "size_kb": rng.randrange(200, 5000) if done else None,
        "width": 1280,
        "height": 720,
        "fps": 24.0,
        "num_frames": 120,
        "duration_s": 5.0,
        "attempts": 1,
        "cost_credits": 0.25,
        "submitted_at": datetime.now(UTC),
    }


def _timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _compact_in_child(root: str, queue: Any) -> None:
    """Run one compaction in this (fresh) process and report its own peak memory."""
    catalog = KvidCatalog(root)
    rss_before = proc_status_mb("VmRSS")
    tracemalloc.start()
    stats = catalog.compact()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    queue.put(
        {
            "seconds": stats.seconds,
            "rows": stats.rows,
            "submission_rows": stats.submission_rows,
            "parts": stats.parts_folded,
            "rss_before_mb": rss_before,
            "rss_peak_mb": proc_status_mb("VmHWM"),
            "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
            "py_peak_mb": py_peak / 2**20,
        }
    )


def compact_measured(root: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_compact_in_child, args=(str(root), queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="rows (default 100000)")
    parser.add_argument("--quick", action="store_true", help="10000 rows, fewer repetitions")
    parser.add_argument("--dir", type=Path, default=None, help="catalog parent (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    rows = args.rows or (10_000 if args.quick else 100_000)
    reps = 3 if args.quick else 7
    n_updates = 50 if args.quick else 200
    rng = random.Random(42)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvid-bench-") as tmp:
        root = Path(tmp) / "catalog"
        catalog = KvidCatalog(root)
        results: list[tuple[str, str, str]] = []
        figures: dict[str, Any] = {"rows": rows}

        def add(name: str, value: str, target: str = "") -> None:
            results.append((name, value, target))
            print(f"  {name}: {value}", file=sys.stderr)

        # seed: what a run writes for `rows` prompts, in batches of 5,000
        t0 = time.perf_counter()
        for start in range(0, rows, 5_000):
            batch = [_row(i, rng) for i in range(start, min(rows, start + 5_000))]
            catalog.update_many(batch)
            catalog.record_submissions(
                {"partition_key": r["partition_key"], "request_hash": r["request_hash"],
                 "event": ev, "attempt": 1, "cost_credits": 0.25 if ev == "SUBMITTED" else None}
                for r in batch for ev in ("INTENT", "SUBMITTED")
            )  # fmt: skip
        seed_s = time.perf_counter() - t0
        add("seed: update_many+record_submissions", f"{rows / seed_s:,.0f} rows/s")
        figures["seed_rows_per_s"] = rows / seed_s

        c1 = compact_measured(root)
        add(
            f"compact #1 ({c1['rows']:,} rows, {c1['submission_rows']:,} events)",
            f"{c1['seconds']:.3f} s",
        )
        add(
            "compact #1 peak memory",
            f"RSS {c1['rss_peak_mb']:.0f} MB (baseline {c1['rss_before_mb']:.0f}), "
            f"Arrow {c1['arrow_peak_mb']:.0f} MB, Python heap {c1['py_peak_mb']:.0f} MB",
        )
        figures["compact1"] = c1
        size_mb = (root / "videos" / "data.parquet").stat().st_size / 2**20
        figures["published_mb"] = size_mb
        add("published videos/data.parquet", f"{size_mb:.1f} MB")

        fresh = KvidCatalog(root)
        t = _timed(fresh.latest, reps)
        add("latest(), compacted, no log", f"median {statistics.median(t):.3f} s", "< 1 s")
        figures["latest_compacted_s"] = statistics.median(t)

        keys = [f"row-{rng.randrange(rows):08d}" for _ in range(n_updates)]
        key_iter = iter(keys)
        t = _timed(lambda: catalog.update(next(key_iter), status="PROCESSING"), n_updates)
        t.sort()
        add(
            f"update() one status change (x{n_updates})",
            f"median {statistics.median(t) * 1e3:.2f} ms, p95 {t[int(0.95 * len(t))] * 1e3:.2f} ms,"
            f" max {t[-1] * 1e3:.2f} ms",
            "< 20 ms",
        )
        figures["update_one_ms"] = {
            "median": statistics.median(t) * 1e3,
            "p95": t[int(0.95 * len(t))] * 1e3,
            "max": t[-1] * 1e3,
            "n": n_updates,
        }

        t = _timed(
            lambda: catalog.update_many(
                {"partition_key": f"row-{rng.randrange(rows):08d}", "status": "COMPLETED",
                 "progress": 100} for _ in range(500)
            ),
            reps,
        )  # fmt: skip
        median_ms = statistics.median(t) * 1e3
        add("update_many(500 status changes): one part", f"median {median_ms:.1f} ms")
        figures["update_many_500_ms"] = median_ms

        parts = catalog.log_parts()
        t = _timed(catalog.latest, reps)
        add(f"latest() with {parts} log parts", f"median {statistics.median(t):.3f} s", "< 1 s")
        figures["latest_with_log_s"] = statistics.median(t)
        figures["log_parts"] = parts
        t = _timed(lambda: catalog.get(keys[0]), reps * 3)
        add("get(key)", f"median {statistics.median(t) * 1e3:.1f} ms")
        figures["get_ms"] = statistics.median(t) * 1e3
        t = _timed(catalog.pending, reps)
        add("pending()", f"median {statistics.median(t) * 1e3:.1f} ms")
        figures["pending_ms"] = statistics.median(t) * 1e3
        t = _timed(catalog.counts_by_status, reps)
        add("counts_by_status()", f"median {statistics.median(t) * 1e3:.1f} ms")
        figures["counts_by_status_ms"] = statistics.median(t) * 1e3
        t = _timed(catalog.submissions, reps)
        add(f"submissions() ({2 * rows:,} events)", f"median {statistics.median(t):.3f} s")
        figures["submissions_s"] = statistics.median(t)

        c2 = compact_measured(root)
        add(f"compact #2 ({c2['parts']} parts into {c2['rows']:,} rows)", f"{c2['seconds']:.3f} s")
        add(
            "compact #2 peak memory",
            f"RSS {c2['rss_peak_mb']:.0f} MB (baseline {c2['rss_before_mb']:.0f}), "
            f"Arrow {c2['arrow_peak_mb']:.0f} MB, Python heap {c2['py_peak_mb']:.0f} MB",
        )
        figures["compact2"] = c2
        t = _timed(lambda: pd.read_parquet(root / "videos"), reps)
        add("pandas.read_parquet(videos/)", f"median {statistics.median(t):.3f} s")
        figures["read_parquet_s"] = statistics.median(t)

    width = max(len(r[0]) for r in results)
    vwidth = max(len(r[1]) for r in results)
    print(f"\nkvid catalog benchmark: {rows:,} rows, {os.cpu_count()} CPUs, pid {os.getpid()}")
    print(f"{'measure':<{width}}  {'result':<{vwidth}}  target")
    print(f"{'-' * width}  {'-' * vwidth}  ------")
    for name, value, target in results:
        print(f"{name:<{width}}  {value:<{vwidth}}  {target}")
    if args.out is not None:
        # seeding and reads; not compactions (they run in processes of their own)
        figures["process_peak_rss_mb"] = proc_status_mb("VmHWM")
        args.out.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
