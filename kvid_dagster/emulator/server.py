"""KvidEmulator: a real HTTP server speaking the kvid contract (shared/kvid-api.md).

Both API dialects are served at once, on one job engine with the same faults and rough edges:
the seed page's "video" dialect (``/ai/video/{kind}/generate|status|result?request_id=``) and
the current English page's "generation" dialect (``/ai/generation/{kind}/generate-async``,
shared ``/ai/generation/status|result?jobId=``; its rules in generation.py). Generation jobs
also meet the money knobs: a credit balance (402), a concurrency limit (429 CONCURRENT_LIMIT)
and cancellation. The page shows no error body, so generation errors are the envelope with the
code beside it: ``{"success": false, "data": null, "message": "...", "code": "JOB_NOT_FOUND"}``
(no code on a 403 for the api-key, as the page gives none). A generation job is ``completed``
only once its video exists (a clock-completed job whose render is still running reads
``processing``), and the result of a canceled job is a 400 JOB_NOT_COMPLETED, as a gateway that
checks "failed, else not completed" answers.

One ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, Nagle off, daemon threads, listen backlog
``config.backlog``) runs in a background thread. Job states come from the clock (see jobs.py);
videos are rendered by a small thread pool as soon as a job is created and served from the
emulator's own ``/files/``, or with ``separate_storage`` from a second listener on another port
(``/videos/``), as a real service's storage origin. Everything lives on the instance, so several
emulators can run in one process.

The rough edges of real servers (``config.edges``; all off by default, on with ``realistic``) are
applied here: connection resets under bursts (``_Server.process_request``), 404s for fresh jobs,
null / fractional / missing progress, expiring result URLs, Retry-After as an HTTP date and
FAILED messages that echo the request.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from email.message import Message
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np

from kvid_dagster.emulator import render
from kvid_dagster.emulator.config import EmulatorConfig
from kvid_dagster.emulator.faults import STATUS_KINDS, Fault, FaultInjector
from kvid_dagster.emulator.generation import (
    DOCUMENTED,
    GENERATION_KINDS,
    STATUS_WORDS,
    ErrorCode,
    GenerationInvalid,
    iso_time,
    new_job_id,
    undocumented_fields,
    validate_generation,
)
from kvid_dagster.emulator.jobs import (
    TERMINAL,
    Job,
    JobQueue,
    JobState,
    JobStatus,
    stamp,
    vendor_duration,
)
from kvid_dagster.emulator.validation import (
    JOB_KINDS,
    Dialect,
    RequestInvalid,
    validate_body,
)

logger = logging.getLogger("kvid_dagster.emulator")

FAIL_MARKER: Final = "[[kvid:fail]]"
"""A prompt containing this always ends FAILED (a deterministic failure for tests)."""
FAIL_MARKER_REASON: Final = "Generation failed: the request was rejected ([[kvid:fail]] in prompt)"

_API_PREFIX: Final = "/ai/video/"
_GENERATION_PREFIX: Final = "/ai/generation/"
_ID_PARAMETER: Final = {Dialect.VIDEO: "request_id", Dialect.GENERATION: "jobId"}
_FILES_PREFIX: Final = "/files/"  # on the API origin
_STORAGE_PREFIX: Final = "/videos/"  # on the separate storage origin
_XML_ERROR: Final = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message></Error>"
)
_FILE_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+\.mp4$")
_METHODS: Final = {"generate": "POST", "status": "GET", "result": "GET", "files": "GET, HEAD"}
_HTML_PAGE: Final = "<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
_REASONS: Final = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class JobInfo:
    """What ``KvidEmulator.jobs`` shows of one job (a snapshot)."""

    request_id: str  # the video dialect's request_id, or the generation dialect's job_id
    kind: str  # "text-to-video" | "image-to-video" | "reference-to-video" (generation)
    model: str  # video: "v1" | "v2"; generation: the model as sent (default "wan")
    body: Mapping[str, Any]  # as sent, image_file contents elided
    state: str  # as its dialect's status says it: IN_QUEUE ... FAILED, or queued ... canceled
    progress: int
    dialect: Dialect
    used_credit: int | None  # generation: the price debited; video: None
    image_sha256: str | None = None  # of the image_file bytes received (what the job was made of)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # stream this file as the body...
    file_bytes: int = 0  # ...this many bytes of it...
    file_offset: int = 0  # ...from here
    drop: bool = False  # close the connection without answering
    close: bool = False  # answer, then close the connection


def _envelope(
    status: int,
    success: bool,
    data: Any,
    message: str,
    *,
    code: ErrorCode | None = None,
    **headers: str,
) -> _Response:
    payload: dict[str, Any] = {"success": success, "data": data, "message": message}
    if code is not None:
        payload["code"] = code.value
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return _Response(status, body, headers={k.replace("_", "-"): v for k, v in headers.items()})


def _error(status: int, message: str, **headers: str) -> _Response:
    return _envelope(status, False, None, message, **headers)


def _coded(status: int, code: ErrorCode | None, message: str) -> _Response:
    """A generation-dialect error: the envelope, with the page's code beside it."""
    return _envelope(status, False, None, message, code=code)


def _html(status: int, title: str) -> _Response:
    return _Response(status, _HTML_PAGE.format(title=title).encode(), "text/html; charset=utf-8")


def _xml_error(status: int, code: str, message: str) -> _Response:
    """An object store's error (S3 answers XML, not the API's envelope)."""
    body = _XML_ERROR.format(code=code, message=message).encode()
    return _Response(status, body, "application/xml")


class KvidEmulator:
    """A local kvid service: ``with KvidEmulator(EmulatorConfig(workers=2)) as emu: emu.base_url``.

    Keyword arguments after ``output_dir`` override fields of ``config``.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        output_dir: str | Path | None = None,
        **config_overrides: Any,
    ) -> None:
        config = config or EmulatorConfig()
        self.config: EmulatorConfig = (
            replace(config, **config_overrides) if config_overrides else config
        )
        self._host = host
        self._requested_port = port
        self._output_dir_arg = Path(output_dir) if output_dir is not None else None
        self._output_dir: Path | None = None
        self._owns_output_dir = False

        self._edges = self.config.edges
        self._queue = JobQueue(self.config.workers)
        self._faults = FaultInjector(self.config)
        self._lock = threading.Lock()
        self._job_created = threading.Condition(self._lock)  # wait_for_jobs() sleeps on it
        self._stats: Counter[str | tuple[str, int]] = Counter()
        self._jobs_created = 0
        self._files: dict[str, Path] = {}  # served name -> file (outlives forget_jobs)
        self._url_tokens: dict[str, tuple[str, float]] = {}  # token -> (name, issued), in order
        self._shared: dict[_SharedKey, Future[Path]] = {}
        self._fail_next: list[str] = []  # reasons for the next jobs created (fail_next_jobs)
        # generation jobs are admitted one at a time: the balance and the concurrency limit are
        # checked and the job created (or refused) as one step
        self._admission = threading.Lock()
        self._balance = self.config.credit_balance
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._storage: _Server | None = None  # separate_storage: the videos' origin
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind, start serving in a background thread and return self."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("this emulator was already started")
        if self._output_dir_arg is None:
            self._output_dir = Path(tempfile.mkdtemp(prefix="kvid-emulator-"))
            self._owns_output_dir = True
        else:
            self._output_dir = self._output_dir_arg
            self._output_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(
            self.config.render_threads, thread_name_prefix="kvid-render"
        )
        self._http = httpx.Client(follow_redirects=True)
        self._server = _Server((self._host, self._requested_port), self)
        servers = [self._server]
        if self._edges.separate_storage:
            self._storage = _Server((self._host, 0), self, storage=True)
            servers.append(self._storage)
        for server in servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # stop() returns quickly
                name=f"kvid-emulator:{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        logger.info("kvid emulator listening on %s (%r)", self.base_url, self.config)
        if self._storage is not None:
            logger.info("kvid emulator storage on %s", self.storage_url)
        return self

    def stop(self) -> None:
        """Stop serving, close open connections, cancel renders, remove the temp output dir."""
        if self._server is None or self._stopping.is_set():
            return
        self._stopping.set()  # wakes handlers sleeping in faults and stops renders mid-file
        for server in filter(None, (self._server, self._storage)):
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._http is not None:
            self._http.close()  # first: aborts image fetches that renders are waiting on
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owns_output_dir and self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)
        logger.info("kvid emulator on %s stopped", self.base_url)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- public properties and controls --------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return self._host

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server (what a client's base_url should be)."""
        return self._url(self.port)

    @property
    def storage_url(self) -> str:
        """``http://host:port`` of the origin that serves the videos: with ``separate_storage``
        the second listener (no api-key, paths ``/videos/NAME``), else ``base_url``."""
        if self._storage is None:
            return self.base_url
        return self._url(int(self._storage.server_address[1]))

    def _url(self, port: int) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{port}"

    @property
    def output_dir(self) -> Path:
        if self._output_dir is None:
            raise RuntimeError("the emulator is not started")
        return self._output_dir

    @property
    def stats(self) -> Counter[str | tuple[str, int]]:
        """Request counts: by endpoint name ("generate", "status", "result", "files", "other";
        both dialects) and by (endpoint, HTTP status) — status 0 when the connection was
        dropped unanswered; "refused": connections reset unread under a burst
        (``burst_reset_above``); "files_with_api_key": file requests that carried an api-key (a
        client must not send its key to storage). The generation dialect's money and rules:
        "insufficient_credit" (402s), "concurrent_limit" (429 CONCURRENT_LIMIT), "canceled"
        (``cancel_job``), "undocumented_field" (fields the page does not list, one per field,
        whether strict mode refused them or the gateway ignored them). A snapshot (a Counter:
        missing keys read as 0)."""
        with self._lock:
            snapshot = Counter(self._stats)
        for name in ("generate", "status", "result", "files"):
            snapshot[name] += 0
        return snapshot

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far (keep-alive reuse keeps this far below requests)."""
        server = self._server
        if server is None:
            return 0
        with server._connections_lock:
            return server.connections_accepted

    @property
    def jobs_created(self) -> int:
        """Jobs created, i.e. what the service would have billed (forget_jobs keeps counting)."""
        with self._lock:
            return self._jobs_created

    def wait_for_jobs(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` jobs were created (True), or ``timeout`` s (False).

        The moment a job exists, its answer is still on the way: tests kill a client right here.
        """
        with self._job_created:
            return self._job_created.wait_for(lambda: self._jobs_created >= count, timeout)

    @property
    def jobs(self) -> Mapping[str, JobInfo]:
        """A read-only snapshot: id -> dialect, kind, model, body (no image_file data), state."""
        view: dict[str, JobInfo] = {}
        for job in self._queue.all():
            status = self._status(job)
            view[job.request_id] = JobInfo(
                request_id=job.request_id,
                kind=job.kind,
                model=job.model,
                body=MappingProxyType(job.body),
                state=self._state_word(job, status.state),
                progress=status.progress,
                dialect=job.dialect,
                used_credit=job.price,
                image_sha256=job.extra.get("image_sha256"),
            )
        return MappingProxyType(view)

    @property
    def credit_balance(self) -> float | None:
        """Credits left for generation jobs (None: unlimited, ``config.credit_balance``)."""
        with self._admission:
            return self._balance

    def add_credits(self, credits: float) -> None:
        """Top the balance up (the user bought credits); only with a ``credit_balance``."""
        with self._admission:
            if self._balance is None:
                raise ValueError("the balance is unlimited (config.credit_balance is None)")
            self._balance += credits

    def cancel_job(self, job_id: str) -> None:
        """Make a generation job end ``canceled`` now: terminal, no video, its concurrency slot
        free. KeyError if unknown; ValueError for a video-dialect job (that dialect has no
        canceled state) or a job that already ended."""
        job = self._queue.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.dialect is not Dialect.GENERATION:
            raise ValueError(f"{job_id} is a video-dialect job, which cannot be canceled")
        if self._status(job).state in TERMINAL:
            raise ValueError(f"job {job_id} already ended")
        self._queue.cancel(job)
        self._count("canceled")

    def add_fault(
        self,
        endpoint: str,
        kind: str | int,
        times: int = 1,
        match: str | None = None,
        **kw: Any,
    ) -> Fault:
        """Script a fault for the next ``times`` requests to ``endpoint``; with ``match``, only
        requests whose prompt contains it (generate) or for that request_id (see faults.py)."""
        return self._faults.add(endpoint, str(kind), times, match, **kw)

    def pending_faults(self) -> list[Fault]:
        """Scripted faults not used up yet (a test's proof that its fault was hit)."""
        return self._faults.pending()

    def clear_faults(self) -> None:
        self._faults.clear()

    def fail_job(self, request_id: str, reason: str = "Job failed (emulator fail_job)") -> None:
        """Make a job end FAILED now with ``reason`` (KeyError if unknown, ValueError if done)."""
        job = self._queue.get(request_id)
        if job is None:
            raise KeyError(request_id)
        self._queue.fail(job, reason)

    def fail_next_jobs(self, count: int = 1, reason: str = "Job failed (fail_next_jobs)") -> None:
        """The next ``count`` jobs created end FAILED with ``reason`` (halfway through)."""
        with self._lock:
            self._fail_next.extend([reason] * count)

    def forget_jobs(self) -> None:
        """Simulate a restart that lost every job: later status/result answer 404."""
        self._queue.clear()
        logger.info("emulator on %s forgot every job", self.base_url)

    # --- request handling (called by the handler threads) ---------------------------------------

    def _count(self, key: str | tuple[str, int], n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def handle(
        self,
        method: str,
        target: str,
        headers: Message,
        body: bytes | None,
        *,
        storage: bool = False,
    ) -> _Response:
        """Answer one request (``storage``: to the storage origin); ``body`` is None when it was
        over the size cap."""
        url = urlsplit(target)
        route = _route(url.path, storage, self._edges.separate_storage)
        endpoint = route.endpoint
        self._count(endpoint)
        key = _api_key(headers)
        if endpoint == "files" and key:
            self._count("files_with_api_key")
        try:
            if storage and endpoint == "other":
                response = _xml_error(404, "NoSuchKey", "The specified key does not exist.")
            else:
                response = self._handle(method, route, url.query, headers, body)
        except Exception:
            logger.exception("emulator error on %s %s", method, url.path)
            response = _error(500, "Internal emulator error")
        self._count((endpoint, 0 if response.drop else response.status))
        if not response.drop:
            self._rough_headers(response, key)
        outcome = "dropped" if response.drop else response.status
        if self.config.echo_api_key and key:  # the careless server's access log
            logger.info("%s %s (api-key %s) -> %s", method, url.path, key, outcome)
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s -> %s", method, url.path, outcome)
        return response

    def _rough_headers(self, response: _Response, key: str) -> None:
        """Retry-After as an HTTP date, and the api-key echoed in a header, when configured."""
        retry = response.headers.get("Retry-After")
        if (
            retry is not None
            and response.status in (429, 503)
            and self._edges.retry_after_http_date
        ):
            response.headers["Retry-After"] = formatdate(
                math.ceil(time.time() + int(retry)), usegmt=True
            )
        if self.config.echo_api_key and key:
            response.headers["X-Debug-Key"] = key

    def _handle(
        self, method: str, route: _Route, query: str, headers: Message, body: bytes | None
    ) -> _Response:
        endpoint, arg = route.endpoint, route.arg
        self._sleep(self.config.latency)
        if endpoint == "other":
            return _error(404, f"No such endpoint: {arg}")
        allowed = _METHODS[endpoint]
        if method not in allowed.split(", "):
            return _error(405, f"Method {method} not allowed; use {allowed}", Allow=allowed)

        fault = self._faults.take(endpoint, lambda: _carried(route, query, body))
        if fault is not None and fault.kind == "echo_key":  # a careless server's error page
            sent = headers.get("api-key") or ""
            return _error(500, f"Internal error while serving api-key {sent!r}")
        if fault is not None:
            early = self._fault_before(endpoint, fault, arg, query, method)
            if early is not None:
                return early
        if body is None:
            cap = self.config.max_body_bytes
            return replace(_error(413, f"Request body larger than {cap} bytes"), close=True)
        if endpoint == "files":  # storage: public URLs, no api-key, no rate limit
            return self._file(arg, query, method, headers)

        retry_after = self._faults.rate_limited()
        if retry_after is not None:
            return _error(
                429, f"Too many requests; retry after {retry_after} s", Retry_After=str(retry_after)
            )
        code = self._faults.random_error()
        if code is not None:
            return self._status_fault(code, "json" if code in (500, 503) else "html", None)
        denied = self._check_key(headers, route.dialect)
        if denied is not None:
            return denied
        generation = route.dialect is Dialect.GENERATION
        if endpoint == "generate":
            assert route.kind is not None
            generate = self._generate_generation if generation else self._generate
            response, created = generate(route.kind, body)
            if created and fault is not None:
                return self._fault_after_create(fault, response)
            return response
        name = _ID_PARAMETER[route.dialect]
        job_id = parse_qs(query).get(name, [""])[0].strip()
        if not job_id:
            problem = f"{name}: required query parameter (got nothing); allowed: a job id"
            if generation:
                return _coded(400, ErrorCode.MISSING_PARAMETERS, problem)
            return _error(422, problem)
        job = self._queue.get(job_id)
        known = (  # each dialect knows only its own jobs, the video dialect by kind too
            job is not None
            and job.dialect is route.dialect
            and (generation or job.kind == route.kind)
        )
        fresh = job is not None and time.monotonic() - job.created < self._edges.fresh_404_s
        if job is None or not known or fresh:  # fresh: not in the read replica yet
            if generation:
                return _coded(404, ErrorCode.JOB_NOT_FOUND, f"jobId {job_id!r} not found")
            return _error(404, f"request_id {job_id!r} not found for {route.kind}")
        key = _api_key(headers)
        if endpoint == "status":
            if generation:
                return self._generation_status_response(job, key)
            return self._status_response(job, key)
        return self._generation_result(job, key) if generation else self._result(job, key)

    # --- faults --------------------------------------------------------------------------------

    def _fault_before(
        self, endpoint: str, fault: Fault, arg: str, query: str, method: str
    ) -> _Response | None:
        """Act on a scripted fault before the request is served; None: serve it (maybe later)."""
        if fault.kind in ("timeout", "timeout_before"):
            if endpoint == "generate" and fault.kind == "timeout":
                return None  # created first, then the wait (see _fault_after_create)
            self._sleep(fault.delay)
            if endpoint == "generate":  # timeout_before: nothing created, nothing answered
                return _Response(0, drop=True)
            return None
        if endpoint == "generate" and fault.after_create:
            return None
        if endpoint == "files":
            return self._file_fault(fault, arg, query, method)
        return self._fault_response(fault)

    def _fault_after_create(self, fault: Fault, response: _Response) -> _Response:
        if fault.kind == "timeout":
            self._sleep(fault.delay)
            return response  # the client has given up by now; the job exists all the same
        return self._fault_response(fault)

    def _fault_response(self, fault: Fault) -> _Response:
        kind = fault.kind
        if kind in STATUS_KINDS:
            code = int(kind)
            default = "json" if code in (500, 503) else "html"
            return self._status_fault(code, fault.options.get("body", default), fault.retry_after)
        if kind == "429":
            retry = str(fault.retry_after)
            return _error(429, f"Too many requests; retry after {retry} s", Retry_After=retry)
        if kind == "reset":
            return _Response(0, drop=True)
        if kind == "non_json":
            return _html(200, "kvid")
        if kind == "malformed":
            return _Response(200, b'{"result":"ok","detail":"not the kvid envelope"}')
        if kind == "missing_fields":
            return _envelope(200, True, {}, "OK")
        raise AssertionError(f"unhandled fault kind {kind!r}")

    @staticmethod
    def _status_fault(code: int, body: str, retry_after: int | None) -> _Response:
        reason = _REASONS.get(code, "Server Error")
        response = (
            _html(code, f"{code} {reason}")
            if body == "html"
            else _error(code, f"{reason} (injected)")
        )
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def _file_fault(self, fault: Fault, name: str, query: str, method: str) -> _Response:
        if fault.kind == "malformed":  # a truncated, undecodable video
            response = self._file(name, query, method, Message())
            if response.file is not None:
                response.file_bytes //= 2
            return response
        if fault.kind == "missing_fields":
            return _Response(200, b"", "video/mp4")
        return self._fault_response(fault)

    # --- auth ----------------------------------------------------------------------------------

    def _check_key(self, headers: Message, dialect: Dialect) -> _Response | None:
        """None if the api-key is good; else the video dialect's 401, the generation's 403."""
        key = _api_key(headers)  # never logged
        expected = self.config.api_key
        if key and (expected is None or hmac.compare_digest(key.encode(), expected.encode())):
            return None
        message = "Invalid api-key" if key else "Missing api-key header"
        return _coded(403, None, message) if dialect is Dialect.GENERATION else _error(401, message)

    # --- generate ------------------------------------------------------------------------------

    def _generate(self, kind: str, raw: bytes) -> tuple[_Response, bool]:
        body, problem = _parse_json(raw)
        if problem is not None:
            return _error(422, problem), False
        try:
            request = validate_body(kind, body, max_image_bytes=self.config.max_image_bytes)
        except RequestInvalid as exc:
            return _error(422, str(exc)), False
        params = request.params
        fps, frames = render.timing(request.model, params)
        plan = render.RenderPlan(
            prompt=params["prompt"],
            resolution=params["resolution"],
            aspect_ratio=params["aspect_ratio"],
            fps=fps,
            frames=frames,
            camera_fixed=bool(params.get("camera_fixed")),
            image_bytes=request.image_bytes,
            image_url=params.get("image_url"),
            end_image_url=params.get("end_image_url"),
        )
        job = self._create(
            dialect=Dialect.VIDEO,
            kind=kind,
            model=request.model,
            body=body,
            params=params,
            plan=plan,
            seed=params["seed"],
        )
        data = {"request_id": job.request_id}
        return _envelope(200, True, data, "Video generation request submitted successfully"), True

    def _generate_generation(self, kind: str, raw: bytes) -> tuple[_Response, bool]:
        body, problem = _parse_json(raw)
        if problem is not None:
            missing = problem == _NO_BODY
            code = ErrorCode.MISSING_PARAMETERS if missing else ErrorCode.INVALID_PARAMETERS
            return _coded(400, code, problem), False
        if isinstance(body, dict) and (undocumented := undocumented_fields(kind, body)):
            self._count("undocumented_field", len(undocumented))
        try:
            request = validate_generation(
                kind,
                body,
                models=self.config.generation_models,
                strict=self.config.strict_fields,
                max_image_bytes=self.config.max_image_bytes,
            )
        except GenerationInvalid as exc:
            return _coded(400, exc.code, str(exc)), False
        price = request.price(self.config.generation_prices)
        plan = render.RenderPlan(
            prompt=request.prompt,
            resolution=request.resolution,
            aspect_ratio=request.aspect_ratio,
            fps=request.fps,
            frames=request.frames,
            image_bytes=request.image_bytes,
            image_url=request.source_url,
        )
        with self._admission:
            refusal = self._refusal(price)
            if refusal is not None:
                return refusal, False
            job = self._create(
                dialect=Dialect.GENERATION,
                kind=kind,
                model=request.model,
                body=body,
                params={k: v for k, v in body.items() if k in DOCUMENTED[kind]},
                plan=plan,
                seed=request.seed,
                price=price,
            )
            if self._balance is not None:
                self._balance -= price
        data = {
            "job_id": job.request_id,
            "status": STATUS_WORDS[JobState.IN_QUEUE],
            "message": "Video generation job queued.",
            "estimated_time": f"{max(1, math.ceil(job.duration))}s",
            "video_type": kind,
        }
        return _envelope(200, True, data, "Video generation job queued."), True

    def _refusal(self, price: int) -> _Response | None:
        """402 if the balance cannot pay ``price``, 429 at the concurrency limit; None: admit.
        Called under ``_admission``: nothing is created either way."""
        if self._balance is not None and self._balance < price:
            self._count("insufficient_credit")
            message = f"Insufficient credit: the job costs {price} credits, {self._balance:g} left"
            return _coded(402, ErrorCode.INSUFFICIENT_CREDIT, message)
        limit = self.config.concurrent_limit
        if limit is not None and self._running_generation_jobs() >= limit:
            self._count("concurrent_limit")
            message = (
                f"Too many concurrent jobs: {limit} queued or processing; "
                "submit again when one finishes"
            )
            return _coded(429, ErrorCode.CONCURRENT_LIMIT, message)
        return None

    def _running_generation_jobs(self) -> int:
        return sum(
            1
            for job in self._queue.all()
            if job.dialect is Dialect.GENERATION and self._status(job).state not in TERMINAL
        )

    def _create(
        self,
        *,
        dialect: Dialect,
        kind: str,
        model: str,
        body: dict[str, Any],
        params: dict[str, Any],
        plan: render.RenderPlan,
        seed: int | None,
        price: int | None = None,
    ) -> Job:
        """Create a job of either dialect: timing, scripted or random failure, its render."""
        short = render.RESOLUTION_SHORT_SIDE[plan.resolution]
        if self.config.job_duration is not None:
            duration = self.config.job_duration
        else:
            duration = vendor_duration(short, plan.frames) * self.config.time_scale
        fail_reason, fail_fraction = None, 0.5
        with self._lock:
            scripted = self._fail_next.pop(0) if self._fail_next else None
        if scripted is not None:
            fail_reason = scripted
        elif FAIL_MARKER in plan.prompt:
            fail_reason = FAIL_MARKER_REASON
        elif (failure := self._faults.job_failure()) is not None:
            fail_reason, fail_fraction = failure
        seed = seed if seed is not None else self._faults.pick_seed()

        shown = dict(body)
        if isinstance(shown.get("image_file"), str):
            shown["image_file"] = f"<{len(shown['image_file'])} base64 characters elided>"
        generation = dialect is Dialect.GENERATION
        request_id = new_job_id() if generation else "req_" + secrets.token_hex(8)
        job = self._queue.create(
            request_id,
            dialect=dialect,
            kind=kind,
            model=model,
            body=shown,
            params=params,
            frames=plan.frames,
            duration=duration,
            fail_reason=fail_reason,
            fail_fraction=fail_fraction,
        )
        job.price = price
        job.extra["seed"] = seed
        if plan.image_bytes is not None:
            job.extra["image_sha256"] = hashlib.sha256(plan.image_bytes).hexdigest()
        with self._job_created:
            self._jobs_created += 1
            self._job_created.notify_all()
        job.video = self._submit_render(job, plan, seed)
        logger.info(
            "job %s created: %s %s %s, %d frames, %.2f s%s",
            request_id,
            kind,
            model,
            plan.resolution,
            plan.frames,
            duration,
            " (will fail)" if fail_reason else "",
        )
        return job

    # --- rendering -----------------------------------------------------------------------------

    def _submit_render(self, job: Job, plan: render.RenderPlan, seed: int) -> Future[Path]:
        assert self._pool is not None
        if self.config.reuse_renders and plan.aspect_ratio != "auto":
            # the geometry is known now: one task per geometry, its future shared by every job
            key = _shared_key(plan.geometry(), job.kind, plan.defects)
            with self._lock:
                shared = self._shared.get(key)
                if shared is None:
                    shared = self._pool.submit(self._render_job, job, plan, seed, key)
                    self._shared[key] = shared
                    shared.add_done_callback(functools.partial(self._forget_failed, key))
            return shared
        return self._pool.submit(self._render_job, job, plan, seed, None)

    def _forget_failed(self, key: _SharedKey, future: Future[Path]) -> None:
        """A failed shared render (say, a bad input image) must not fail every later job."""
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._shared.get(key) is future:
                    del self._shared[key]

    def _render_job(
        self,
        job: Job,
        plan: render.RenderPlan,
        seed: int,
        shared_key: _SharedKey | None,
    ) -> Path:
        """Fetch/decode the inputs, then render (or reuse) the job's video. Runs in the pool.

        ``shared_key``: this task IS the shared render for that geometry (reuse_renders).
        """
        try:
            image = end_image = None
            if plan.image_bytes is not None:
                image = render.decode_image(plan.image_bytes)
            elif plan.image_url is not None:
                image = render.decode_image(self._fetch(plan.image_url))
            if plan.end_image_url is not None:
                end_image = render.decode_image(self._fetch(plan.end_image_url))
            size = (image.shape[1], image.shape[0]) if image is not None else None
            geometry = plan.geometry(size)
            if shared_key is not None:
                path = self.output_dir / _shared_name(shared_key)
            elif self.config.reuse_renders:
                return self._shared_render(job, plan, geometry, image, end_image, seed)
            else:
                path = self.output_dir / f"{job.request_id}.mp4"
            self._encode(path, plan, geometry, image, end_image, seed)
            return path
        except render.RenderCancelled:
            raise
        except render.ImageError as exc:
            self._fail_render(job, f"Input image error: {exc}")
            raise
        except Exception as exc:
            logger.exception("render of %s failed", job.request_id)
            self._fail_render(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            raise

    def _fail_render(self, job: Job, reason: str) -> None:
        if self._queue.get(job.request_id) is job:
            self._queue.fail(job, reason, force=True)

    def _shared_render(
        self,
        job: Job,
        plan: render.RenderPlan,
        geometry: render.Geometry,
        image: np.ndarray | None,
        end_image: np.ndarray | None,
        seed: int,
    ) -> Path:
        """Reuse the render of this geometry, or be the one that makes it (geometry from 'auto')."""
        key = _shared_key(geometry, job.kind, plan.defects)
        with self._lock:
            shared = self._shared.get(key)
            owner = shared is None
            if shared is None:
                shared = Future()
                self._shared[key] = shared
        if not owner:  # another pool task renders it (or has); it is running, so no deadlock
            while True:
                try:
                    return shared.result(timeout=0.2)
                except FutureTimeout:
                    if self._stopping.is_set():
                        raise render.RenderCancelled from None
        path = self.output_dir / _shared_name(key)
        try:
            self._encode(path, plan, geometry, image, end_image, seed)
        except BaseException as exc:
            shared.set_exception(exc)
            with self._lock:
                self._shared.pop(key, None)
            raise
        shared.set_result(path)
        return path

    def _encode(
        self,
        path: Path,
        plan: render.RenderPlan,
        geometry: render.Geometry,
        image: np.ndarray | None,
        end_image: np.ndarray | None,
        seed: int,
    ) -> None:
        frames: Any
        if image is None:
            frames = render.text_frames(geometry, plan.prompt, seed, camera_fixed=plan.camera_fixed)
        else:
            frames = render.image_frames(
                geometry,
                image,
                end_image=end_image,
                seed=seed,
                prompt=plan.prompt,
                camera_fixed=plan.camera_fixed,
            )
        render.encode(path, geometry, render.with_defects(frames, plan.defects), self._stopping)

    def _fetch(self, url: str) -> bytes:
        assert self._http is not None
        return render.fetch_image(
            self._http,
            url,
            timeout=self.config.image_timeout,
            max_bytes=self.config.max_image_bytes,
        )

    # --- status and result ---------------------------------------------------------------------

    def _status(self, job: Job) -> JobStatus:
        """The job's state as its dialect reports it. A generation job is completed only once
        its video exists (a shared render that failed fails it); until then it is processing."""
        status = self._queue.status(job)
        if job.dialect is Dialect.VIDEO or status.state is not JobState.COMPLETED:
            return status
        video = job.video
        if video is None or not video.done() or video.cancelled():
            return replace(status, state=JobState.PROCESSING, progress=99)
        if (exc := video.exception()) is not None:
            self._fail_render(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            return self._queue.status(job)
        return status

    @staticmethod
    def _state_word(job: Job, state: JobState) -> str:
        """``state`` as the job's dialect says it."""
        return STATUS_WORDS[state] if job.dialect is Dialect.GENERATION else state.value

    def _publish(self, job: Job, path: Path) -> str:
        """Serve the job's video under its own name (its URL outlives ``forget_jobs``)."""
        name = f"{job.request_id}.mp4"
        with self._lock:
            self._files[name] = path
        return name

    def _generation_status_response(self, job: Job, key: str) -> _Response:
        status = self._status(job)
        url = error = None
        if status.state is JobState.COMPLETED:
            assert job.video is not None  # done: _status says so
            url = self._file_url(self._publish(job, job.video.result()))
        elif status.state is JobState.FAILED:
            error = f"{job.fail_reason}{self._failure_echo(job, key)}"
        data = {
            "job_id": job.request_id,
            "status": STATUS_WORDS[status.state],
            "prompt": job.params["prompt"],
            "result_url": url,
            "error_message": error,
            "video_type": job.kind,
            "created_at": iso_time(job.created_wall),
        }
        return _envelope(200, True, data, "Job status retrieved successfully")

    def _generation_result(self, job: Job, key: str) -> _Response:
        status = self._status(job)
        word = STATUS_WORDS[status.state]
        if status.state is JobState.FAILED:
            reason = f"{job.fail_reason}{self._failure_echo(job, key)}"
            message = f"job {job.request_id} failed: {reason}; see error_message in its status"
            return _coded(400, ErrorCode.JOB_FAILED, message)
        if status.state is not JobState.COMPLETED:
            message = f"job {job.request_id} is {word}, not completed"
            if status.state not in TERMINAL:
                message += "; poll status until completed"
            return _coded(400, ErrorCode.JOB_NOT_COMPLETED, message)
        assert job.video is not None  # done: _status says so
        path = job.video.result()
        name = self._publish(job, path)
        width, height = render.video_size(path)
        size = path.stat().st_size
        data = {
            "job_id": job.request_id,
            "status": word,
            "result_url": self._file_url(name),
            "width": width,
            "height": height,
            "size": size,  # bytes, not the video dialect's kilobytes
            "file_size": size,
            "type": job.kind,
            "used_credit": job.price,
            "created_at": iso_time(job.created_wall),
            "prompt": job.params["prompt"],
        }
        return _envelope(200, True, data, "Video result retrieved successfully")

    def _status_response(self, job: Job, key: str) -> _Response:
        status = self._queue.status(job)
        progress: float | None = status.progress
        if status.state is JobState.IN_QUEUE and self._edges.null_progress:
            progress = None
        elif status.state is JobState.PROCESSING and self._edges.fractional_progress:
            progress = round(status.exact_progress, 1)
        logs, message = list(status.logs), status.message
        if status.state is JobState.FAILED:
            echo = self._failure_echo(job, key)
            message += echo
            logs[-1] += echo
        if self.config.echo_api_key:
            logs.insert(0, f"{stamp(time.time())} - Request authenticated with api-key {key}")
        data: dict[str, Any] = {"status": status.state.value, "progress": progress, "logs": logs}
        if self._faults.omit_progress():
            del data["progress"]
        return _envelope(200, True, data, message)

    def _failure_echo(self, job: Job, key: str) -> str:
        """What a careless server appends to a failure: the request, and even the api-key."""
        echo = ""
        if self._edges.echo_request_in_failures:
            params = {k: v for k, v in job.body.items() if k != "prompt"}
            echo += f" (prompt {job.params['prompt']!r}, params {json.dumps(params)})"
        if self.config.echo_api_key:
            echo += f" (api-key {key})"
        return echo

    def _result(self, job: Job, key: str) -> _Response:
        status = self._queue.status(job)
        if status.state is JobState.FAILED:
            reason = f"{job.fail_reason}{self._failure_echo(job, key)}"
            return _error(409, f"{job.request_id} FAILED: {reason}; no video to return")
        if status.state is not JobState.COMPLETED:
            return _error(
                409,
                f"{job.request_id} is not COMPLETED yet (status {status.state.value}, "
                f"progress {status.progress}); poll status until COMPLETED",
            )
        if job.video is None:
            return _error(503, "Video not available yet", Retry_After="1")
        try:
            path = job.video.result(timeout=self.config.result_wait)
        except FutureTimeout:
            return _error(503, "Video is still being encoded; retry shortly", Retry_After="1")
        except CancelledError:
            return _error(503, "Service is shutting down", Retry_After="1")
        except Exception as exc:
            # a shared render that failed: this job fails with it (status agrees from now on)
            self._fail_render(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            reason = f"{job.fail_reason or 'rendering failed'}{self._failure_echo(job, key)}"
            return _error(409, f"{job.request_id} FAILED: {reason}; no video to return")
        name = self._publish(job, path)
        size = path.stat().st_size
        data = {"url": self._file_url(name), "name": name, "size": math.ceil(size / 1024)}
        return _envelope(200, True, data, "Video result retrieved successfully")

    def _file_url(self, name: str) -> str:
        """Where ``name`` is served; with ``result_url_ttl_s``, signed by a fresh token."""
        if self._storage is not None:
            url = f"{self.storage_url}{_STORAGE_PREFIX}{name}"
        else:
            url = f"{self.config.public_base_url or self.base_url}{_FILES_PREFIX}{name}"
        ttl = self._edges.result_url_ttl_s
        if not ttl:
            return url
        token = secrets.token_urlsafe(16)
        now = time.monotonic()
        with self._lock:
            # issued in time order: drop the expired from the front (they answer 403 all the same)
            while self._url_tokens:
                oldest = next(iter(self._url_tokens))
                if now - self._url_tokens[oldest][1] < ttl:
                    break
                del self._url_tokens[oldest]
            self._url_tokens[token] = (name, now)
        return f"{url}?expires={math.ceil(time.time() + ttl)}&signature={token}"

    def _file(self, name: str, query: str, method: str, headers: Message) -> _Response:
        path = self._files.get(name) if _FILE_NAME.match(name) else None
        if path is None or not path.is_file():
            if self._storage is not None:
                return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
            return _error(404, f"No such file: {name}")
        ttl = self._edges.result_url_ttl_s
        if ttl:
            token = parse_qs(query).get("signature", [""])[0]
            with self._lock:
                issued = self._url_tokens.get(token)
            if issued is None or issued[0] != name or time.monotonic() - issued[1] >= ttl:
                return _xml_error(403, "AccessDenied", "Request has expired")
        stat = path.stat()
        validators = {
            "ETag": f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"',
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        }
        if self.config.range_requests:
            ranged = _range_response(path, stat.st_size, headers, validators)
            if ranged is not None:
                return ranged
        response = _Response(200, content_type="video/mp4", file=path, file_bytes=stat.st_size)
        if self.config.range_requests:
            response.headers.update({**validators, "Accept-Ranges": "bytes"})
        return response


_BYTE_RANGE: Final = re.compile(r"^bytes=(\d+)-(\d*)$")


def _range_response(
    path: Path, size: int, headers: Message, validators: Mapping[str, str]
) -> _Response | None:
    """A 206 (or 416) for a single-range ``Range`` whose ``If-Range`` (if any) still holds;
    None: answer with the whole file, as RFC 9110 says for anything else."""
    match = _BYTE_RANGE.match((headers.get("Range") or "").strip())
    if match is None:
        return None
    condition = (headers.get("If-Range") or "").strip()
    if condition and condition not in validators.values():
        return None  # the file changed since the client's first bytes: the whole of it
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    if start >= size or end < start:
        return _Response(416, b"", "video/mp4", headers={"Content-Range": f"bytes */{size}"})
    return _Response(
        206,
        content_type="video/mp4",
        headers={**validators, "Content-Range": f"bytes {start}-{end}/{size}"},
        file=path,
        file_bytes=end - start + 1,
        file_offset=start,
    )


_SharedKey = tuple[int, int, int, int, str, str]


def _shared_key(
    geometry: render.Geometry, kind: str, defects: frozenset[render.Defect]
) -> _SharedKey:
    """What a reused render is of: a broken video is shared only with the same breakage."""
    broken = "+".join(sorted(defects))
    return (geometry.width, geometry.height, geometry.fps, geometry.frames, kind, broken)


def _shared_name(key: _SharedKey) -> str:
    width, height, fps, frames, kind, broken = key
    return f"shared-{width}x{height}-{fps}fps-{frames}f-{kind}{'-' + broken if broken else ''}.mp4"


_NO_BODY: Final = "body: required (got nothing); allowed: a JSON object"


def _parse_json(raw: bytes) -> tuple[Any, str | None]:
    """(the body's JSON, None), or (None, the problem): ``_NO_BODY`` when there is none."""
    if not raw.strip():
        return None, _NO_BODY
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"body: not valid JSON ({exc}); allowed: a JSON object"


def _api_key(headers: Message) -> str:
    return (headers.get("api-key") or "").strip()


def _carried(route: _Route, query: str, body: bytes | None) -> str | None:
    """What a scripted fault's ``match`` is compared with: generate's prompt, else the id."""
    if route.endpoint == "files":
        return route.arg.removesuffix(".mp4")
    if route.endpoint != "generate":
        return parse_qs(query).get(_ID_PARAMETER[route.dialect], [""])[0].strip()
    try:
        prompt = json.loads(body or b"").get("prompt")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True)
class _Route:
    """Where a request goes: endpoint name ("generate", "status", "result", "files" or
    "other"), its dialect, the job kind in its path (generation status/result: None) and an
    argument (a file name, or the path if unknown)."""

    endpoint: str
    dialect: Dialect = Dialect.VIDEO
    kind: str | None = None
    arg: str = ""


def _route(path: str, storage: bool, separate_storage: bool) -> _Route:
    """The storage origin serves only ``/videos/``; the API origin ``/files/`` unless separate."""
    files_prefix = _STORAGE_PREFIX if storage else None if separate_storage else _FILES_PREFIX
    if files_prefix is not None and path.startswith(files_prefix):
        return _Route("files", arg=path[len(files_prefix) :])
    if storage:
        return _Route("other", arg=path)
    if path.startswith(_API_PREFIX):
        kind, _, action = path[len(_API_PREFIX) :].partition("/")
        if kind in JOB_KINDS and action in ("generate", "status", "result"):
            return _Route(action, Dialect.VIDEO, kind)
    if path.startswith(_GENERATION_PREFIX):
        rest = path[len(_GENERATION_PREFIX) :]
        if rest in ("status", "result"):
            return _Route(rest, Dialect.GENERATION)
        kind, _, action = rest.partition("/")
        if kind in GENERATION_KINDS and action == "generate-async":
            return _Route("generate", Dialect.GENERATION, kind)
    return _Route("other", arg=path)


class _Server(ThreadingHTTPServer):
    """The API listener, or (``storage``) the videos' origin, which never resets bursts."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], emulator: KvidEmulator, *, storage: bool = False
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # read by server_activate's listen(), which the base __init__ calls: set it first
        self.request_queue_size = emulator.config.backlog
        self.emulator = emulator
        self.storage = storage
        self.reset_above = 0 if storage else emulator.config.edges.burst_reset_above
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.connections_accepted = 0
        self.in_flight = 0  # requests between their headers and the end of their answer
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            refuse = 0 < self.reset_above < self.in_flight
            if not refuse:
                self._connections.add(request)
                self.connections_accepted += 1
        if refuse:  # an overloaded server: reset before reading a byte, so nothing is created
            self.emulator._count("refused")
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.close()
            return
        super().process_request(request, client_address)

    def request_started(self) -> None:
        with self._connections_lock:
            self.in_flight += 1

    def request_ended(self) -> None:
        with self._connections_lock:
            self.in_flight -= 1

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections, so a stopped emulator answers nothing more."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else ~40 ms per keep-alive request (Nagle + delayed ACK)
    server_version = "kvid-emulator/0.1"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are closed after this
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged by KvidEmulator.handle, through logging

    def _read_body(self) -> bytes | None:
        """The request body, or None if over the cap (the connection is then closed)."""
        cap = self.server.emulator.config.max_body_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(cap)
        length_header = self.headers.get("Content-Length") or "0"
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0 or length > cap:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self, cap: int) -> bytes | None:
        data = bytearray()
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            size = int(size_line or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(data)
            if len(data) + size > cap:
                self.close_connection = True
                return None
            data += self.rfile.read(size)
            self.rfile.readline(1024)

    def _serve(self, method: str) -> None:
        self.server.request_started()
        try:
            self._answer(method)
        finally:
            self.server.request_ended()

    def _answer(self, method: str) -> None:
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        emulator = self.server.emulator
        response = emulator.handle(
            method, self.path, self.headers, body, storage=self.server.storage
        )
        try:
            if response.drop:
                self._reset()
            else:
                self._write(response, head=method == "HEAD")
        except OSError:  # the client went away (it timed out, or reset): nothing to tell it
            self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST, not a polite FIN: the client sees a connection error."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _write(self, response: _Response, *, head: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        length = response.file_bytes if response.file is not None else len(response.body)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(length))
        if response.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        rate = self.server.emulator.config.download_bytes_per_second
        with response.file.open("rb") as fh:
            fh.seek(response.file_offset)
            left = length
            while left > 0:
                chunk = fh.read(min(_CHUNK if rate is None else max(1, int(rate / 10)), left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
                if rate is not None:
                    self.wfile.flush()
                    self.server.emulator._sleep(len(chunk) / rate)
