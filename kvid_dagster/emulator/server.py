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

The emulator is split by concern: this module is the facade (lifecycle, public controls, the
dispatch of a request through faults and auth, and job creation); transport.py is the HTTP
plumbing (listeners in background threads, keep-alive, backlog, body reading, Range);
routing.py maps paths to endpoints; responses.py builds the answers; video_dialect.py and
generation_dialect.py answer in each dialect; storage.py serves the videos from ``/files/``, or
with ``separate_storage`` from a second listener (``/videos/``); render_cache.py renders them.
Job states come from the clock (see jobs.py). Everything lives on the instance, so several
emulators can run in one process.

The rough edges of real servers (``config.edges``; all off by default, on with ``realistic``) are
applied across those modules: connection resets under bursts
(``EmulatorServer.process_request``), 404s for fresh jobs, null / fractional / missing progress,
expiring result URLs, Retry-After as an HTTP date and FAILED messages that echo the request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.message import Message
from email.utils import formatdate
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

from kvid_dagster.emulator import render
from kvid_dagster.emulator.config import EmulatorConfig
from kvid_dagster.emulator.faults import STATUS_KINDS, Fault, FaultInjector
from kvid_dagster.emulator.generation import STATUS_WORDS, ErrorCode, new_job_id
from kvid_dagster.emulator.generation_dialect import GenerationResponder
from kvid_dagster.emulator.jobs import (
    TERMINAL,
    EmulatedJobState,
    EmulatedJobStatus,
    Job,
    JobQueue,
    vendor_duration,
)
from kvid_dagster.emulator.render_cache import RenderCache
from kvid_dagster.emulator.responses import (
    Response,
    coded,
    envelope,
    error,
    html,
    status_fault,
    xml_error,
)
from kvid_dagster.emulator.routing import (
    ID_PARAMETER,
    METHODS,
    Route,
    carried,
    route_of,
    sent_api_key,
)
from kvid_dagster.emulator.storage import FileResponder
from kvid_dagster.emulator.transport import EmulatorServer
from kvid_dagster.emulator.validation import EmulatedDialect
from kvid_dagster.emulator.video_dialect import VideoResponder

logger = logging.getLogger("kvid_dagster.emulator")

FAIL_MARKER: Final = "[[kvid:fail]]"
"""A prompt containing this always ends FAILED (a deterministic failure for tests)."""
FAIL_MARKER_REASON: Final = "Generation failed: the request was rejected ([[kvid:fail]] in prompt)"


@dataclass(frozen=True)
class JobInfo:
    """What ``KvidEmulator.jobs`` shows of one job (a snapshot)."""

    request_id: str  # the video dialect's request_id, or the generation dialect's job_id
    kind: str  # "text-to-video" | "image-to-video" | "reference-to-video" (generation)
    model: str  # video: "v1" | "v2"; generation: the model as sent (default "wan")
    body: Mapping[str, Any]  # as sent, image_file contents elided
    state: str  # as its dialect's status says it: IN_QUEUE ... FAILED, or queued ... canceled
    progress: int
    dialect: EmulatedDialect
    used_credit: int | None  # generation: the price debited; video: None
    image_sha256: str | None = None  # of the image_file bytes received (what the job was made of)


class KvidEmulator(VideoResponder, GenerationResponder, FileResponder):
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
        self._fail_next: list[str] = []  # reasons for the next jobs created (fail_next_jobs)
        # generation jobs are admitted one at a time: the balance and the concurrency limit are
        # checked and the job created (or refused) as one step
        self._admission = threading.Lock()
        self._balance = self.config.credit_balance
        self._stopping = threading.Event()
        self._server: EmulatorServer | None = None
        self._storage: EmulatorServer | None = None  # separate_storage: the videos' origin
        self._threads: list[threading.Thread] = []
        self._renders = RenderCache(self.config, self._queue, self._stopping)

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
        self._renders.start(self._output_dir)
        self._server = EmulatorServer((self._host, self._requested_port), self)
        servers = [self._server]
        if self._edges.separate_storage:
            self._storage = EmulatorServer((self._host, 0), self, storage=True)
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
        self._renders.close()
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
        """The API listener's port (the one chosen, with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """The address the listeners are bound to."""
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
        """Where the videos are written (a temp dir unless ``output_dir`` was given)."""
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
        if job.dialect is not EmulatedDialect.GENERATION:
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
        """Drop every scripted fault not used up yet."""
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
    ) -> Response:
        """Answer one request (``storage``: to the storage origin); ``body`` is None when it was
        over the size cap."""
        url = urlsplit(target)
        route = route_of(url.path, storage, self._edges.separate_storage)
        endpoint = route.endpoint
        self._count(endpoint)
        key = sent_api_key(headers)
        if endpoint == "files" and key:
            self._count("files_with_api_key")
        try:
            if storage and endpoint == "other":
                response = xml_error(404, "NoSuchKey", "The specified key does not exist.")
            else:
                response = self._handle(method, route, url.query, headers, body)
        except Exception:
            logger.exception("emulator error on %s %s", method, url.path)
            response = error(500, "Internal emulator error")
        self._count((endpoint, 0 if response.drop else response.status))
        if not response.drop:
            self._rough_headers(response, key)
        outcome = "dropped" if response.drop else response.status
        if self.config.echo_api_key and key:  # the careless server's access log
            logger.info("%s %s (api-key %s) -> %s", method, url.path, key, outcome)
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s -> %s", method, url.path, outcome)
        return response

    def _rough_headers(self, response: Response, key: str) -> None:
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
        self, method: str, route: Route, query: str, headers: Message, body: bytes | None
    ) -> Response:
        endpoint, arg = route.endpoint, route.arg
        self._sleep(self.config.latency)
        if endpoint == "other":
            return error(404, f"No such endpoint: {arg}")
        allowed = METHODS[endpoint]
        if method not in allowed.split(", "):
            return error(405, f"Method {method} not allowed; use {allowed}", Allow=allowed)

        fault = self._faults.take(endpoint, lambda: carried(route, query, body))
        if fault is not None and fault.kind == "echo_key":  # a careless server's error page
            sent = headers.get("api-key") or ""
            return error(500, f"Internal error while serving api-key {sent!r}")
        if fault is not None:
            early = self._fault_before(endpoint, fault, arg, query, method)
            if early is not None:
                return early
        if body is None:
            cap = self.config.max_body_bytes
            return replace(error(413, f"Request body larger than {cap} bytes"), close=True)
        if endpoint == "files":  # storage: public URLs, no api-key, no rate limit
            return self._file(arg, query, method, headers)

        retry_after = self._faults.rate_limited()
        if retry_after is not None:
            return error(
                429, f"Too many requests; retry after {retry_after} s", Retry_After=str(retry_after)
            )
        code = self._faults.random_error()
        if code is not None:
            return status_fault(code, "json" if code in (500, 503) else "html", None)
        denied = self._check_key(headers, route.dialect)
        if denied is not None:
            return denied
        generation = route.dialect is EmulatedDialect.GENERATION
        if endpoint == "generate":
            assert route.kind is not None
            generate = self._generate_generation if generation else self._generate
            response, created = generate(route.kind, body)
            if created and fault is not None:
                return self._fault_after_create(fault, response)
            return response
        name = ID_PARAMETER[route.dialect]
        job_id = parse_qs(query).get(name, [""])[0].strip()
        if not job_id:
            problem = f"{name}: required query parameter (got nothing); allowed: a job id"
            if generation:
                return coded(400, ErrorCode.MISSING_PARAMETERS, problem)
            return error(422, problem)
        job = self._queue.get(job_id)
        known = (  # each dialect knows only its own jobs, the video dialect by kind too
            job is not None
            and job.dialect is route.dialect
            and (generation or job.kind == route.kind)
        )
        fresh = job is not None and time.monotonic() - job.created < self._edges.fresh_404_s
        if job is None or not known or fresh:  # fresh: not in the read replica yet
            if generation:
                return coded(404, ErrorCode.JOB_NOT_FOUND, f"jobId {job_id!r} not found")
            return error(404, f"request_id {job_id!r} not found for {route.kind}")
        key = sent_api_key(headers)
        if endpoint == "status":
            if generation:
                return self._generation_status_response(job, key)
            return self._status_response(job, key)
        return self._generation_result(job, key) if generation else self._result(job, key)

    # --- faults --------------------------------------------------------------------------------

    def _fault_before(
        self, endpoint: str, fault: Fault, arg: str, query: str, method: str
    ) -> Response | None:
        """Act on a scripted fault before the request is served; None: serve it (maybe later)."""
        if fault.kind in ("timeout", "timeout_before"):
            if endpoint == "generate" and fault.kind == "timeout":
                return None  # created first, then the wait (see _fault_after_create)
            self._sleep(fault.delay)
            if endpoint == "generate":  # timeout_before: nothing created, nothing answered
                return Response(0, drop=True)
            return None
        if endpoint == "generate" and fault.after_create:
            return None
        if endpoint == "files":
            return self._file_fault(fault, arg, query, method)
        return self._fault_response(fault)

    def _fault_after_create(self, fault: Fault, response: Response) -> Response:
        if fault.kind == "timeout":
            self._sleep(fault.delay)
            return response  # the client has given up by now; the job exists all the same
        return self._fault_response(fault)

    def _fault_response(self, fault: Fault) -> Response:
        kind = fault.kind
        if kind in STATUS_KINDS:
            code = int(kind)
            default = "json" if code in (500, 503) else "html"
            return status_fault(code, fault.options.get("body", default), fault.retry_after)
        if kind == "429":
            retry = str(fault.retry_after)
            return error(429, f"Too many requests; retry after {retry} s", Retry_After=retry)
        if kind == "reset":
            return Response(0, drop=True)
        if kind == "non_json":
            return html(200, "kvid")
        if kind == "malformed":
            return Response(200, b'{"result":"ok","detail":"not the kvid envelope"}')
        if kind == "missing_fields":
            return envelope(200, True, {}, "OK")
        raise AssertionError(f"unhandled fault kind {kind!r}")

    # --- auth ----------------------------------------------------------------------------------

    def _check_key(self, headers: Message, dialect: EmulatedDialect) -> Response | None:
        """None if the api-key is good; else the video dialect's 401, the generation's 403."""
        key = sent_api_key(headers)  # never logged
        expected = self.config.api_key
        if key and (expected is None or hmac.compare_digest(key.encode(), expected.encode())):
            return None
        message = "Invalid api-key" if key else "Missing api-key header"
        return (
            coded(403, None, message)
            if dialect is EmulatedDialect.GENERATION
            else error(401, message)
        )

    # --- generate ------------------------------------------------------------------------------

    def _create(
        self,
        *,
        dialect: EmulatedDialect,
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
        generation = dialect is EmulatedDialect.GENERATION
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
        job.video = self._renders.submit(job, plan, seed)
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

    # --- status and result ---------------------------------------------------------------------

    def _status(self, job: Job) -> EmulatedJobStatus:
        """The job's state as its dialect reports it. A generation job is completed only once
        its video exists (a shared render that failed fails it); until then it is processing."""
        status = self._queue.status(job)
        if job.dialect is EmulatedDialect.VIDEO or status.state is not EmulatedJobState.COMPLETED:
            return status
        video = job.video
        if video is None or not video.done() or video.cancelled():
            return replace(status, state=EmulatedJobState.PROCESSING, progress=99)
        if (exc := video.exception()) is not None:
            self._renders.fail(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            return self._queue.status(job)
        return status

    @staticmethod
    def _state_word(job: Job, state: EmulatedJobState) -> str:
        """``state`` as the job's dialect says it."""
        return STATUS_WORDS[state] if job.dialect is EmulatedDialect.GENERATION else state.value

    def _failure_echo(self, job: Job, key: str) -> str:
        """What a careless server appends to a failure: the request, and even the api-key."""
        echo = ""
        if self._edges.echo_request_in_failures:
            params = {k: v for k, v in job.body.items() if k != "prompt"}
            echo += f" (prompt {job.params['prompt']!r}, params {json.dumps(params)})"
        if self.config.echo_api_key:
            echo += f" (api-key {key})"
        return echo
