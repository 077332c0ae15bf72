"""Where ``kvid-dagster run`` is, and the two ways of showing it.

The runner fills a :class:`RunProgress` from the ledger once per tick; a display decides how to
show it: :class:`LiveDisplay`, one rich panel redrawn in place on a terminal, or
:class:`PlainDisplay`, one line per change elsewhere, so a log file or CI output never gets a
line per job per tick. No Dagster and no HTTP here: the record and the displays are tested on
their own.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import IO, Protocol, Self

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvid_dagster.ledger import VideoRow, VideoStatus

MAX_ERRORS = 3
ERROR_WIDTH = 80  # characters of an error message shown (a traceback would fill the screen)


class Phase(StrEnum):
    """What the run is doing: the counts mean different things in each (nothing is polled
    while validating; a PENDING row still has a job coming only until polling starts)."""

    VALIDATING = "validating"
    SUBMITTING = "submitting"
    POLLING = "polling"
    PUBLISHING = "publishing"
    DONE = "done"


@dataclass(frozen=True)
class RunProgress:
    """One look at a run: everything a display shows, so a display reads nothing itself."""

    phase: Phase
    counts: Mapping[VideoStatus, int]  # rows by status (read-only; statuses with rows only)
    credits_spent: float = 0.0  # by this run's submitting runs
    elapsed_s: float = 0.0
    eta_s: float | None = None  # None: no row has finished yet, so there is no rate
    errors: tuple[tuple[str, str], ...] = ()  # (partition_key, message), newest first
    detail: str = ""  # e.g. "run 2/3" while submitting

    def __post_init__(self) -> None:
        counts = {VideoStatus(s): int(n) for s, n in sorted(self.counts.items()) if n}
        object.__setattr__(self, "counts", MappingProxyType(counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Videos done: rows COMPLETED."""
        return self.counts.get(VideoStatus.COMPLETED, 0)

    @property
    def state(self) -> tuple[object, ...]:
        """What a plain display prints a line for when it changes (not the clock)."""
        return self.phase, self.detail, tuple(self.counts.items())


def estimate_eta(finished: int, remaining: int, elapsed_s: float) -> float | None:
    """Seconds left at the rate rows have finished so far; ``None`` before any has finished
    (no rate to go on), 0 when nothing is left."""
    if remaining <= 0:
        return 0.0
    if finished <= 0 or elapsed_s <= 0:
        return None
    return remaining * elapsed_s / finished


def shorten(text: str, width: int = ERROR_WIDTH) -> str:
    """One line of at most ``width`` characters: a service message may hold a traceback."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= width else line[: width - 3] + "..."


class ProgressTracker:
    """Turns the ledger's reads, tick by tick, into :class:`RunProgress`.

    It keeps what one read cannot give: how many rows were already finished when the work began
    (so the rate, and the ETA, count this run's rows only) and the latest errors, kept up to
    date from the rows that changed since the last tick (so a tick reads only what moved).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, max_errors: int = MAX_ERRORS
    ) -> None:
        self._clock = clock
        self._started = clock()
        self._max_errors = max_errors
        self._baseline: tuple[int, float] | None = None  # (rows finished, when) at the start
        self._errors: dict[str, tuple[int, str]] = {}  # key -> (order seen, message)
        self._seen = 0

    def see_rows(self, rows: Iterable[VideoRow]) -> None:
        """Rows read since the last call: an error is kept until its row is COMPLETED or loses
        the error (a row re-sent after a failure, say)."""

        def when(row: VideoRow) -> float:
            return row.updated_at.timestamp() if row.updated_at is not None else 0.0

        for row in sorted(rows, key=when):
            if row.error and row.status is not VideoStatus.COMPLETED:
                self._seen += 1
                self._errors[row.partition_key] = (self._seen, shorten(row.error))
            else:
                self._errors.pop(row.partition_key, None)

    def progress(
        self,
        phase: Phase,
        counts: Mapping[VideoStatus, int],
        credits_spent: float = 0.0,
        detail: str = "",
    ) -> RunProgress:
        now = self._clock()
        finished = sum(
            n for s, n in counts.items() if s.is_terminal and s is not VideoStatus.INVALID
        )
        # before polling, a PENDING row is still to be sent; from then on it waits for
        # another run (a budget left it), and the ETA does not wait for it
        pending_left = phase in {Phase.VALIDATING, Phase.SUBMITTING}
        remaining = sum(
            n
            for s, n in counts.items()
            if not s.is_terminal and (s is not VideoStatus.PENDING or pending_left)
        )
        if self._baseline is None and phase is not Phase.VALIDATING:
            self._baseline = (finished, now)
        eta = None
        if self._baseline is not None:
            done_before, since = self._baseline
            eta = estimate_eta(finished - done_before, remaining, now - since)
        newest = sorted(self._errors.items(), key=lambda item: item[1][0], reverse=True)
        return RunProgress(
            phase=phase,
            counts=counts,
            credits_spent=credits_spent,
            elapsed_s=now - self._started,
            eta_s=eta,
            errors=tuple((key, message) for key, (_, message) in newest[: self._max_errors]),
            detail=detail,
        )


def duration(seconds: float | None) -> str:
    """``"42s"``, ``"3m05s"``, ``"1h02m"``; ``"-"`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _phase_text(progress: RunProgress) -> str:
    return f"{progress.phase} {progress.detail}".rstrip()


def _summary_text(progress: RunProgress) -> str:
    return (
        f"done {progress.done}/{progress.total}  credits {progress.credits_spent:g}  "
        f"elapsed {duration(progress.elapsed_s)}  eta {duration(progress.eta_s)}"
    )


class ProgressDisplay(Protocol):
    """What the runner shows progress on: entered for the run, updated once per tick."""

    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def update(self, progress: RunProgress) -> None: ...
    def note(self, text: str) -> None:
        """A one-off line (a run's failure, the budget), kept above or between updates."""
        ...


class PlainDisplay:
    """A line when the phase or the counts change, nothing otherwise: for logs and pipes."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._last_state: tuple[object, ...] | None = None
        self._last_error: tuple[str, str] | None = None

    @property
    def stream(self) -> IO[str]:
        # the stream of the moment by default: bound at creation it would miss a redirection
        return self._stream if self._stream is not None else sys.stdout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stream.flush()

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, progress: RunProgress) -> None:
        if progress.state == self._last_state:
            return
        self._last_state = progress.state
        line = f"  [{_phase_text(progress)}] {_summary_text(progress)}"
        if progress.counts:
            line += "  |  " + "  ".join(f"{s} {n}" for s, n in progress.counts.items())
        newest = progress.errors[0] if progress.errors else None
        if newest is not None and newest != self._last_error:
            line += f"  |  latest error {newest[0]}: {newest[1]}"
        self._last_error = newest
        self._write(line)

    def note(self, text: str) -> None:
        self._write(text)


_STYLES = {VideoStatus.COMPLETED: "green", VideoStatus.PENDING: "dim"}


def _style(status: VideoStatus) -> str:
    if status in _STYLES:
        return _STYLES[status]
    return "red" if status.is_terminal else "yellow"


class LiveDisplay:
    """One panel redrawn in place (a few times a second at most); the last state stays on
    screen when the run ends, and notes are printed above it."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        refresh_per_second: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        owns_file: bool = False,
    ) -> None:
        self._console = console if console is not None else Console(file=sys.stderr)
        self._owns_file = owns_file  # close the console's file when done
        self._clock = clock
        self._progress: RunProgress | None = None
        self._updated_at = clock()
        self._live = Live(
            self,
            console=self._console,
            refresh_per_second=refresh_per_second,
            transient=False,
        )

    def __enter__(self) -> Self:
        return self  # drawn from the first update on: nothing to show before it

    def __exit__(self, *exc_info: object) -> None:
        self._live.stop()  # draws the last state once more, and leaves it
        if self._owns_file:
            self._console.file.close()

    def update(self, progress: RunProgress) -> None:
        self._progress = progress
        self._updated_at = self._clock()
        self._live.start()  # (once: it does nothing when started)
        self._live.refresh()

    def note(self, text: str) -> None:
        self._console.print(Text(text))

    def __rich__(self) -> RenderableType:
        progress = self._progress
        if progress is None:
            return Text("")
        if progress.phase is not Phase.DONE:  # the clock runs between ticks
            elapsed = progress.elapsed_s + self._clock() - self._updated_at
            progress = replace(progress, elapsed_s=elapsed)
        parts: list[RenderableType] = [Text(_summary_text(progress))]
        if progress.counts:
            counts = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
            for status in progress.counts:
                counts.add_column(str(status), justify="right", style=_style(status))
            counts.add_row(*(str(n) for n in progress.counts.values()))
            parts.append(counts)
        for key, message in progress.errors:
            parts.append(Text.assemble((f"{key}: ", "bold red"), message))
        return Panel(Group(*parts), title=f"kvid-dagster run: {_phase_text(progress)}")


def is_terminal(stream: IO[str]) -> bool:
    """A terminal that can redraw: a TTY whose TERM is not ``dumb``."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def display_for(stream: IO[str], plain: bool = False) -> ProgressDisplay:
    """The live panel on a terminal, plain lines anywhere else or when asked for them."""
    if plain or not is_terminal(stream):
        return PlainDisplay(stream)
    try:
        # a handle of its own on the terminal, and its size read now: while a Dagster step runs,
        # the process's stdout and stderr are tee'd into the step's log file, where the redrawn
        # panel does not belong, and through a pipe, whose width rich cannot know
        size = os.get_terminal_size(stream.fileno())
        terminal = os.fdopen(os.dup(stream.fileno()), "w", encoding="utf-8", closefd=True)
    except (AttributeError, OSError, ValueError):
        return LiveDisplay(Console(file=stream))
    console = Console(file=terminal, width=size.columns or None, height=size.lines or None)
    return LiveDisplay(console, owns_file=True)


__all__ = [
    "LiveDisplay",
    "Phase",
    "PlainDisplay",
    "ProgressDisplay",
    "ProgressTracker",
    "RunProgress",
    "display_for",
    "estimate_eta",
    "is_terminal",
]
