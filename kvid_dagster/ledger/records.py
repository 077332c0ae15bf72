"""The typed records the ledger hands out and takes: a row, a submission, a claim's owner."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from kvid_dagster.ledger.status import VideoStatus


class RequestRow(Protocol):
    """What the ledger needs of a valid prompt row (``prompts.PromptRow`` is one)."""

    @property
    def partition_key(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def job_kind(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def request_hash(self) -> str: ...
    @property
    def params_json(self) -> str: ...
    @property
    def dialect(self) -> str: ...  # the API dialect its request is written in
    @property
    def user_columns_json(self) -> str | None: ...  # the user's own columns, never sent


@dataclass(frozen=True)
class InvalidEntry:
    """A table row that will never be sent, keyed as the catalog shows it."""

    partition_key: str
    prompt: str
    reason: str


@dataclass(frozen=True)
class VideoQuality:
    """What the poller measured of a downloaded video's picture, what its request asked for,
    and the checks' verdicts when it was fetched (``kvid_dagster.media.quality`` has the rules and
    the thresholds). An expected value of None is one the request does not determine."""

    sampled_frames: int  # the frames the picture figures are of (evenly spread over the clip)
    luma_mean: float  # the brightest sampled frame's mean luma (0-255)
    luma_stddev: float  # the largest luma standard deviation of a sampled frame (0: one colour)
    changed_pct: float  # the largest share of a sampled frame changed from the first (percent)
    expected_short_side: int | None
    expected_width: int | None  # None with the short side alone known (aspect ratio auto)
    expected_height: int | None
    expected_fps: float | None
    expected_frames: int | None
    expected_duration_s: float | None
    matches_request: bool
    not_blank: bool
    not_frozen: bool


@dataclass(frozen=True)
class VideoFile:
    """What the status poller learnt of a finished job's video."""

    url: str | None = None
    name: str | None = None
    size_kb: int | None = None
    local_path: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    duration_s: float | None = None
    quality: VideoQuality | None = None  # None: not measured (not downloaded, or before v6)


@dataclass(frozen=True)
class Submission:
    """One claimed attempt at a request: the money record (``<prefix>submissions``)."""

    submission_id: int
    request_hash: str
    attempt: int
    partition_key: str  # the row that claimed it (other rows may share the request)
    prompt: str
    job_kind: str
    model: str
    params_json: str
    status: VideoStatus
    request_id: str | None
    progress: int | None
    video: VideoFile
    error: str | None
    cost_credits: float | None
    owner: ClaimOwner | None
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    submitted_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None
    version: int
    not_found_count: int = 0  # 404s in a row from status
    not_found_since: datetime | None = None  # the first of them
    fetch_failures: int = 0  # failed fetches of the completed job's video
    forced_by: str | None = None  # the root run id of the force=True run that claimed it
    dialect: str = "video"  # the API dialect the job was sent in (only it knows the id)
    estimated_credits: float | None = None  # the price table's figure at the claim


@dataclass(frozen=True)
class VideoRow:
    """A prompt row as the ledger knows it: its current request and that request's latest job.

    ``status`` is ``INVALID`` for an invalid row, ``PENDING`` when no job exists for the row's
    current request, else the status of the request's latest submission (which another row with
    the same request may have claimed: a request is paid once, whatever row asks for it).
    """

    partition_key: str
    prompt: str | None
    job_kind: str | None
    model: str | None
    request_hash: str | None
    params_json: str | None
    status: VideoStatus
    error: str | None
    submission: Submission | None = None
    updated_at: datetime | None = None
    user_columns_json: str | None = None  # the table's other columns for this row, as JSON

    @property
    def user_columns(self) -> dict[str, str]:
        return json.loads(self.user_columns_json) if self.user_columns_json else {}

    @property
    def request_id(self) -> str | None:
        return self.submission.request_id if self.submission else None

    @property
    def progress(self) -> int | None:
        return self.submission.progress if self.submission else None

    @property
    def video(self) -> VideoFile:
        return self.submission.video if self.submission else VideoFile()

    @property
    def attempts(self) -> int:
        return self.submission.attempt if self.submission else 0

    @property
    def cost_credits(self) -> float | None:
        return self.submission.cost_credits if self.submission else None


@dataclass(frozen=True)
class JobChange:
    """A change of one submission, applied only if nobody moved it since ``expected_version``."""

    submission_id: int
    expected_version: int
    status: VideoStatus
    progress: int | None = None
    error: str | None = None
    video: VideoFile | None = None
    completed: bool = False  # stamp completed_at
    extra: dict[str, Any] = field(default_factory=dict)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's PID namespace: the inode ``/proc/self/ns/pid`` names (readable without
    privileges; "" where there is none to read). Containers on one kernel share its boot id
    and, with host networking, its host name: only this tells their pids apart."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.removeprefix("pid:[").removesuffix("]")


def _machine() -> str:
    """Where a pid names one process: this boot of the kernel, in this PID namespace."""
    namespace = _pid_namespace()
    return f"{_boot_id()}/{namespace}" if namespace else _boot_id()


def process_start_token(pid: int) -> str | None:
    """What tells a live process from a later one with the same pid (``None``: no such pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc/self/stat").exists():  # no procfs: fall back to "the pid exists"
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return ""
            return ""
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the comm field: state is field 3
    if fields[0] in {"Z", "X"}:  # killed, not yet reaped: gone all the same
        return None
    return fields[19]  # field 22, starttime


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a claim: enough to tell, from another process or host, whether it is gone."""

    host: str
    pid: int
    # "<boot id>/<PID namespace>:<process start time>": a restarted machine, another
    # container's namespace or a reused pid differs
    started: str
    run_id: str | None = None

    @classmethod
    @cache
    def _this_process(cls, pid: int) -> ClaimOwner:
        return cls(socket.gethostname(), pid, f"{_machine()}:{process_start_token(pid) or ''}")

    @classmethod
    def current(cls, run_id: str | None = None) -> ClaimOwner:
        """This process (after a fork, the child is a new owner)."""
        owner = cls._this_process(os.getpid())
        return ClaimOwner(owner.host, owner.pid, owner.started, run_id)

    @property
    def machine(self) -> str:
        """Where the owner's pid names its process: "<boot id>/<PID namespace>" (only the boot
        id for an owner written before namespaces were recorded, or one without procfs)."""
        return self.started.partition(":")[0]

    def is_local(self) -> bool:
        """Whether this process can look the owner's pid up: same host, same boot and same PID
        namespace. An owner recorded without its namespace (by an older kvid-dagster) is not
        local here: its pid may be another namespace's, so its heartbeat lease judges it."""
        here = ClaimOwner.current()
        return self.host == here.host and self.machine == here.machine

    def is_alive_locally(self) -> bool:
        """For an owner on this machine: does its process still run?"""
        token = process_start_token(self.pid)
        return token is not None and self.started == f"{ClaimOwner.current().machine}:{token}"


#: the job columns a ``VideoFile`` is stored in, beside its ``quality``'s
VIDEO_FILE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(VideoFile) if f.name != "quality")
QUALITY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(VideoQuality))
