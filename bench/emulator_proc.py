"""A kvid emulator in its own process for the benchmarks, driven through stdin.

Prints its base URL on the first line; then each ``stats`` line on stdin is answered with one JSON
line (request counts by endpoint, jobs created, its own CPU seconds and peak RSS); ``quit`` or
the end of stdin stops it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench.common import cpu_s, proc_status_mb
from kvid_dagster.emulator import EmulatorConfig, KvidEmulator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--job-duration", type=float, required=True)
    parser.add_argument("--reuse-renders", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--backlog", type=int, default=256)  # benchmarks open many at once
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = EmulatorConfig(
        workers=args.workers,
        job_duration=args.job_duration,
        reuse_renders=args.reuse_renders,
        backlog=args.backlog,
    )
    with KvidEmulator(config, output_dir=args.output_dir) as emulator:
        print(emulator.base_url, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "stats":
                counts = {k: v for k, v in emulator.stats.items() if isinstance(k, str)}
                answer = {
                    "requests": counts,
                    "jobs_created": emulator.jobs_created,
                    "cpu_s": cpu_s(),
                    "peak_rss_mb": proc_status_mb("VmHWM"),
                }
                print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
