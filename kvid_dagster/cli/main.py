"""The ``kvid-dagster`` command line: generate one video, run the pipeline, serve the emulator."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from kvid_dagster.client import JobStatus
    from kvid_dagster.ledger import VideoRow

DEFAULT_PROMPTS = Path("data/prompts.csv")
DEFAULT_DATA_DIR = Path("data")
#: a user's mistake (exit 2): one line naming what to change; other exceptions are our bugs
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


@contextlib.contextmanager
def service_endpoint(**emulator_options: Any) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(base_url, api_key, embedded)`` for the service to talk to.

    With neither ``KVID_BASE_URL`` nor ``KVID_API_KEY`` set, an embedded emulator is started on a
    free loopback port for the duration; otherwise the configured service is used and nothing is
    started.
    """
    from kvid_dagster.client import API_KEY_ENV, BASE_URL_ENV

    base_url = os.environ.get(BASE_URL_ENV, "").strip()
    api_key = os.environ.get(API_KEY_ENV, "").strip()
    if base_url or api_key:
        from kvid_dagster.client import DEFAULT_BASE_URL, KvidAuthenticationError

        if not api_key:
            raise KvidAuthenticationError(
                "KVID_BASE_URL is set but KVID_API_KEY is not: set both, or neither (the "
                "embedded emulator)"
            )
        yield (base_url or DEFAULT_BASE_URL), api_key, False
        return
    from kvid_dagster.emulator import EmulatorConfig, KvidEmulator
    from kvid_dagster.emulator.local import LOCAL_API_KEY

    with KvidEmulator(EmulatorConfig(api_key=LOCAL_API_KEY, **emulator_options)) as emulator:
        yield emulator.base_url, LOCAL_API_KEY, True


def _percent(progress: float | None) -> str:
    """``" 12.5%"``; a server may send no progress at all, or fractions."""
    return "     -" if progress is None else f"{progress:5.1f}%"


@contextlib.contextmanager
def job_status_line(stream: IO[str] | None = None) -> Iterator[Callable[[JobStatus], None]]:
    """A wait() callback showing the job's status: one line that rich redraws in place on a
    terminal, a plain line per change elsewhere (then a blank line, as the terminal's ends).

    ``stream`` defaults to the ``sys.stderr`` of the moment, like the other messages (bound at
    import, it would miss a redirected or captured stderr)."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from kvid_dagster.cli.progress import is_terminal

    stream = sys.stderr if stream is None else stream
    live = Live(console=Console(file=stream), auto_refresh=False) if is_terminal(stream) else None
    last = ""

    def show(status: JobStatus) -> None:
        nonlocal last
        last_log = status.logs[-1] if status.logs else ""
        line = f"{status.status:<11} {_percent(status.progress)}  {last_log}"
        if line == last:
            return
        last = line
        if live is None:
            stream.write(line + "\n")
            stream.flush()
        else:  # a server's log line is text, never rich markup
            live.update(Text(line, no_wrap=True, overflow="ellipsis"), refresh=True)

    if live is None:
        yield show
        stream.write("\n")
        return
    with live:
        yield show


def cmd_generate(args: argparse.Namespace) -> int:
    from kvid_dagster.client import KvidClient, KvidError, build_request
    from kvid_dagster.core.project import dialect_from_env
    from kvid_dagster.core.prompts import PARAM_COLUMNS

    params: dict[str, Any] = {
        name: value for name in PARAM_COLUMNS if (value := getattr(args, name)) is not None
    }
    try:
        dialect = dialect_from_env()
        request = build_request(
            args.prompt,
            dialect=dialect,
            job=args.job,
            model=args.model,
            image=args.image,
            end_image=args.end_image,
            base_dir=Path.cwd(),
            **params,
        )
    except KvidError as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    with service_endpoint() as (base_url, api_key, embedded):
        where = "embedded emulator at " + base_url if embedded else base_url
        print(f"kvid: {request.job_kind} {request.model} via {where}", file=sys.stderr)
        with KvidClient(api_key, base_url, dialect=dialect) as client:
            try:
                request_id = client.generate(request)
                print(f"request_id: {request_id}", file=sys.stderr)
                with job_status_line() as show:
                    client.wait(
                        request.job_kind,
                        request_id,
                        poll_interval=args.poll_interval,
                        deadline=args.deadline,
                        on_progress=show,
                    )
                result = client.result(request.job_kind, request_id)
                downloaded = client.download(result, out)
            except KvidError as exc:
                print(f"\nkvid: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
    print(f"{downloaded.path}  {downloaded.size_bytes} bytes  sha256 {downloaded.sha256}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kvid_dagster.cli.progress import display_for
    from kvid_dagster.cli.runner import print_summary, run_pipeline
    from kvid_dagster.core.budget import CreditBudget
    from kvid_dagster.core.project import KvidProject
    from kvid_dagster.resources import KvidResource

    data_dir = Path(args.data_dir).resolve()
    project = KvidProject(args.prompts, data_dir)
    table = project.load_table()  # a table that cannot be used stops here, before anything
    budget = CreditBudget(per_run=args.budget_credits, per_day=args.daily_budget_credits)
    with service_endpoint() as (base_url, api_key, embedded):
        where = f"embedded emulator at {base_url}" if embedded else base_url
        print(f"kvid: {args.prompts} -> {data_dir} via {where}", file=sys.stderr)
        resource = KvidResource(api_key=api_key, base_url=base_url, dialect=project.dialect)
        result = run_pipeline(
            project,
            resource,
            poll_interval_seconds=args.poll_interval,
            deadline_seconds=args.deadline,
            download=not args.no_download,
            budget_credits=budget,
            # beside the other messages, on stderr: stdout is the summary, fit for a file
            display=display_for(sys.stderr, plain=args.plain),
            table=table,
            verbose=args.verbose,
        )
    print_summary(result, data_dir)
    return 0 if result.ok else 1


def cmd_estimate(args: argparse.Namespace) -> int:
    """What submitting every row without a job would cost, and what today has spent; reads
    the ledger (when there is one) and writes nothing."""
    from kvid_dagster.core.budget import estimate_backfill
    from kvid_dagster.core.project import KvidProject
    from kvid_dagster.ledger import SpendWindow, Submission

    project = KvidProject(args.prompts, args.data_dir)
    table = project.load_table()
    latest: dict[str, Submission] = {}
    spent_today = 0.0
    if project.has_ledger():  # no ledger yet: nothing has a job
        with project.ledger() as ledger:
            latest = ledger.latest_submissions(row.request_hash for row in table.rows)
            spent_today = ledger.spent_credits(SpendWindow.DAY)
    estimate = estimate_backfill(table.rows, latest, None, spent_today)
    print(f"{args.prompts}: {estimate.describe()}")
    if table.invalid:
        print(f"{len(table.invalid)} invalid rows, never sent (not priced)")
    return 0


def _credits(text: str) -> float:
    """A command-line budget: a finite number of credits, at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of credits >= 0")
    return value


DEV_WORKSPACE = """\
load_from:
  - python_module:
      module_name: kvid_dagster.dev_definitions
      location_name: kvid_dagster
      working_directory: {cwd}
"""


def cmd_dev(args: argparse.Namespace) -> int:
    """``dagster dev`` on kvid's own definitions (``kvid_dagster.dev_definitions``), from any
    folder. ``dagster dev`` runs in a process group of its own: a Ctrl-C reaches this process
    alone, which asks ``dagster dev`` to shut down (a second one kills it), then stops the
    emulator; so does a signal sent to this process only."""
    import signal
    import subprocess

    from kvid_dagster.cli.runner import dagster_home_for
    from kvid_dagster.client import API_KEY_ENV, BASE_URL_ENV
    from kvid_dagster.core.project import DATA_DIR_ENV, PROMPTS_ENV, KvidProject

    data_dir = Path(args.data_dir).resolve()
    prompts = args.prompts if "://" in args.prompts else str(Path(args.prompts).resolve())
    KvidProject(prompts, data_dir).load_table()  # a table that cannot be used stops here
    home = dagster_home_for(data_dir)
    workspace = home / "kvid-dev-workspace.yaml"
    workspace.write_text(DEV_WORKSPACE.format(cwd=Path.cwd()), encoding="utf-8")
    with service_endpoint() as (base_url, api_key, embedded):
        env = {
            **os.environ,
            BASE_URL_ENV: base_url,
            API_KEY_ENV: api_key,
            PROMPTS_ENV: prompts,
            DATA_DIR_ENV: str(data_dir),
            "DAGSTER_HOME": str(home),
        }
        if embedded:
            print(f"kvid emulator at {base_url}", file=sys.stderr)
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace)]
        command += ["-p", str(args.port)]
        # default handlers: a shell's background job inherits SIGINT ignored, and dagster dev
        # copies that to SIGTERM
        child = subprocess.Popen(
            command, env=env, process_group=0, preexec_fn=_default_signal_handlers
        )
        received: list[int] = []

        def forward(signum: int, _frame: object) -> None:
            received.append(signum)
            if len(received) == 1:
                child.send_signal(signum)  # dagster dev shuts its services down
            else:  # asked again: do not wait for it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)

        for sig in (signal.SIGINT, signal.SIGTERM):  # even where SIGINT was inherited ignored
            signal.signal(sig, forward)
        code = child.wait()
    return 0 if received else code


def _default_signal_handlers() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _change_row(args: argparse.Namespace, command: str, change: Callable[..., VideoRow]) -> int:
    """Apply a person's change to one row of the data folder's ledger, then republish."""
    from kvid_dagster.core.project import ProjectData

    data = ProjectData(args.data_dir)
    try:
        row = change(data.ledger())
    except ValueError as exc:
        print(f"kvid-dagster {command}: {exc}", file=sys.stderr)
        return 2
    data.publish()
    print(f"{args.partition_key}: {row.status} {row.request_id or ''}".rstrip())
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """A person's answer to an UNCERTAIN row, after looking at the kvid dashboard."""
    return _change_row(
        args,
        "resolve",
        lambda ledger: ledger.resolve_uncertain(
            args.partition_key, request_id=args.request_id, note=args.note
        ),
    )


def cmd_refetch(args: argparse.Namespace) -> int:
    """Try a FETCH_FAILED row's video again (same paid job): the next status tick fetches it."""
    return _change_row(args, "refetch", lambda ledger: ledger.refetch(args.partition_key))


def cmd_emulator(argv: Sequence[str]) -> int:
    from kvid_dagster.emulator.__main__ import main as emulator_main

    return emulator_main(list(argv), prog="kvid-dagster emulator") or 0


def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", help="generate one video end to end", parents=[common])
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="image-to-video input: a local path or an http(s) URL")
    p.add_argument("--end-image", dest="end_image", help="v2 image-to-video: URL of the last frame")
    p.add_argument("--job", choices=["text-to-video", "image-to-video", "reference-to-video"])
    p.add_argument(
        "--model",
        help="video dialect: v1 (default), v2 or a full v2 model id; generation dialect "
        "(KVID_API_DIALECT=generation): v1/v2/v3, wan/seedance/veo3.1 or a model path",
    )
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--num-frames", dest="num_frames", type=int)
    p.add_argument("--fps", "--frames-per-second", dest="frames_per_second", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution")
    p.add_argument("--aspect-ratio", dest="aspect_ratio")
    p.add_argument("--steps", "--num-inference-steps", dest="num_inference_steps", type=int)
    p.add_argument(
        "--safety-checker", dest="enable_safety_checker", action=argparse.BooleanOptionalAction
    )
    p.add_argument(
        "--prompt-expansion", dest="enable_prompt_expansion", action=argparse.BooleanOptionalAction
    )
    p.add_argument("--duration", help="video v2: 5 or 10; generation: seconds (or auto)")
    p.add_argument("--camera-fixed", dest="camera_fixed", action=argparse.BooleanOptionalAction)
    for name in ("image_urls", "video_urls", "audio_urls"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, help="reference-to-video: URLs as a|b or a JSON array")
    p.add_argument("--generate-audio", dest="generate_audio", action=argparse.BooleanOptionalAction)
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--acceleration", choices=["regular", "high"])
    p.add_argument("--poll-interval", dest="poll_interval", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=900.0, help="overall seconds to wait")
    p.add_argument(
        "--out",
        default="video.mp4",
        help="where the video goes: a file, or a folder for the service's file name "
        "(default: video.mp4 in the current folder)",
    )
    p.set_defaults(func=cmd_generate)


def _add_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        help="a CSV or Parquet table: a path or an fsspec URL (s3://...)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvid-dagster",
        description="kvid video generation through Dagster. With neither KVID_BASE_URL nor "
        "KVID_API_KEY set, an embedded local emulator stands in for the service.",
    )
    common = _Parser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help="Dagster's own log lines, and the stack trace of every error (a mistake of "
        "yours is otherwise one line)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub, common)
    sub.add_parser("emulator", help="serve the local kvid emulator (see its --help)")
    run = sub.add_parser(
        "run", help="the whole pipeline, headless, through Dagster", parents=[common]
    )
    _add_prompts(run)
    run.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="catalog and videos go here")
    run.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between status ticks"
    )
    run.add_argument("--deadline", type=float, default=3600.0, help="overall seconds to wait")
    run.add_argument("--no-download", action="store_true", help="record URLs, fetch no files")
    run.add_argument(
        "--plain",
        action="store_true",
        help="progress as plain lines, one per change (the default when stderr is no terminal)",
    )
    run.add_argument(
        "--budget-credits",
        type=_credits,
        help="credits this run may spend (priced before anything is sent; rows that do not "
        "fit stay PENDING, and the run exits 1 naming them)",
    )
    run.add_argument(
        "--daily-budget-credits",
        type=_credits,
        help="credits every submitter together may spend since UTC midnight",
    )
    run.set_defaults(func=cmd_run)
    estimate = sub.add_parser(
        "estimate",
        help="what submitting every row without a job would cost (sends nothing)",
        parents=[common],
    )
    _add_prompts(estimate)
    estimate.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    estimate.set_defaults(func=cmd_estimate)
    resolve = sub.add_parser(
        "resolve",
        help="settle an UNCERTAIN row: the job you found on the kvid dashboard, or none",
        parents=[common],
    )
    resolve.add_argument("partition_key")
    resolve.add_argument(
        "--request-id",
        help="the job found (polled as usual); omit it if none exists: the "
        "row goes back to PENDING and the next run submits it",
    )
    resolve.add_argument("--note", default="", help="recorded in the submissions history")
    resolve.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    resolve.set_defaults(func=cmd_resolve)
    refetch = sub.add_parser(
        "refetch",
        help="fetch a FETCH_FAILED row's video again (its paid job; nothing is re-sent)",
        parents=[common],
    )
    refetch.add_argument("partition_key")
    refetch.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    refetch.set_defaults(func=cmd_refetch)
    dev = sub.add_parser(
        "dev",
        help="the emulator and `dagster dev` on these definitions, from any folder",
        parents=[common],
    )
    _add_prompts(dev)
    dev.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="catalog, videos and the Dagster home (dagster_home/, unless DAGSTER_HOME is set)",
    )
    dev.add_argument(
        "--port", type=int, default=3000, help="the Dagster UI's port on localhost (default 3000)"
    )
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "emulator":
        return cmd_emulator(argv[1:])
    args = build_parser().parse_args(argv)
    from kvid_dagster.core.mistakes import user_errors

    try:
        return int(args.func(args))
    except user_errors() as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"kvid-dagster {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
