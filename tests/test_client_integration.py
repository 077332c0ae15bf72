"""The client against the real kvid emulator on 127.0.0.1: every job kind end to end, every retry
path, uncertain submissions, downloads, wait(), concurrency limits and the secrecy of the key.

Faults are injected at the emulator and counted there, so "no duplicate generate" is proven by
the server's own books. Sleeping is injected so retries cost no time; the few
``httpx.MockTransport`` uses are for failures no server can produce on demand (a connection that
never opens, a cross-origin redirect, an echoed key, a body without Content-Length).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from kvid_dagster.client import (
    AsyncKvidClient,
    ImageToVideoV1,
    ImageToVideoV2,
    JobKind,
    JobResult,
    JobStatus,
    KvidAuthenticationError,
    KvidClient,
    KvidConnectionError,
    KvidDownloadTooLargeError,
    KvidError,
    KvidJobFailedError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidRequest,
    KvidServerError,
    KvidTimeoutError,
    KvidUncertainSubmissionError,
    KvidValidationError,
    TextToVideoV1,
    TextToVideoV2,
    build_request,
)
from kvid_dagster.emulator import FAIL_MARKER, EmulatorConfig, KvidEmulator

T2V, I2V = JobKind.TEXT_TO_VIDEO, JobKind.IMAGE_TO_VIDEO
ROOT = Path(__file__).resolve().parents[1]
SMALL_V1 = {"resolution": "480p", "num_frames": 81, "frames_per_second": 16}
SMALL_V2 = {"resolution": "480p", "duration": "5"}


# ---- helpers ----------------------------------------------------------------------------------


class Sleeps(list[float]):
    """An injectable sleep that records the waits and does not wait (or only ``real`` s)."""

    def __init__(self, real: float = 0.0) -> None:
        super().__init__()
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.real:
            time.sleep(min(seconds, self.real))

    async def async_sleep(self, seconds: float) -> None:
        self.append(seconds)
        if self.real:
            await asyncio.sleep(min(seconds, self.real))


def write_png(path: Path, width: int, height: int) -> Path:
    """A real (decodable) RGB PNG with a gradient, written with zlib alone."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 128)], axis=-1)
    rows = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def probe(path: Path) -> tuple[int, int, int, int]:
    """(width, height, fps, frames) of a video, frames counted by decoding them all."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        frames = sum(1 for _ in container.decode(stream))
        return stream.width, stream.height, round(float(stream.average_rate)), frames


def image_size(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height


def no_partials(folder: Path) -> bool:
    return not list(folder.glob(".*.part"))


class CountingTransport(httpx.HTTPTransport):
    """A real network transport that remembers what went through it and the peak in flight."""

    def __init__(self, fail_first: list[type[httpx.TransportError]] | None = None) -> None:
        super().__init__()
        self.fail_first = list(fail_first or [])
        self.sent: list[httpx.Request] = []
        self.current = self.peak = 0
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.fail_first:  # a connection that could not be made: nothing reaches the server
            raise self.fail_first.pop(0)("injected before sending", request=request)
        with self._lock:
            self.sent.append(request)
            self.current += 1
            self.peak = max(self.peak, self.current)
        try:
            return super().handle_request(request)
        finally:
            with self._lock:
                self.current -= 1


class AsyncCountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.current = self.peak = self.total = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.current += 1
        self.total += 1
        self.peak = max(self.peak, self.current)
        try:
            return await super().handle_async_request(request)
        finally:
            self.current -= 1


class Gateway:
    """A reverse proxy on 127.0.0.1, like a company's API gateway: it serves ``upstream`` under
    ``prefix`` (stripped before forwarding), answers 404 outside it, redirects ``/moved/<rest>``
    to ``redirect_to/<rest>``, and remembers every request as (method, path?query, api-key)."""

    def __init__(self, prefix: str = "", upstream: str = "", redirect_to: str = "") -> None:
        self.prefix, self.upstream, self.redirect_to = prefix, upstream, redirect_to
        self.received: list[tuple[str, str, str | None]] = []
        self._forward = httpx.Client(timeout=30.0)
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                gateway.answer(self)

            do_POST = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        self.received.append((handler.command, handler.path, handler.headers.get("api-key")))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers: dict[str, str] = {}
        if handler.path.startswith("/moved/") and self.redirect_to:
            status, content = 302, b""
            headers["Location"] = self.redirect_to + handler.path.removeprefix("/moved")
        elif handler.path.startswith(self.prefix + "/"):
            forwarded = {k: v for k, v in handler.headers.items() if k.lower() != "host"}
            upstream = self._forward.request(
                handler.command,
                self.upstream + handler.path.removeprefix(self.prefix),
                headers=forwarded,
                content=body,
            )
            status, content = upstream.status_code, upstream.content
            headers.update(
                (k, v) for k, v in upstream.headers.items() if k.lower() in ("content-type",)
            )
        else:
            status, content = 404, b'{"success": false, "data": null, "message": "no route"}'
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._forward.close()


@pytest.fixture
def gateways() -> Iterator[Callable[..., Gateway]]:
    """``make(prefix="", upstream="", redirect_to="")``: started gateways, closed at teardown."""
    made: list[Gateway] = []

    def make(**kwargs: str) -> Gateway:
        made.append(Gateway(**kwargs))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(emulator: KvidEmulator, api_key: str, sleeps: Sleeps) -> Iterator[KvidClient]:
    with KvidClient(
        api_key, emulator.base_url, sleep=sleeps, timeout=5.0, backoff_base=0.01, max_retries=3
    ) as made:
        yield made


def finished_job(client: KvidClient, request: KvidRequest | None = None) -> tuple[JobKind, str]:
    request = request or TextToVideoV1("A man hiking with a backpack", **SMALL_V1)
    request_id = client.generate(request)
    status = client.wait(request.job_kind, request_id, poll_interval=0.05, deadline=60)
    assert status.is_completed
    return request.job_kind, request_id


# ---- every job kind end to end, through both clients --------------------------------------------


def _requests(png: Path) -> dict[str, tuple[KvidRequest, tuple[int, int] | None]]:
    return {
        "v1-t2v": (TextToVideoV1("A man hiking with a backpack", **SMALL_V1), None),
        "v1-i2v": (ImageToVideoV1("Zoom on the food", png, **SMALL_V1), (320, 240)),
        "v2-t2v": (TextToVideoV2("Cleaning with a vacuum. low angle", **SMALL_V2), None),
        "v2-i2v": (ImageToVideoV2("Pan across", png, aspect_ratio="9:21", **SMALL_V2), None),
    }


@pytest.mark.parametrize("which", ["v1-t2v", "v1-i2v", "v2-t2v", "v2-i2v"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_end_to_end(
    emulator: KvidEmulator, api_key: str, tmp_path: Path, which: str, flavour: str
) -> None:
    png = write_png(tmp_path / "dish.png", 320, 240)
    request, size = _requests(png)[which]
    out = tmp_path / "out"
    out.mkdir()
    seen: list[JobStatus] = []
    options: dict[str, Any] = {"poll_interval": 0.05, "deadline": 60, "on_progress": seen.append}

    if flavour == "sync":
        with KvidClient(api_key, emulator.base_url) as sync_client:
            request_id = sync_client.generate(request)
            final = sync_client.wait(request.job_kind, request_id, **options)
            result = sync_client.result(request.job_kind, request_id)
            downloaded = sync_client.download(result, out)
    else:

        async def flow() -> tuple[str, JobStatus, JobResult, Any]:
            async with AsyncKvidClient(api_key, emulator.base_url) as async_client:
                rid = await async_client.generate(request)
                status = await async_client.wait(request.job_kind, rid, **options)
                found = await async_client.result(request.job_kind, rid)
                return rid, status, found, await async_client.download(found, out)

        request_id, final, result, downloaded = asyncio.run(flow())

    assert final.is_completed and seen[-1] == final
    assert [s.progress or 0 for s in seen] == sorted(s.progress or 0 for s in seen)
    assert emulator.jobs[request_id].body["resolution"] == "480p"
    assert downloaded.path == out / result.name and no_partials(out)
    data = downloaded.path.read_bytes()
    assert (
        downloaded.size_bytes == len(data) and downloaded.sha256 == hashlib.sha256(data).hexdigest()
    )
    assert probe(downloaded.path) == request.output_geometry(size)
    assert emulator.jobs_created == 1 and emulator.stats["generate"] == 1


def test_image_by_url_with_an_end_image(
    client: KvidClient, emulator: KvidEmulator, image_server: str, tmp_path: Path
) -> None:
    request = build_request(
        "The tiger blinks. [Low-angle close-up shot]",
        model="v2",
        image=f"{image_server}/tiger.jpg",
        end_image=f"{image_server}/salmon_dish.jpg",
        resolution="480p",
        aspect_ratio="1:1",
    )
    assert isinstance(request, ImageToVideoV2)
    kind, request_id = finished_job(client, request)
    assert emulator.jobs[request_id].body["image_url"].endswith("/tiger.jpg")
    video = client.download(client.result(kind, request_id), tmp_path / "tiger.mp4")
    assert probe(video.path) == (480, 480, 24, 120)


def test_auto_aspect_follows_a_url_image(
    client: KvidClient, image_server: str, tmp_path: Path
) -> None:
    request = ImageToVideoV1("Lotus pond", f"{image_server}/pavilion_park.jpg", **SMALL_V1)
    kind, request_id = finished_job(client, request)
    video = client.download(client.result(kind, request_id), tmp_path / "park.mp4")
    expected = request.output_geometry(image_size(ROOT / "data" / "images" / "pavilion_park.jpg"))
    assert probe(video.path) == expected


# ---- retries of reads -------------------------------------------------------------------------

READ_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("500", {}),
    ("502", {}),
    ("503", {}),
    ("504", {}),
    ("429", {"retry_after": 0}),
    ("reset", {}),
    ("timeout", {"delay": 3.0}),  # well past the faulted call's 1 s timeout
]


@pytest.mark.parametrize(("kind", "options"), READ_FAULTS)
@pytest.mark.parametrize("endpoint", ["status", "result", "files"])
def test_reads_are_retried_through_transient_faults(
    emulator: KvidEmulator,
    api_key: str,
    sleeps: Sleeps,
    tmp_path: Path,
    endpoint: str,
    kind: str,
    options: dict[str, Any],
) -> None:
    # the set-up (the job and its first result, rendered then) has no fault and any time it
    # needs: a loaded machine must not fail it before the faults are even added
    with KvidClient(api_key, emulator.base_url, sleep=sleeps) as patient:
        job_kind, request_id = finished_job(patient)
        result = patient.result(job_kind, request_id)
    with KvidClient(
        api_key, emulator.base_url, sleep=sleeps, timeout=1.0, backoff_base=0.01, max_retries=3
    ) as fast:
        before = emulator.stats[endpoint]
        emulator.add_fault(endpoint, kind, times=2, **options)
        sleeps.clear()
        if endpoint == "status":
            assert fast.status(job_kind, request_id).is_completed
        elif endpoint == "result":
            assert fast.result(job_kind, request_id) == result
        else:
            video = fast.download(result, tmp_path / "v.mp4")
            assert probe(video.path) == (854, 480, 16, 81)
            assert no_partials(tmp_path)
    assert emulator.stats[endpoint] - before == 3  # two faults, then the answer
    assert len(sleeps) == 2
    assert emulator.jobs_created == 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("503", KvidServerError), ("429", KvidRateLimitedError), ("reset", KvidConnectionError)],
)
def test_read_retries_are_bounded(
    client: KvidClient, emulator: KvidEmulator, sleeps: Sleeps, kind: str, error: type[KvidError]
) -> None:
    job_kind, request_id = finished_job(client)
    before = emulator.stats["status"]
    emulator.add_fault("status", kind, times=10)
    sleeps.clear()
    with pytest.raises(error):
        client.status(job_kind, request_id)
    assert emulator.stats["status"] - before == 4  # the call and max_retries=3 retries
    assert len(sleeps) == 3


@pytest.mark.parametrize("kind", ["non_json", "malformed", "missing_fields"])
def test_answers_outside_the_contract_are_not_retried(
    client: KvidClient, emulator: KvidEmulator, kind: str
) -> None:
    job_kind, request_id = finished_job(client)
    before = emulator.stats["status"]
    emulator.add_fault("status", kind)
    with pytest.raises(KvidProtocolError) as caught:
        client.status(job_kind, request_id)
    assert caught.value.status_code == 200
    assert emulator.stats["status"] - before == 1


def test_not_found_and_not_ready(
    emulator_factory: Callable[..., KvidEmulator], api_key: str, sleeps: Sleeps
) -> None:
    slow = emulator_factory(job_duration=30.0)
    with KvidClient(api_key, slow.base_url, sleep=sleeps) as patient:
        request_id = patient.generate(TextToVideoV1("slow", **SMALL_V1))
        with pytest.raises(KvidNotReadyError) as not_ready:
            patient.result(T2V, request_id)
        assert not_ready.value.status_code == 409 and "not COMPLETED" in str(not_ready.value)
        with pytest.raises(KvidNotFoundError):
            patient.status(I2V, request_id)  # right id, wrong kind
        slow.forget_jobs()
        with pytest.raises(KvidNotFoundError) as not_found:
            patient.status(T2V, request_id)
        assert not_found.value.server_message and request_id in not_found.value.server_message
    assert sleeps == []  # none of these is worth a retry


def test_bad_ids_and_kinds_are_refused_before_any_request(
    client: KvidClient, emulator: KvidEmulator
) -> None:
    for bad in ("", "../admin", "a b", "x" * 300):
        with pytest.raises(KvidValidationError):
            client.status(T2V, bad)
    with pytest.raises(KvidValidationError, match="job_kind"):
        client.result("video-to-video", "req_1")
    with pytest.raises(KvidValidationError, match="request"):
        client.generate({"prompt": "a dict is not a request"})  # type: ignore[arg-type]
    assert sum(emulator.stats[name] for name in ("status", "result", "generate")) == 0


# ---- generate: retried only when no job can exist ----------------------------------------------


def test_generate_retries_429_honouring_retry_after(
    client: KvidClient, emulator: KvidEmulator, sleeps: Sleeps
) -> None:
    emulator.add_fault("generate", "429", times=2, retry_after=2)
    request_id = client.generate(TextToVideoV1("x", **SMALL_V1))
    assert request_id in emulator.jobs
    assert sleeps == [2.0, 2.0]
    assert emulator.stats["generate"] == 3 and emulator.jobs_created == 1


def test_retry_after_is_capped_by_backoff_max(
    emulator: KvidEmulator, api_key: str, sleeps: Sleeps
) -> None:
    emulator.add_fault("generate", "429", retry_after=120)
    with KvidClient(api_key, emulator.base_url, sleep=sleeps, backoff_max=5.0) as capped:
        capped.generate(TextToVideoV1("x", **SMALL_V1))
    assert sleeps == [5.0] and emulator.jobs_created == 1


def test_generate_gives_up_on_429_without_creating_anything(
    client: KvidClient, emulator: KvidEmulator, sleeps: Sleeps
) -> None:
    emulator.add_fault("generate", "429", times=10, retry_after=1)
    with pytest.raises(KvidRateLimitedError) as caught:
        client.generate(TextToVideoV1("x", **SMALL_V1))
    assert caught.value.retry_after == 1.0 and caught.value.status_code == 429
    assert emulator.stats["generate"] == 4 and emulator.jobs_created == 0 and len(sleeps) == 3


@pytest.mark.parametrize(
    "never_sent", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout]
)
def test_generate_retries_a_connection_that_never_opened(
    emulator: KvidEmulator, api_key: str, sleeps: Sleeps, never_sent: type[httpx.TransportError]
) -> None:
    transport = CountingTransport(fail_first=[never_sent, never_sent])
    with KvidClient(api_key, emulator.base_url, sleep=sleeps, transport=transport) as flaky:
        request_id = flaky.generate(TextToVideoV1("x", **SMALL_V1))
    assert request_id in emulator.jobs and len(sleeps) == 2
    assert emulator.stats["generate"] == 1 and emulator.jobs_created == 1


def test_connection_refused_everywhere_is_a_connection_error(api_key: str, sleeps: Sleeps) -> None:
    with (
        KvidClient(api_key, "http://127.0.0.1:9", sleep=sleeps, max_retries=2) as nowhere,
        pytest.raises(KvidConnectionError),
    ):
        nowhere.generate(TextToVideoV1("x", **SMALL_V1))
    assert len(sleeps) == 2


UNCERTAIN: list[tuple[str, dict[str, Any], int]] = [
    ("timeout", {"delay": 1.5}, 1),  # created, answer too late
    ("timeout_before", {"delay": 1.5}, 0),  # nothing created, but the client cannot know
    ("500", {}, 0),
    ("502", {}, 0),
    ("503", {"retry_after": 1}, 0),
    ("504", {}, 0),
    ("500", {"after_create": True}, 1),
    ("503", {"after_create": True}, 1),
    ("reset", {"after_create": True}, 1),
    ("reset", {}, 0),
    ("non_json", {"after_create": True}, 1),
    ("malformed", {"after_create": True}, 1),
    ("missing_fields", {"after_create": True}, 1),
]


@pytest.mark.parametrize(("kind", "options", "created"), UNCERTAIN)
def test_ambiguous_generate_failures_are_never_resent(
    emulator: KvidEmulator,
    api_key: str,
    sleeps: Sleeps,
    tmp_path: Path,
    kind: str,
    options: dict[str, Any],
    created: int,
) -> None:
    request = ImageToVideoV1("x", write_png(tmp_path / "a.png", 64, 48), **SMALL_V1)
    emulator.add_fault("generate", kind, **options)
    with (
        KvidClient(api_key, emulator.base_url, sleep=sleeps, timeout=0.5) as submitter,
        pytest.raises(KvidUncertainSubmissionError) as caught,
    ):
        submitter.generate(request)
    error = caught.value
    assert error.body == request.to_body() and error.job_kind is I2V
    assert "not re-sent" in str(error) and error.body["image_file"] not in str(error)
    assert emulator.stats["generate"] == 1 and emulator.jobs_created == created
    assert sleeps == []


def test_write_timeout_is_uncertain_too(api_key: str, sleeps: Sleeps) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.WriteTimeout("the body stalled half-way", request=request)

    calls = []
    transport = httpx.MockTransport(lambda r: calls.append(r) or handler(r))
    with (
        KvidClient(api_key, "http://kvid.test", transport=transport, sleep=sleeps) as mocked,
        pytest.raises(KvidUncertainSubmissionError, match="WriteTimeout"),
    ):
        mocked.generate(TextToVideoV2("x"))
    assert len(calls) == 1 and sleeps == []


def test_a_definite_refusal_is_not_uncertain(emulator: KvidEmulator, sleeps: Sleeps) -> None:
    with (
        KvidClient("wrong-key", emulator.base_url, sleep=sleeps) as intruder,
        pytest.raises(KvidAuthenticationError) as caught,
    ):
        intruder.generate(TextToVideoV1("x"))
    assert caught.value.status_code == 401 and caught.value.server_message == "Invalid api-key"
    assert emulator.stats["generate"] == 1 and emulator.jobs_created == 0 and sleeps == []


def test_async_client_retries_reads_and_never_resends_generate(
    emulator: KvidEmulator, api_key: str, sleeps: Sleeps
) -> None:
    async def flow() -> None:
        async with AsyncKvidClient(
            api_key, emulator.base_url, sleep=sleeps.async_sleep, timeout=0.5, backoff_base=0.01
        ) as aclient:
            request_id = await aclient.generate(TextToVideoV1("x", **SMALL_V1))
            emulator.add_fault("status", "503", times=2, retry_after=3)
            assert (await aclient.status(T2V, request_id)).status
            assert sleeps == [3.0, 3.0]
            emulator.add_fault("generate", "timeout", delay=1.5)
            with pytest.raises(KvidUncertainSubmissionError):
                await aclient.generate(TextToVideoV1("y", **SMALL_V1))

    asyncio.run(flow())
    assert emulator.stats["status"] == 3 and emulator.stats["generate"] == 2
    assert emulator.jobs_created == 2 and len(sleeps) == 2


def test_a_result_url_that_is_not_http_is_a_protocol_error(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    odd = emulator_factory(public_base_url="ftp://storage.example")
    with KvidClient(api_key, odd.base_url) as client:
        kind, request_id = finished_job(client)
        with pytest.raises(KvidProtocolError, match="not an http"):
            client.result(kind, request_id)


# ---- wait() -----------------------------------------------------------------------------------


def test_wait_raises_job_failed_with_reason_and_logs(
    client: KvidClient, emulator: KvidEmulator
) -> None:
    request_id = client.generate(TextToVideoV1(f"boom {FAIL_MARKER}", **SMALL_V1))
    with pytest.raises(KvidJobFailedError) as caught:
        client.wait(T2V, request_id, poll_interval=0.05, deadline=60)
    error = caught.value
    assert error.request_id == request_id and FAIL_MARKER in error.reason
    assert error.logs and FAIL_MARKER in str(error)
    with pytest.raises(KvidNotReadyError):
        client.result(T2V, request_id)


def test_wait_reports_an_operator_failure_reason(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    slow = emulator_factory(job_duration=30.0)
    with KvidClient(api_key, slow.base_url) as patient:
        request_id = patient.generate(TextToVideoV2("x", **SMALL_V2))
        slow.fail_job(request_id, "GPU worker crashed during inference")
        with pytest.raises(KvidJobFailedError) as caught:
            patient.wait(T2V, request_id, poll_interval=0.05, deadline=10)
    assert "GPU worker crashed during inference" in caught.value.reason


def test_wait_times_out_at_the_deadline(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    slow = emulator_factory(job_duration=30.0)
    seen: list[JobStatus] = []
    with KvidClient(api_key, slow.base_url) as patient:
        request_id = patient.generate(TextToVideoV1("x", **SMALL_V1))
        started = time.monotonic()
        with pytest.raises(KvidTimeoutError) as caught:
            patient.wait(T2V, request_id, poll_interval=0.05, deadline=0.4, on_progress=seen.append)
        elapsed = time.monotonic() - started
    assert 0.35 <= elapsed < 2.0
    assert caught.value.request_id == request_id and caught.value.last_status == "PROCESSING"
    assert len(seen) >= 3 and not any(s.is_terminal for s in seen)


def test_queued_jobs_are_just_not_finished(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    one_worker = emulator_factory(workers=1, job_duration=0.6)
    seen: list[str] = []
    with KvidClient(api_key, one_worker.base_url) as client:
        client.generate(TextToVideoV1("first", **SMALL_V1))
        second = client.generate(TextToVideoV1("second", **SMALL_V1))
        final = client.wait(
            T2V,
            second,
            poll_interval=0.05,
            deadline=30,
            on_progress=lambda s: seen.append(s.status),
        )
    assert seen[0] == "IN_QUEUE" and "PROCESSING" in seen and final.status == "COMPLETED"


def test_wait_calls_async_callbacks_and_refuses_them_in_the_sync_client(
    emulator: KvidEmulator, api_key: str
) -> None:
    seen: list[int] = []

    async def on_progress(status: JobStatus) -> None:
        await asyncio.sleep(0)
        seen.append(status.progress or 0)

    async def flow() -> JobStatus:
        async with AsyncKvidClient(api_key, emulator.base_url) as aclient:
            request_id = await aclient.generate(TextToVideoV1("x", **SMALL_V1))
            return await aclient.wait(T2V, request_id, poll_interval=0.05, on_progress=on_progress)

    assert asyncio.run(flow()).is_completed and seen[-1] == 100
    with KvidClient(api_key, emulator.base_url) as sync_client:
        request_id = sync_client.generate(TextToVideoV1("x", **SMALL_V1))
        with pytest.raises(TypeError, match="AsyncKvidClient"):
            sync_client.wait(T2V, request_id, poll_interval=0.05, on_progress=on_progress)


# ---- downloads --------------------------------------------------------------------------------


def test_download_size_cap_from_content_length(client: KvidClient, tmp_path: Path) -> None:
    kind, request_id = finished_job(client)
    result = client.result(kind, request_id)
    target = tmp_path / "capped.mp4"
    with pytest.raises(KvidDownloadTooLargeError, match="Content-Length"):
        client.download(result, target, max_bytes=10_000)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert client.download(result, target).size_bytes > 10_000  # the cap was the only problem


def test_download_size_cap_while_streaming(api_key: str, tmp_path: Path) -> None:
    chunks = [b"\x00" * 4096] * 64  # sent chunked: no Content-Length to refuse up front
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=iter(chunks)))
    with KvidClient(api_key, "http://kvid.test", transport=transport) as mocked:
        with pytest.raises(KvidDownloadTooLargeError, match="max_bytes=100000"):
            mocked.download(
                "http://kvid.test/files/big.mp4", tmp_path / "big.mp4", max_bytes=100_000
            )
        assert list(tmp_path.iterdir()) == []
        small = mocked.download("http://kvid.test/files/big.mp4", tmp_path, max_bytes=1 << 20)
    assert small.path == tmp_path / "big.mp4" and small.size_bytes == 4096 * 64


@pytest.mark.parametrize("kind", ["malformed", "missing_fields"])
def test_truncated_or_empty_files_are_refused(
    client: KvidClient, emulator: KvidEmulator, tmp_path: Path, kind: str
) -> None:
    job_kind, request_id = finished_job(client)
    result = client.result(job_kind, request_id)
    emulator.add_fault("files", kind)
    with pytest.raises(KvidProtocolError):
        client.download(result, tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_download_replaces_atomically_and_only_http(client: KvidClient, tmp_path: Path) -> None:
    kind, request_id = finished_job(client)
    result = client.result(kind, request_id)
    target = tmp_path / "nested" / "video.mp4"
    first = client.download(result, target)
    target.write_bytes(b"stale")
    second = client.download(result.url, target)  # a bare URL works too, and replaces
    assert first.sha256 == second.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    for url in ("file:///etc/passwd", "ftp://x/y.mp4", "javascript:alert(1)"):
        with pytest.raises(KvidValidationError):
            client.download(url, tmp_path / "x.mp4")
    assert sorted(p.name for p in target.parent.iterdir()) == ["video.mp4"]


def test_key_goes_only_to_the_api_origin(
    emulator_factory: Callable[..., KvidEmulator], api_key: str, tmp_path: Path
) -> None:
    api, storage = emulator_factory(), emulator_factory()
    transport = CountingTransport()
    with KvidClient(api_key, storage.base_url) as storage_client:
        kind, request_id = finished_job(storage_client)
        foreign = storage_client.result(kind, request_id)
    with KvidClient(api_key, api.base_url, transport=transport) as client:
        with pytest.raises(KvidNotFoundError):
            client.status(T2V, "req_unknown_1")
        client.download(foreign, tmp_path / "v.mp4")
    by_host = {request.url.port: request.headers.get("api-key") for request in transport.sent}
    assert by_host[api.port] == api_key
    assert by_host[int(storage.port)] is None


def test_key_is_dropped_on_a_cross_origin_redirect(api_key: str, tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("api-key")))
        if request.url.host == "api.kvid.test":
            return httpx.Response(302, headers={"Location": "https://storage.example/v.mp4"})
        return httpx.Response(200, content=b"video bytes")

    with KvidClient(api_key, "https://api.kvid.test", transport=httpx.MockTransport(handler)) as c:
        done = c.download("https://api.kvid.test/files/v.mp4", tmp_path / "v.mp4")
    assert seen == [("api.kvid.test", api_key), ("storage.example", None)]
    assert done.path.read_bytes() == b"video bytes"


@pytest.mark.parametrize(("suffix", "flavour"), [("/kvid", "sync"), ("/kvid/", "async")])
def test_a_base_url_path_prefix_is_kept(
    emulator: KvidEmulator,
    api_key: str,
    gateways: Callable[..., Gateway],
    suffix: str,
    flavour: str,
) -> None:
    """Behind a gateway at ``https://gw.example.com/kvid`` the API is ``/kvid/ai/video/...``."""
    gateway = gateways(prefix="/kvid", upstream=emulator.base_url)
    base_url = gateway.url + suffix
    request = TextToVideoV1("A man hiking with a backpack", **SMALL_V1)

    def sync_run() -> tuple[str, JobResult]:
        with KvidClient(api_key, base_url) as client:
            request_id = client.generate(request)
            client.wait(T2V, request_id, poll_interval=0.05, deadline=60)
            return request_id, client.result(T2V, request_id)

    async def async_run() -> tuple[str, JobResult]:
        async with AsyncKvidClient(api_key, base_url) as client:
            request_id = await client.generate(request)
            await client.wait(T2V, request_id, poll_interval=0.05, deadline=60)
            return request_id, await client.result(T2V, request_id)

    request_id, result = sync_run() if flavour == "sync" else asyncio.run(async_run())
    api = "/kvid/ai/video/text-to-video"
    first, *polls, last = gateway.received
    assert first == ("POST", f"{api}/generate", api_key)
    assert polls and set(polls) == {("GET", f"{api}/status?request_id={request_id}", api_key)}
    assert last == ("GET", f"{api}/result?request_id={request_id}", api_key)
    assert result.url.startswith(emulator.base_url + "/files/")


def test_key_goes_only_to_the_api_origin_behind_a_prefix(
    emulator_factory: Callable[..., KvidEmulator],
    api_key: str,
    gateways: Callable[..., Gateway],
    tmp_path: Path,
) -> None:
    """The origin is scheme, host and port: a path prefix neither widens nor narrows it."""
    storage = gateways()  # another origin, serving the emulator's files
    emulator = emulator_factory(
        EmulatorConfig(api_key=api_key, job_duration=0.3, public_base_url=storage.url)
    )
    storage.upstream = emulator.base_url
    api = gateways(prefix="/kvid", upstream=emulator.base_url, redirect_to=storage.url)
    with KvidClient(api_key, f"{api.url}/kvid") as client:
        kind, request_id = finished_job(client)
        result = client.result(kind, request_id)
        path = httpx.URL(result.url).path
        assert result.url == storage.url + path  # the video is on the storage origin
        client.download(result, tmp_path / "direct.mp4")
        client.download(f"{api.url}/moved{path}", tmp_path / "redirected.mp4")
        client.download(f"{api.url}/kvid{path}", tmp_path / "own-origin.mp4")
    assert storage.received == [("GET", path, None), ("GET", path, None)]
    assert {key for _, _, key in api.received} == {api_key}  # own origin, prefix or not
    assert ("GET", f"/moved{path}", api_key) in api.received
    assert ("GET", f"/kvid{path}", api_key) in api.received
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert len(set(sizes.values())) == 1 and len(sizes) == 3


# ---- concurrency ------------------------------------------------------------------------------


def test_async_client_keeps_hundreds_of_calls_under_max_in_flight(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    slowish = emulator_factory(latency=0.01)
    transport = AsyncCountingTransport()

    async def flow() -> list[JobStatus]:
        async with AsyncKvidClient(
            api_key, slowish.base_url, max_in_flight=8, transport=transport
        ) as aclient:
            request_id = await aclient.generate(TextToVideoV1("x", **SMALL_V1))
            calls = [aclient.status(T2V, request_id) for _ in range(300)]
            return await asyncio.gather(*calls)

    statuses = asyncio.run(flow())
    assert len(statuses) == 300 and all(s.status for s in statuses)
    assert transport.total == 301 and slowish.stats["status"] == 300
    assert transport.peak == 8  # used to the full, never beyond


def burst_of_generates(
    base_url: str, api_key: str, count: int, tag: str, max_in_flight: int = 32
) -> list[str | BaseException]:
    """``count`` generates at once through one new AsyncKvidClient, in a new event loop."""

    async def flow() -> list[str | BaseException]:
        async with AsyncKvidClient(api_key, base_url, max_in_flight=max_in_flight) as aclient:
            return await generate_all(aclient, count, tag)

    return asyncio.run(flow())


async def generate_all(aclient: AsyncKvidClient, count: int, tag: str) -> list[Any]:
    calls = [aclient.generate(TextToVideoV1(f"{tag} {i}", **SMALL_V1)) for i in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_a_burst_of_generates_meets_a_small_backlog_without_uncertainty(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    # the default backlog is the standard library's 5: 32 fresh connections at once overflow
    # it on Linux (resets after the request was written: uncertain submissions). The client
    # opens connections as answers come back instead, and keeps them alive.
    small = emulator_factory(reuse_renders=True)
    assert small.config.backlog == 5
    outcomes = burst_of_generates(small.base_url, api_key, 200, "burst")
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []  # no KvidUncertainSubmissionError, nor anything else
    assert len(set(outcomes)) == 200 and set(outcomes) == set(small.jobs)
    assert small.jobs_created == 200 and small.stats["generate"] == 200
    assert 1 <= small.connections_accepted <= 32  # reused, not one per request


@pytest.mark.parametrize("where", ["one event loop", "two threads"])
def test_two_clients_bursting_at_once_meet_a_small_backlog_without_uncertainty(
    emulator_factory: Callable[..., KvidEmulator], api_key: str, where: str
) -> None:
    # two processes submitting at the same moment: each ramps on its own, and together they
    # still do not overflow a backlog of 5
    small = emulator_factory(reuse_renders=True)
    assert small.config.backlog == 5
    if where == "one event loop":

        async def both() -> list[Any]:
            async with (
                AsyncKvidClient(api_key, small.base_url, max_in_flight=32) as one,
                AsyncKvidClient(api_key, small.base_url, max_in_flight=32) as two,
            ):
                first, second = await asyncio.gather(
                    generate_all(one, 150, "one"), generate_all(two, 150, "two")
                )
                return first + second

        outcomes = asyncio.run(both())
    else:
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(burst_of_generates, small.base_url, api_key, 150, tag)
                for tag in ("one", "two")
            ]
            outcomes = [o for run in runs for o in run.result(timeout=120)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    assert len(set(outcomes)) == 300 and set(outcomes) == set(small.jobs)
    assert small.jobs_created == 300 and small.stats["generate"] == 300
    assert small.connections_accepted <= 2 * 32


def test_sync_client_threads_meet_a_small_backlog_without_uncertainty(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    small = emulator_factory(reuse_renders=True)
    with (
        KvidClient(api_key, small.base_url, max_in_flight=32) as shared,
        ThreadPoolExecutor(32) as pool,
    ):
        runs = [
            pool.submit(shared.generate, TextToVideoV1(f"thread {i}", **SMALL_V1))
            for i in range(200)
        ]
        outcomes = [run.exception(timeout=120) or run.result() for run in runs]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    assert small.jobs_created == 200 and set(outcomes) == set(small.jobs)
    assert small.connections_accepted <= 32


def test_status_polling_ramps_up_to_max_in_flight(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    # a poll of many jobs at once still gets to use max_in_flight: the ramp is not a throttle
    small = emulator_factory(reuse_renders=True)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    transport = AsyncCountingTransport(limits=limits)

    async def flow() -> list[JobStatus]:
        async with AsyncKvidClient(
            api_key, small.base_url, max_in_flight=32, transport=transport
        ) as aclient:
            request_ids = await generate_all(aclient, 200, "poll")
            assert not [r for r in request_ids if isinstance(r, BaseException)]
            polls = [aclient.status(T2V, request_id) for request_id in request_ids]
            return await asyncio.gather(*polls)

    statuses = asyncio.run(flow())
    assert len(statuses) == 200 and all(s.status for s in statuses)
    assert small.stats["status"] == 200 and small.jobs_created == 200
    assert 2 < transport.peak <= 32  # it opened up, never beyond the ceiling
    assert small.connections_accepted <= 32


@pytest.mark.parametrize("twin", ["async", "sync"])
def test_a_slow_server_sees_two_new_connections_until_it_answers(
    emulator_factory: Callable[..., KvidEmulator], api_key: str, twin: str
) -> None:
    # what a full accept queue can hold against one client: the rest wait, unconnected
    slow = emulator_factory(latency=0.8, reuse_renders=True)
    with KvidClient(api_key, slow.base_url) as setup:
        request_id = setup.generate(TextToVideoV1("x", **SMALL_V1))
    before = slow.connections_accepted
    unanswered: list[int] = []  # connections seen while the server had answered no poll yet

    def watch() -> None:
        for _ in range(6):
            time.sleep(0.05)
            opened = slow.connections_accepted - before
            answered = sum(n for key, n in slow.stats.items() if key[:1] == ("status",))
            if answered == 0:  # read after: there was no answer either when ``opened`` was
                unanswered.append(opened)

    if twin == "async":

        async def flow() -> list[JobStatus]:
            async with AsyncKvidClient(api_key, slow.base_url, max_in_flight=32) as aclient:
                polls = asyncio.gather(*(aclient.status(T2V, request_id) for _ in range(24)))
                await asyncio.to_thread(watch)
                return await polls

        statuses = asyncio.run(flow())
    else:
        with (
            KvidClient(api_key, slow.base_url, max_in_flight=32) as shared,
            ThreadPoolExecutor(32) as pool,
        ):
            runs = [pool.submit(shared.status, T2V, request_id) for _ in range(24)]
            watch()
            statuses = [run.result(timeout=60) for run in runs]
    assert unanswered and max(unanswered) <= 2
    assert len(statuses) == 24 and slow.stats["status"] == 24
    assert 2 < slow.connections_accepted - before <= 32  # more once answers came


def test_cancelled_calls_give_their_slots_back(api_key: str) -> None:
    release = asyncio.Event()
    current = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        try:
            if "hang" in str(request.url):
                await release.wait()
            await asyncio.sleep(0.002)
            return httpx.Response(200, json={"success": True, "data": {"status": "IN_QUEUE"}})
        finally:
            current -= 1

    async def flow() -> None:
        nonlocal peak
        async with AsyncKvidClient(
            api_key, "http://kvid.test", max_in_flight=4, transport=httpx.MockTransport(handler)
        ) as aclient:
            hanging = [asyncio.ensure_future(aclient.status(T2V, f"hang{i}")) for i in range(10)]
            await asyncio.sleep(0.05)
            assert peak == 2  # the ramp's start: two in flight, eight waiting for a slot
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
            assert aclient._ramp.in_flight == 0  # a cancelled call is no longer counted
            peak = 0
            statuses = await asyncio.gather(*(aclient.status(T2V, f"ok{i}") for i in range(40)))
            assert len(statuses) == 40
            assert peak == 4  # every slot came back, and the window opened to the ceiling

    asyncio.run(asyncio.wait_for(flow(), timeout=30))


def test_sync_client_shares_its_limit_across_threads(
    emulator_factory: Callable[..., KvidEmulator], api_key: str
) -> None:
    slowish = emulator_factory(latency=0.01)
    transport = CountingTransport()
    with KvidClient(api_key, slowish.base_url, max_in_flight=3, transport=transport) as shared:
        request_id = shared.generate(TextToVideoV1("x", **SMALL_V1))
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: shared.status(T2V, request_id), range(64)))
    assert len(statuses) == 64 and slowish.stats["status"] == 64
    assert transport.peak == 3


# ---- the key stays secret ---------------------------------------------------------------------


def test_key_never_reaches_logs_reprs_or_errors(
    emulator: KvidEmulator,
    api_key: str,
    sleeps: Sleeps,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with KvidClient(api_key, emulator.base_url, sleep=sleeps, backoff_base=0.01) as client:
        texts.append(repr(client))
        emulator.add_fault("status", "503")
        kind, request_id = finished_job(client)
        result = client.result(kind, request_id)
        texts += [repr(result), repr(client.download(result, tmp_path))]
        emulator.add_fault("generate", "500")
        for failing in (
            lambda: client.generate(TextToVideoV1("x")),
            lambda: client.status(T2V, "req_missing_123"),
        ):
            with pytest.raises(KvidError) as caught:
                failing()
            texts += [
                str(caught.value),
                repr(caught.value),
                *traceback.format_exception(caught.value),
            ]
            texts += [str(v) for v in vars(caught.value).values()]
    records = [r for r in caplog.records if r.name == "kvid_dagster.client"]
    assert any(r.levelno == logging.DEBUG for r in records)
    assert any("retry" in r.getMessage() for r in records)
    assert api_key not in caplog.text
    assert all(api_key not in text for text in texts)


def test_an_echoed_key_is_redacted(sleeps: Sleeps) -> None:
    key = "sk-echo-7f00d2"

    def handler(request: httpx.Request) -> httpx.Response:
        message = f"api-key {request.headers['api-key']} is not valid"
        return httpx.Response(401, json={"success": False, "data": None, "message": message})

    with (
        KvidClient(key, "http://kvid.test", transport=httpx.MockTransport(handler)) as mocked,
        pytest.raises(KvidAuthenticationError) as caught,
    ):
        mocked.status(T2V, "req_1")
    error = caught.value
    assert key not in str(error) and key not in (error.server_message or "")
    assert key not in repr(error.args) and "api-key *** is not valid" in str(error)
