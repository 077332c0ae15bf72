"""The same N jobs with no Dagster and no ledger: what this machine and the emulator allow.

A plain asyncio script on ``AsyncKvidClient``: submit every job at once, then every ``interval``
seconds (start to start) poll each unfinished job, fetching and downloading the finished ones,
until all are downloaded. Its distance to the physical limit is the floor of HTTP, the emulator
and the two cores; the backfill's distance beyond it is what Dagster and the ledger add.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path
from typing import Any

from bench.common import API_KEY, Emulator, phase_args, scratch, write_result


async def run_jobs(base_url: str, n: int, interval: float, dest: Path) -> dict[str, Any]:
    from kvid_dagster.client import AsyncKvidClient, JobKind, build_request

    requests = [
        build_request(f"A calm lake at dawn, bare client {i}", resolution="480p") for i in range(n)
    ]
    kind = JobKind.TEXT_TO_VIDEO
    t0 = time.monotonic()
    async with AsyncKvidClient(API_KEY, base_url, max_in_flight=32) as client:
        ids = await asyncio.gather(*(client.generate(r) for r in requests))
        submitted = time.monotonic() - t0
        pending = dict(enumerate(ids))
        polls = 0

        async def check(i: int, request_id: str) -> None:
            nonlocal polls
            polls += 1
            status = await client.status(kind, request_id)
            if status.is_completed:
                result = await client.result(kind, request_id)
                await client.download(result, dest / f"{i}.mp4")
                del pending[i]

        while pending:
            started = time.monotonic()
            await asyncio.gather(*(check(i, rid) for i, rid in list(pending.items())))
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))
        return {"elapsed_s": time.monotonic() - t0, "submitted_s": submitted, "status_polls": polls}


def main() -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, default=None, help="jobs (default 200; quick 32)")
        parser.add_argument("--workers", type=int, default=16)
        parser.add_argument("--job-duration", type=float, default=2.0)
        parser.add_argument("--interval", type=float, default=0.5)

    args = phase_args(__doc__.splitlines()[0], add)
    n = args.n or (32 if args.quick else 200)
    with (
        scratch(args.workdir, "kvid-bench-bare-") as tmp,
        Emulator(
            workers=args.workers, job_duration=args.job_duration, output_dir=tmp / "emu"
        ) as emulator,
    ):
        (tmp / "videos").mkdir()
        figures = asyncio.run(run_jobs(emulator.base_url, n, args.interval, tmp / "videos"))
        assert len(list((tmp / "videos").glob("*.mp4"))) == n
    limit = math.ceil(n / args.workers) * args.job_duration
    figures.update(
        {
            "n": n,
            "limit_with_interval_s": limit + args.interval,
            "ratio_to_limit": figures["elapsed_s"] / (limit + args.interval),
            "throughput_jobs_per_s": n / figures["elapsed_s"],
        }
    )
    write_result(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
