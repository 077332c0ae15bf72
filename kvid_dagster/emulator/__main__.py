"""``python -m kvid_dagster.emulator``: run a kvid emulator until SIGINT/SIGTERM.

The first line on stdout is the base URL (scripts read it to find a port chosen with --port 0).
``main(argv)`` is what ``kvid-dagster emulator`` calls.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from kvid_dagster.emulator.config import EmulatorConfig
from kvid_dagster.emulator.jobs import TERMINAL
from kvid_dagster.emulator.server import KvidEmulator


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, where there is one to show (not None, not a flag's
    False: those options say what unset means themselves)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str = "python -m kvid_dagster.emulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a local kvid API emulator (both dialects) until SIGINT or SIGTERM. "
        "The first line on stdout is its base URL.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    parser.add_argument(
        "--api-key", default=None, help="the one api-key accepted (unset: any non-empty one)"
    )
    parser.add_argument("--workers", type=int, default=4, help="jobs running at once")
    parser.add_argument(
        "--time-scale", type=float, default=0.02, help="multiplier on the vendor's 1-5 min jobs"
    )
    parser.add_argument(
        "--job-duration", type=float, default=None, help="fixed seconds per job (unset: scaled)"
    )
    parser.add_argument("--failure-rate", type=float, default=0.0, help="fraction of jobs FAILED")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests 5xx")
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="requests/s before 429 (unset: no limit)"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to responses")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault RNG")
    parser.add_argument(
        "--reuse-renders", action="store_true", help="render once per output geometry"
    )
    parser.add_argument("--backlog", type=int, default=5, help="listen backlog (the stdlib's)")
    parser.add_argument(
        "--realistic",
        action="store_true",
        help="the rough edges of real servers: bursts reset, fresh jobs 404, null/fractional "
        "progress, a separate storage origin with expiring URLs, Retry-After dates, FAILED "
        "messages echoing the request",
    )
    parser.add_argument(
        "--strict-fields",
        action="store_true",
        help="generation dialect: a body field the vendor's page does not list is a 400",
    )
    parser.add_argument(
        "--credit-balance",
        type=float,
        default=None,
        help="generation dialect: credits left (each job debits its price; then 402; unset: "
        "no limit)",
    )
    parser.add_argument(
        "--concurrent-limit",
        type=int,
        default=None,
        help="generation dialect: jobs queued or processing at once (then 429 "
        "CONCURRENT_LIMIT; unset: no limit)",
    )
    parser.add_argument(
        "--output-dir", default=None, help="where videos go (unset: a temp dir, removed at exit)"
    )
    parser.add_argument(
        "--public-base-url", default=None, help="base of result URLs (unset: its own)"
    )
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with no request and no job running (unset: never)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


class IdleWatch:
    """Whether an emulator has had nothing to do for ``seconds``: no request served (its
    request counts unchanged) and no job queued or running. What lets an emulator started on
    demand (a Component's local mode) end by itself once nothing uses it."""

    def __init__(self, emulator: KvidEmulator, seconds: float | None) -> None:
        self._emulator = emulator
        self._seconds = seconds
        self._seen: tuple[int, bool] | None = None
        self._since = time.monotonic()

    def expired(self) -> bool:
        if self._seconds is None:
            return False
        # a job that is not over will be asked about: never idle then
        busy = any(job.state.upper() not in TERMINAL for job in self._emulator.jobs.values())
        now = (sum(self._emulator.stats.values()), busy)
        if now != self._seen or busy:
            self._seen, self._since = now, time.monotonic()
        return time.monotonic() - self._since >= self._seconds


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = EmulatorConfig(
            api_key=args.api_key,
            workers=args.workers,
            time_scale=args.time_scale,
            job_duration=args.job_duration,
            failure_rate=args.failure_rate,
            error_rate=args.error_rate,
            rate_limit=args.rate_limit,
            latency=args.latency,
            reuse_renders=args.reuse_renders,
            seed=args.seed,
            public_base_url=args.public_base_url,
            backlog=args.backlog,
            realistic=args.realistic,
            strict_fields=args.strict_fields,
            credit_balance=args.credit_balance,
            concurrent_limit=args.concurrent_limit,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    emulator = KvidEmulator(config, host=args.host, port=args.port, output_dir=args.output_dir)
    try:
        emulator.start()
        print(emulator.base_url, flush=True)
        idle = IdleWatch(emulator, args.exit_when_idle)
        while not stop.wait(0.5) and not idle.expired():
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
