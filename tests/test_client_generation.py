"""The client's generation dialect (the vendor's current English page) beside the video dialect.

Parsing is tested sans-I/O on hand-built ``httpx.Response`` objects (the protocol never does
I/O), the request rules before any byte goes out, and everything end to end against the real
emulator on 127.0.0.1, where money is counted by the server's own books: every job kind
generated, waited for, fetched, downloaded and its video decoded with PyAV; 402, 429
CONCURRENT_LIMIT, canceled and failed jobs; the credit pool kept out of everything shown.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from conftest import IMAGES_DIR, EmulatorFactory, fast_config

from kvid_dagster.client import (
    GENERATION_DIALECT,
    GENERATION_MODELS,
    KVID_DIALECT,
    ApiDialect,
    AsyncKvidClient,
    CreditPool,
    CreditPoolField,
    GenerationDialect,
    GenerationImageToVideo,
    GenerationReferenceToVideo,
    GenerationTextToVideo,
    JobKind,
    JobResult,
    JobState,
    JobStatus,
    KvidAuthenticationError,
    KvidClient,
    KvidConcurrentLimitError,
    KvidDialect,
    KvidError,
    KvidInsufficientCreditError,
    KvidJobFailedError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidServerError,
    KvidUncertainSubmissionError,
    KvidValidationError,
    TextToVideoV1,
    TextToVideoV2,
    build_request,
    dialect_for,
)
from kvid_dagster.client.retry import RetryPolicy, RetryVerdict
from kvid_dagster.emulator import FAIL_MARKER, KvidEmulator

T2V, I2V, R2V = JobKind.TEXT_TO_VIDEO, JobKind.IMAGE_TO_VIDEO, JobKind.REFERENCE_TO_VIDEO
URL = "https://images.example.com/tiger.png"
VID = "https://videos.example.com/dance.mp4"
AUD = "https://audio.example.com/beat.mp3"
POOL_VALUE = "pool-7f3a9c1e-private"


# ---- helpers ----------------------------------------------------------------------------------


def answer(
    status: int,
    payload: Any = None,
    *,
    path: str = "/ai/generation/result",
    job_id: str = "job_1",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A response as the generation dialect's server would send it, to a request for ``job_id``."""
    request = httpx.Request("GET", f"http://kvid.test{path}", params={"jobId": job_id})
    if isinstance(payload, bytes):
        return httpx.Response(status, content=payload, request=request, headers=headers)
    return httpx.Response(status, json=payload, request=request, headers=headers)


def ok(data: dict[str, Any], message: str = "ok") -> dict[str, Any]:
    return {"success": True, "data": data, "message": message}


def refusal(message: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "data": None, "message": message, **extra}


def decoded(path: Path) -> tuple[int, int, int, int]:
    """(width, height, fps, frames) of an H.264 MP4, every frame decoded and its size checked."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        sizes = [(frame.width, frame.height) for frame in container.decode(stream)]
        assert sizes and len(set(sizes)) == 1, set(sizes)
        return *sizes[0], round(float(stream.average_rate)), len(sizes)


def picture_size(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height


class NoSleep(list[float]):
    """Records every wait the client asks for, without waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# ---- choosing the dialect ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("video", KVID_DIALECT),
        ("generation", GENERATION_DIALECT),
        (" Generation ", GENERATION_DIALECT),
        (ApiDialect.GENERATION, GENERATION_DIALECT),
        (ApiDialect.VIDEO, KVID_DIALECT),
    ],
)
def test_dialect_for_names_the_protocol(name: Any, expected: object) -> None:
    dialect = dialect_for(name)
    assert dialect is expected
    assert dialect.api is ApiDialect(str(name).strip().lower())


@pytest.mark.parametrize("name", ["gen", "", "v2", None, 3])
def test_an_unknown_dialect_is_an_error_naming_both(name: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        dialect_for(name)
    assert caught.value.field == "dialect"
    assert "video" in str(caught.value) and "generation" in str(caught.value)


# ---- the protocol, sans I/O -------------------------------------------------------------------


def test_generate_paths_follow_the_job_kind() -> None:
    for kind in JobKind:
        call = GENERATION_DIALECT.generate_call(kind, {"prompt": "x"})
        assert (call.method, call.path) == ("POST", f"/ai/generation/{kind}/generate-async")
        assert call.json == {"prompt": "x"}


def test_status_and_result_are_shared_and_take_job_id() -> None:
    for kind in JobKind:  # the kind is ignored: the job exists, its id says it all
        status = GENERATION_DIALECT.status_call(kind, "job_1768540311147_4mcdv65c7")
        assert status.describe() == "GET /ai/generation/status?jobId=job_1768540311147_4mcdv65c7"
        result = GENERATION_DIALECT.result_call(kind, "vid_9")
        assert (result.path, dict(result.params)) == ("/ai/generation/result", {"jobId": "vid_9"})
    with pytest.raises(KvidValidationError) as caught:
        GENERATION_DIALECT.status_call(T2V, "../etc")
    assert caught.value.field == "request_id"


def test_the_video_dialect_refuses_reference_to_video_before_any_io() -> None:
    calls = (
        lambda: KVID_DIALECT.generate_call(R2V, {"prompt": "x"}),
        lambda: KVID_DIALECT.status_call(R2V, "req_1"),
        lambda: KVID_DIALECT.result_call(R2V, "req_1"),
    )
    for call in calls:
        with pytest.raises(KvidValidationError) as caught:
            call()
        assert caught.value.field == "job"
        assert "generation dialect" in str(caught.value)


def test_generate_reads_job_id() -> None:
    data = {"job_id": "job_1768540311147_4mcdv65c7", "status": "queued", "estimated_time": "2-5min"}
    assert GENERATION_DIALECT.parse_generate(answer(200, ok(data))) == data["job_id"]
    assert GENERATION_DIALECT.parse_generate(answer(200, ok({"jobId": "vid_1"}))) == "vid_1"
    for bad in ({"request_id": "req_1"}, {"job_id": "../x"}, {"job_id": 7}):
        with pytest.raises(KvidProtocolError, match="job_id"):
            GENERATION_DIALECT.parse_generate(answer(200, ok(bad)))


@pytest.mark.parametrize(
    ("word", "state"),
    [
        ("queued", JobState.RUNNING),
        ("processing", JobState.RUNNING),
        ("pending", JobState.RUNNING),
        ("something_new", JobState.RUNNING),
        ("completed", JobState.COMPLETED),
        ("COMPLETED", JobState.COMPLETED),
        ("failed", JobState.FAILED),
        ("canceled", JobState.CANCELED),
        ("cancelled", JobState.CANCELED),
    ],
)
def test_status_words(word: str, state: JobState) -> None:
    data = {"job_id": "job_1", "status": word, "prompt": "x", "result_url": None}
    status = GENERATION_DIALECT.parse_status(answer(200, ok(data), path="/ai/generation/status"))
    assert status.state is state and status.status == word
    assert status.progress is None and status.logs == ()
    assert status.is_terminal is (state is not JobState.RUNNING)
    assert status.is_completed is (state is JobState.COMPLETED)
    assert status.is_failed is (state is JobState.FAILED)
    assert status.ended_without_video is (state in (JobState.FAILED, JobState.CANCELED))


def test_a_failed_status_gives_its_error_message_as_the_reason() -> None:
    data = {"job_id": "job_1", "status": "failed", "error_message": "content policy: blocked"}
    status = GENERATION_DIALECT.parse_status(answer(200, ok(data, "Job status retrieved")))
    assert status.is_failed and status.reason == "content policy: blocked"
    canceled = ok({"job_id": "job_1", "status": "canceled", "error_message": None}, "Retrieved")
    assert GENERATION_DIALECT.parse_status(answer(200, canceled)).reason is None  # no reason given
    for bad in ({"job_id": "job_1"}, {"status": 3}, {"status": "  "}):
        with pytest.raises(KvidProtocolError, match="status"):
            GENERATION_DIALECT.parse_status(answer(200, ok(bad)))


def test_canceled_is_terminal_without_a_video_and_not_a_failure() -> None:
    canceled = JobStatus("canceled", state=JobState.CANCELED)
    assert canceled.is_terminal and canceled.ended_without_video
    assert not canceled.is_failed and not canceled.is_completed
    assert (
        JobStatus("FAILED").ended_without_video and not JobStatus("COMPLETED").ended_without_video
    )


def test_result_reads_url_geometry_bytes_and_credit() -> None:
    data = {
        "job_id": "job_1",
        "status": "completed",
        "result_url": "https://cdn.kvid.ai/videos/job_1.mp4",
        "width": 1280,
        "height": 720,
        "size": 5242880,
        "type": "text-to-video",
        "used_credit": 54,
    }
    result = GENERATION_DIALECT.parse_result(answer(200, ok(data)))
    assert result == JobResult(
        url="https://cdn.kvid.ai/videos/job_1.mp4",
        name="job_1.mp4",
        size_kb=5120.0,
        width=1280,
        height=720,
        size_bytes=5242880,
        used_credit=54.0,
    )


def test_result_copes_with_file_size_missing_and_odd_figures() -> None:
    base = {"result_url": "https://cdn.kvid.ai/v/a.mp4"}
    by_file_size = GENERATION_DIALECT.parse_result(answer(200, ok({**base, "file_size": 2048})))
    assert (by_file_size.size_bytes, by_file_size.size_kb) == (2048, 2.0)
    bare = GENERATION_DIALECT.parse_result(answer(200, ok(base)))
    assert (bare.width, bare.height, bare.size_bytes, bare.size_kb, bare.used_credit) == (
        (None,) * 5
    )
    odd = {**base, "width": "wide", "height": 0, "size": -1, "used_credit": True}
    shown = GENERATION_DIALECT.parse_result(answer(200, ok(odd)))  # a paid job: never fail on it
    assert (shown.width, shown.height, shown.size_bytes, shown.used_credit) == (None,) * 4
    strings = {**base, "width": "1280", "size": "4096", "used_credit": "12.5"}
    parsed = GENERATION_DIALECT.parse_result(answer(200, ok(strings)))
    assert (parsed.width, parsed.size_bytes, parsed.used_credit) == (1280, 4096, 12.5)


def test_result_without_a_url_is_not_ready_while_running_else_a_protocol_error() -> None:
    running = ok({"job_id": "job_1", "status": "processing", "result_url": None})
    with pytest.raises(KvidNotReadyError):
        GENERATION_DIALECT.parse_result(answer(200, running))
    with pytest.raises(KvidProtocolError, match="result_url"):
        GENERATION_DIALECT.parse_result(answer(200, ok({"status": "completed"})))


def test_the_video_dialect_reports_no_generation_figures() -> None:
    payload = ok({"url": "https://s/v.mp4", "name": "v.mp4", "size": 15420})
    result = KVID_DIALECT.parse_result(answer(200, payload, path="/ai/video/text-to-video/result"))
    assert result.size_kb == 15420
    assert (result.width, result.height, result.size_bytes, result.used_credit) == (None,) * 4


# ---- the error table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "cls", "field"),
    [
        # 400 MISSING_PARAMETERS / INVALID_PARAMETERS: validation, the field named when it can be
        (400, refusal("prompt is required", code="MISSING_PARAMETERS"), KvidValidationError,
         "prompt"),
        (400, refusal("resolution must be 480p, 720p or 1080p", code="INVALID_PARAMETERS"),
         KvidValidationError, "resolution"),
        (400, {"success": False, "error": {"code": "INVALID_PARAMETERS", "field": "seed",
                                           "message": "bad"}}, KvidValidationError, "seed"),
        (400, refusal("negative_prompt is too long"), KvidValidationError, "negative_prompt"),
        (400, refusal("something is off", code="INVALID_PARAMETERS"), KvidValidationError, None),
        # 402: credit, whatever the body
        (402, refusal("Insufficient credit", code="INSUFFICIENT_CREDIT"),
         KvidInsufficientCreditError, None),
        (402, b"<html>Payment Required</html>", KvidInsufficientCreditError, None),
        # 403 (and 401): the api-key
        (403, refusal("Invalid API key"), KvidAuthenticationError, None),
        (401, refusal("no key"), KvidAuthenticationError, None),
        # 404: unknown jobId
        (404, refusal("job not found", code="JOB_NOT_FOUND"), KvidNotFoundError, None),
        (404, b"", KvidNotFoundError, None),
        # result before completion, or of a failed job
        (400, refusal("job is processing", code="JOB_NOT_COMPLETED"), KvidNotReadyError, None),
        # 429: a concurrency slot, or plain rate limiting
        (429, refusal("too many jobs", code="CONCURRENT_LIMIT"), KvidConcurrentLimitError, None),
        (429, refusal("slow down"), KvidRateLimitedError, None),
        (503, refusal("maintenance"), KvidServerError, None),
    ],
)  # fmt: skip
def test_each_row_of_the_error_table(
    status: int, payload: Any, cls: type[KvidError], field: str | None
) -> None:
    error = GENERATION_DIALECT.error_for(answer(status, payload))
    assert type(error) is cls and error.status_code == status
    if isinstance(error, KvidValidationError):
        assert error.field == field
    if isinstance(payload, dict):
        assert error.server_message is not None and error.server_message in str(error)


def test_job_failed_on_result_is_a_job_failure_with_its_id_and_reason() -> None:
    payload = refusal("GPU out of memory", code="JOB_FAILED")
    error = GENERATION_DIALECT.error_for(answer(400, payload, job_id="job_42"))
    assert type(error) is KvidJobFailedError
    assert (error.request_id, error.reason, error.status_code) == (
        "job_42",
        "GPU out of memory",
        400,
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"success": False, "code": "INSUFFICIENT_CREDIT", "message": "no money"},
        {"success": False, "error": {"code": "INSUFFICIENT_CREDIT", "message": "no money"}},
        {"success": False, "error": "INSUFFICIENT_CREDIT", "message": "no money"},
        {"success": False, "data": {"code": "insufficient_credit"}, "message": "no money"},
        {"success": False, "message": "INSUFFICIENT_CREDIT: no money"},
    ],
)
def test_the_code_is_read_wherever_the_server_put_it(payload: dict[str, Any]) -> None:
    error = GENERATION_DIALECT.error_for(answer(400, payload))  # the code decides, not the 400
    assert type(error) is KvidInsufficientCreditError
    assert error.server_message is not None and "no money" in error.server_message


def test_concurrent_limit_carries_retry_after_and_is_a_rate_limit() -> None:
    error = GENERATION_DIALECT.error_for(
        answer(429, refusal("busy", code="CONCURRENT_LIMIT"), headers={"Retry-After": "90"})
    )
    assert isinstance(error, KvidConcurrentLimitError) and isinstance(error, KvidRateLimitedError)
    assert error.retry_after == 90.0


def test_success_is_not_an_error() -> None:
    assert GENERATION_DIALECT.error_for(answer(200, ok({"job_id": "job_1"}))) is None


@pytest.mark.parametrize(
    "error",
    [
        KvidConcurrentLimitError("busy", retry_after=1.0),
        KvidInsufficientCreditError("no credit", status_code=402),
    ],
)
def test_nothing_was_created_so_nothing_is_retried_or_uncertain(error: KvidError) -> None:
    policy = RetryPolicy(max_retries=5)
    for idempotent in (False, True):
        verdict, delay = policy.decide(error, 0, idempotent=idempotent, sent=True)
        assert (verdict, delay) == (RetryVerdict.RAISE, 0.0)
    # a plain 429 on generate is still retried: it is a refusal of this one request
    plain = KvidRateLimitedError("slow down", retry_after=1.0)
    assert policy.decide(plain, 0, idempotent=False, sent=True)[0] is RetryVerdict.RETRY


# ---- requests: bodies and hashes --------------------------------------------------------------


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A real JPEG in a folder of its own (a relative path or a chdir cannot change it)."""
    return Path(shutil.copy(IMAGES_DIR / "tiger.jpg", tmp_path / "in.jpg"))


def test_text_to_video_body_always_says_resolution_and_length() -> None:
    request = GenerationTextToVideo("A woman is drinking coffee.")
    assert request.dialect is ApiDialect.GENERATION and request.job_kind is T2V
    assert request.to_body() == {
        "prompt": "A woman is drinking coffee.",
        "function": "txt2vid",
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "duration": 5,
    }
    with_model = GenerationTextToVideo("x", model="v2", seed=7, negative_prompt="blur").to_body()
    assert (with_model["model"], with_model["seed"], with_model["negative_prompt"]) == (
        "v2",
        7,
        "blur",
    )
    assert None not in with_model.values()  # never null: a field not given is absent


def test_image_to_video_sends_a_url_or_the_file_as_base64(photo: Path) -> None:
    by_url = GenerationImageToVideo("move", URL).to_body()
    assert (by_url["function"], by_url["image_url"], by_url["aspect_ratio"]) == (
        "img2vid",
        URL,
        "auto",
    )
    by_file = GenerationImageToVideo("move", photo)
    body = by_file.to_body()
    assert "image_url" not in body and base64.b64decode(body["image_file"]) == photo.read_bytes()
    assert Path(by_file.image) == photo.absolute()


def test_reference_to_video_body_lists_only_what_is_given() -> None:
    request = GenerationReferenceToVideo("dance", image_urls=[URL], audio_urls=(AUD,))
    assert request.image_urls == (URL,)  # a tuple: the request is frozen and hashable
    assert request.to_body() == {
        "prompt": "dance",
        "function": "ref2vid",
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "duration": 5,
        "image_urls": [URL],
        "audio_urls": [AUD],
        "generate_audio": True,
    }
    assert hash(request) == hash(GenerationReferenceToVideo("dance", image_urls=(URL,),
                                                            audio_urls=[AUD]))  # fmt: skip


def test_the_generation_hash_never_equals_a_video_dialect_hash() -> None:
    for prompt in ("A waterfall", "x"):
        generation = GenerationTextToVideo(prompt).canonical_hash()
        assert generation not in (
            TextToVideoV1(prompt).canonical_hash(),
            TextToVideoV2(prompt).canonical_hash(),
        )
        assert generation == GenerationTextToVideo(prompt).canonical_hash()
    assert GenerationTextToVideo("x", seed=1).canonical_hash() != (
        GenerationTextToVideo("x", seed=2).canonical_hash()
    )


def test_the_hash_counts_a_local_image_by_content_and_ignores_settings(
    tmp_path: Path, photo: Path
) -> None:
    twin = Path(shutil.copy(photo, tmp_path / "twin.jpg"))
    assert GenerationImageToVideo("x", photo).canonical_hash() == (
        GenerationImageToVideo("x", twin).canonical_hash()
    )
    other = Path(shutil.copy(IMAGES_DIR / "salmon_dish.jpg", tmp_path / "in-other.jpg"))
    assert GenerationImageToVideo("x", photo).canonical_hash() != (
        GenerationImageToVideo("x", other).canonical_hash()
    )
    plain = GenerationTextToVideo("x", model="wan")
    extended = GenerationTextToVideo("x", model="wan", extra_models={"acme/model"})
    assert plain == extended and plain.canonical_hash() == extended.canonical_hash()
    assert "extra_models" not in repr(extended)


def test_defaults_are_spelled_out_in_the_hash() -> None:
    assert GenerationTextToVideo("x").canonical_hash() == (
        GenerationTextToVideo("x", resolution="720p", duration=5).canonical_hash()
    )


# ---- requests: the rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field", "fragment"),
    [
        (lambda: GenerationTextToVideo(""), "prompt", "empty"),
        (lambda: GenerationTextToVideo("x", resolution="580p"), "resolution", "480p, 720p, 1080p"),
        (lambda: GenerationTextToVideo("x", aspect_ratio="4:3"), "aspect_ratio", "auto"),
        (lambda: GenerationTextToVideo("x", duration=4), "duration", "5–10"),
        (lambda: GenerationTextToVideo("x", duration=11), "duration", "5–10"),
        (lambda: GenerationTextToVideo("x", duration="5"), "duration", "wrong type"),
        (lambda: GenerationTextToVideo("x", duration="auto"), "duration", "wrong type"),
        (lambda: GenerationTextToVideo("x", seed=True), "seed", "wrong type"),
        (lambda: GenerationTextToVideo("x", model="nope"), "model", "not a generation-dialect"),
        (lambda: GenerationTextToVideo("x", model=""), "model", "not a usable model name"),
        (lambda: GenerationTextToVideo("x", model="bytedance/seedance-2.0/fast/reference-to-video"),
         "model", "not one for job text-to-video"),
        (lambda: GenerationTextToVideo("x", num_frames=81), "num_frames", "v1-family"),
        (lambda: GenerationTextToVideo("x", model="v2", guidance_scale=5.0), "guidance_scale",
         "v1-family"),
        (lambda: GenerationTextToVideo("x", model="seedance", acceleration="high"),
         "acceleration", "v1-family"),
        (lambda: GenerationTextToVideo("x", model="wan", num_frames=81, duration=5), "num_frames",
         "alternative to duration"),
        (lambda: GenerationTextToVideo("x", model="wan", num_frames=120), "num_frames", "81–100"),
        (lambda: GenerationTextToVideo("x", model="wan", shift=float("nan")), "shift",
         "not finite"),
        (lambda: GenerationTextToVideo("x", model="wan", acceleration="max"), "acceleration",
         "regular, high"),
        (lambda: GenerationTextToVideo("x", extra_models="acme"), "extra_models", "wrong type"),
        (lambda: GenerationImageToVideo("x", "ftp://x/y.png"), "image", "forbidden scheme"),
        (lambda: GenerationImageToVideo("x", "/no/such/file.png"), "image", "does not exist"),
        (lambda: GenerationReferenceToVideo("x"), "image_urls", "needs an image or video"),
        (lambda: GenerationReferenceToVideo("x", audio_urls=[AUD]), "audio_urls",
         "needs an image or video reference beside it"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL] * 10), "image_urls",
         "too many"),
        (lambda: GenerationReferenceToVideo("x", video_urls=[VID] * 4), "video_urls", "too many"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL], audio_urls=[AUD] * 4),
         "audio_urls", "too many"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL] * 9, video_urls=[VID] * 3,
                                            audio_urls=[AUD]), "audio_urls", "to 13"),
        (lambda: GenerationReferenceToVideo("x", image_urls=URL), "image_urls", "wrong type"),
        (lambda: GenerationReferenceToVideo("x", image_urls=["file:///etc/passwd"]),
         "image_urls[0]", "forbidden scheme"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL], duration=3), "duration",
         "4–15 or auto"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL], duration=16), "duration",
         "4–15"),
        (lambda: GenerationReferenceToVideo("x", image_urls=[URL], generate_audio="no"),
         "generate_audio", "wrong type"),
    ],
)  # fmt: skip
def test_invalid_requests_name_their_field(make: Any, field: str, fragment: str) -> None:
    with pytest.raises(KvidValidationError) as caught:
        make()
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_what_the_rules_allow() -> None:
    assert GenerationReferenceToVideo("x", image_urls=[URL] * 9, video_urls=[VID] * 3)
    assert GenerationReferenceToVideo("x", video_urls=[VID], audio_urls=[AUD] * 3, duration="auto")
    assert GenerationReferenceToVideo("x", image_urls=[URL], duration=4, generate_audio=False)
    assert GenerationTextToVideo("x", duration=10, resolution="1080p", aspect_ratio="1:1")
    for model in sorted(GENERATION_MODELS - {"bytedance/seedance-2.0/fast/reference-to-video"}):
        assert GenerationTextToVideo("x", model=model).model == model
    wan = GenerationTextToVideo(
        "x",
        model="wan",
        num_frames=100,
        frames_per_second=24,
        num_inference_steps=40,
        guidance_scale=5,
        shift=8,
        enable_safety_checker=False,
        enable_prompt_expansion=True,
        acceleration="regular",
    )
    assert wan.duration is None and "duration" not in wan.to_body()  # num_frames instead
    assert type(wan.guidance_scale) is float
    # a Wan model path is of the v1 family too, once configured
    path = "wan/v2.2-5b/text-to-video"
    assert GenerationTextToVideo("x", model=path, num_frames=81, extra_models=[path]).num_frames


@pytest.mark.parametrize(
    ("request_", "image_size", "expected"),
    [
        (GenerationTextToVideo("x"), None, (1280, 720, 24, 120)),
        (GenerationTextToVideo("x", resolution="480p", aspect_ratio="9:16", duration=10), None,
         (480, 854, 24, 240)),
        (GenerationTextToVideo("x", model="wan", num_frames=81, frames_per_second=16), None,
         (1280, 720, 16, 81)),
        (GenerationImageToVideo("x", URL, resolution="480p"), (1000, 500), (960, 480, 24, 120)),
        (GenerationReferenceToVideo("x", image_urls=[URL], aspect_ratio="auto", duration=4),
         (300, 400), (720, 960, 24, 96)),
    ],
)  # fmt: skip
def test_output_geometry(
    request_: Any, image_size: tuple[int, int] | None, expected: tuple[int, ...]
) -> None:
    assert request_.output_geometry(image_size) == expected


def test_unknowable_geometry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="image_size"):
        GenerationImageToVideo("x", URL).output_geometry()
    with pytest.raises(ValueError, match="auto"):
        GenerationReferenceToVideo("x", image_urls=[URL], duration="auto").output_geometry()


# ---- build_request: the loose front door -------------------------------------------------------


def test_build_request_picks_the_generation_types(photo: Path) -> None:
    gen = ApiDialect.GENERATION
    assert type(build_request("x", dialect="generation")) is GenerationTextToVideo
    assert type(build_request("x", dialect=gen, image=photo)) is GenerationImageToVideo
    assert type(build_request("x", dialect=gen, image_url=URL)) is GenerationImageToVideo
    assert type(build_request("x", dialect=gen, image_urls=URL)) is GenerationReferenceToVideo
    explicit = build_request("x", dialect=gen, job="reference-to-video", video_urls=[VID])
    assert type(explicit) is GenerationReferenceToVideo
    # the video dialect is still the default, and still v1
    assert type(build_request("x")) is TextToVideoV1


@pytest.mark.parametrize(
    "cell",
    [
        [URL, VID],
        (URL, VID),
        np.array([URL, VID]),
        json.dumps([URL, VID]),
        f"{URL}|{VID}",
        f" {URL} | {VID} |",
    ],
)
def test_list_cells_may_be_lists_json_arrays_or_pipes(cell: Any) -> None:
    request = build_request("x", dialect="generation", image_urls=cell)
    assert isinstance(request, GenerationReferenceToVideo) and request.image_urls == (URL, VID)


def test_loose_cells_are_normalised() -> None:
    request = build_request(
        "x",
        dialect="generation",
        model=" wan ",
        duration="",  # blank: the default; num_frames sets the length
        num_frames=81.0,
        frames_per_second="16",
        guidance_scale="4.5",
        enable_safety_checker="FALSE",
        resolution=" 480p ",
        seed=np.int64(7),
        camera_fixed=None,  # the video dialect's column, blank in this row
    )
    assert request == GenerationTextToVideo(
        "x",
        model="wan",
        num_frames=81,
        frames_per_second=16,
        guidance_scale=4.5,
        enable_safety_checker=False,
        resolution="480p",
        seed=7,
    )
    for cell in ("5", 5.0, "10"):  # the video dialect's v2 duration strings
        coerced = build_request("x", dialect="generation", duration=cell)
        assert coerced.duration == int(float(cell))
    auto = build_request("x", dialect="generation", image_urls=URL, duration=" AUTO ")
    assert auto.duration == "auto"


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"camera_fixed": True}, "camera_fixed", "belongs to the video dialect"),
        ({"end_image_url": URL, "image": URL}, "end_image", "video dialect"),
        ({"image_file": "AAAA", "image": URL}, "image_file", "is not a parameter"),
        ({"job": "video-to-video"}, "job", "is not a job kind"),
        ({"job": "image-to-video"}, "image", "required"),
        ({"job": "reference-to-video", "image": URL}, "image", "image_urls"),
        ({"job": "text-to-video", "image_urls": URL}, "image_urls", "is not a parameter"),
        ({"image": URL, "generate_audio": True}, "generate_audio", "belongs to generation "
                                                                   "reference-to-video"),
        ({"image_urls": '["not closed"'}, "image_urls", "not a valid JSON array"),
        ({"image_urls": 5}, "image_urls", "wrong type"),
        ({"model": "acme/custom"}, "model", "add it to the configured models"),
        ({"num_frames": 81}, "num_frames", "v1-family"),
        ({"duration": 7.5}, "duration", "not a whole number"),
        ({"guidance_scale": "strong", "model": "wan"}, "guidance_scale", "wrong type"),
        ({"models": "acme/custom"}, "models", "wrong type"),
    ],
)  # fmt: skip
def test_build_request_errors_name_the_field_and_the_dialect(
    kwargs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(KvidValidationError) as caught:
        build_request("a prompt", dialect="generation", **kwargs)
    assert caught.value.field == field
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_urls": URL}, "image_urls"),
        ({"video_urls": [VID]}, "video_urls"),
        ({"generate_audio": True}, "generate_audio"),
        ({"guidance_scale": 5}, "guidance_scale"),
        ({"acceleration": "high"}, "acceleration"),
        ({"job": "reference-to-video"}, "job"),
        ({"model": "seedance"}, "model"),
    ],
)
def test_the_video_dialect_says_what_belongs_to_the_generation_dialect(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(KvidValidationError) as caught:
        build_request("a prompt", **kwargs)
    assert caught.value.field == field
    assert "generation dialect" in str(caught.value)
    blank = {name: "" for name in ("image_urls", "video_urls", "generate_audio", "shift")}
    assert build_request("a prompt", **blank) == TextToVideoV1("a prompt")  # empty columns


def test_models_extend_the_vocabulary_per_build() -> None:
    request = build_request("x", dialect="generation", model="acme/custom", models=["acme/custom"])
    assert request.model == "acme/custom" and request.to_body()["model"] == "acme/custom"
    assert "acme/custom" not in GENERATION_MODELS  # per build, not global


@pytest.mark.parametrize("dialect", ["video", "generation"])
@pytest.mark.parametrize("name", list(CreditPoolField))
def test_a_credit_pool_column_is_refused_without_showing_its_value(
    dialect: str, name: CreditPoolField
) -> None:
    with pytest.raises(KvidValidationError) as caught:
        build_request("x", dialect=dialect, **{name.value: POOL_VALUE})
    assert caught.value.field == name and "credit_pool" in str(caught.value)
    assert POOL_VALUE not in str(caught.value) and caught.value.value is None


# ---- the credit pool and the client's settings (no I/O) ---------------------------------------


def test_a_credit_pool_hides_its_value() -> None:
    pool = CreditPool.of("product_code", POOL_VALUE)
    assert pool.field is CreditPoolField.PRODUCT_CODE
    assert POOL_VALUE not in repr(pool) and POOL_VALUE not in str(pool)
    assert pool.body_fields() == {"product_code": POOL_VALUE}


@pytest.mark.parametrize(
    ("field", "value"),
    [("account", POOL_VALUE), ("email", ""), ("email", f"{POOL_VALUE} x"), ("email", 5)],
)
def test_a_bad_credit_pool_is_refused_without_echoing_the_value(field: str, value: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        CreditPool.of(field, value)
    assert caught.value.field == "credit_pool" and POOL_VALUE not in str(caught.value)


def test_the_client_takes_a_dialect_by_name_enum_or_object() -> None:
    for dialect, expected in (
        ("generation", GenerationDialect),
        (ApiDialect.GENERATION, GenerationDialect),
        (GENERATION_DIALECT, GenerationDialect),
        (None, KvidDialect),
        ("video", KvidDialect),
    ):
        with KvidClient("k", dialect=dialect) as client:
            assert type(client.dialect) is expected
    with pytest.raises(KvidValidationError) as caught:
        KvidClient("k", dialect="v3")
    assert caught.value.field == "dialect"


def test_a_credit_pool_needs_the_generation_dialect_and_never_shows() -> None:
    with pytest.raises(KvidValidationError) as caught:
        KvidClient("k", credit_pool=("email", POOL_VALUE))
    assert caught.value.field == "credit_pool" and POOL_VALUE not in str(caught.value)
    with pytest.raises(KvidValidationError):
        KvidClient("k", dialect="generation", credit_pool=["email", POOL_VALUE])  # type: ignore[arg-type]
    with KvidClient("k", dialect="generation", credit_pool=("email", POOL_VALUE)) as client:
        assert "credit_pool='email=***'" in repr(client) and POOL_VALUE not in repr(client)


# ---- end to end against the emulator ----------------------------------------------------------


def generation_client(emulator: KvidEmulator, **kwargs: Any) -> KvidClient:
    kwargs.setdefault("sleep", NoSleep())
    return KvidClient("test-key", emulator.base_url, dialect="generation", **kwargs)


def run_job(
    client: KvidClient, request: Any, dest: Path
) -> tuple[str, JobResult, tuple[int, int, int, int]]:
    """generate → wait → result → download, and the decoded video's geometry."""
    job_id = client.generate(request)
    final = client.wait(request.job_kind, job_id, poll_interval=0.05, deadline=60)
    assert final.status == "completed" and final.is_completed
    result = client.result(request.job_kind, job_id)
    downloaded = client.download(result, dest)
    assert downloaded.size_bytes == dest.stat().st_size == result.size_bytes
    assert downloaded.sha256 == hashlib.sha256(dest.read_bytes()).hexdigest()
    return job_id, result, decoded(dest)


def test_text_to_video_end_to_end(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    request = build_request("A slow pan over a harbour", dialect="generation", model="v2",
                            resolution="480p", aspect_ratio="9:16", seed=3)  # fmt: skip
    with generation_client(emulator) as client:
        job_id, result, geometry = run_job(client, request, tmp_path / "t2v.mp4")
    assert geometry == request.output_geometry() == (480, 854, 24, 120)
    assert (result.width, result.height) == geometry[:2]
    info = emulator.jobs[job_id]
    assert result.used_credit == info.used_credit and result.used_credit > 0
    assert info.body == request.to_body()  # exactly what the request says, nothing more
    assert emulator.jobs_created == 1 and emulator.stats["undocumented_field"] == 0


def test_wan_text_to_video_by_frames(emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    request = GenerationTextToVideo("A kite", model="wan", resolution="480p", num_frames=81,
                                    frames_per_second=16, enable_safety_checker=True)  # fmt: skip
    with generation_client(emulator) as client:
        _, _, geometry = run_job(client, request, tmp_path / "wan.mp4")
    assert geometry == request.output_geometry() == (854, 480, 16, 81)


@pytest.mark.parametrize("source", ["url", "file"])
def test_image_to_video_end_to_end(
    emulator_factory: EmulatorFactory, image_server: str, tmp_path: Path, source: str
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    image = f"{image_server}/tiger.jpg" if source == "url" else IMAGES_DIR / "tiger.jpg"
    request = GenerationImageToVideo("The tiger blinks", image, resolution="480p")
    with generation_client(emulator) as client:
        job_id, result, geometry = run_job(client, request, tmp_path / "i2v.mp4")
    assert geometry == request.output_geometry(picture_size(IMAGES_DIR / "tiger.jpg"))
    assert (result.width, result.height) == geometry[:2]
    sent = emulator.jobs[job_id].body
    assert ("image_url" in sent) is (source == "url") and sent["function"] == "img2vid"


def test_reference_to_video_end_to_end(
    emulator_factory: EmulatorFactory, image_server: str, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    first, second = f"{image_server}/pavilion_park.jpg", f"{image_server}/tiger.jpg"
    request = build_request(
        "Two dogs run along the walkway",
        dialect="generation",
        model="bytedance/seedance-2.0/fast/reference-to-video",
        image_urls=f"{first}|{second}",
        audio_urls=json.dumps([f"{image_server}/beat.mp3"]),
        resolution="480p",
        aspect_ratio="auto",
        duration=4,
    )
    with generation_client(emulator) as client:
        job_id, result, geometry = run_job(client, request, tmp_path / "ref.mp4")
    # the emulator renders from the first image reference: "auto" follows it
    assert geometry == request.output_geometry(picture_size(IMAGES_DIR / "pavilion_park.jpg"))
    assert (result.width, result.height) == geometry[:2]
    assert geometry[2:] == (24, 96)
    assert emulator.jobs[job_id].body["image_urls"] == [first, second]


def test_the_async_client_speaks_the_generation_dialect(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    request = GenerationTextToVideo("A lighthouse at dusk", resolution="480p")

    async def main() -> tuple[JobResult, int]:
        async with AsyncKvidClient("test-key", emulator.base_url, dialect="generation") as client:
            job_id = await client.generate(request)
            await client.wait(request.job_kind, job_id, poll_interval=0.05, deadline=60)
            result = await client.result(request.job_kind, job_id)
            downloaded = await client.download(result, tmp_path / "async.mp4")
            return result, downloaded.size_bytes

    result, size = asyncio.run(main())
    assert size == result.size_bytes
    assert decoded(tmp_path / "async.mp4") == request.output_geometry()


@pytest.mark.parametrize(
    ("client_dialect", "request_"),
    [
        ("generation", TextToVideoV1("x")),
        ("video", GenerationTextToVideo("x")),
        ("video", GenerationReferenceToVideo("x", image_urls=[URL])),
    ],
)
def test_a_request_of_the_other_dialect_is_refused_before_any_io(
    emulator: KvidEmulator, client_dialect: str, request_: Any
) -> None:
    client = KvidClient("test-key", emulator.base_url, dialect=client_dialect)
    with client, pytest.raises(KvidValidationError) as caught:
        client.generate(request_)
    assert caught.value.field == "dialect" and client_dialect in str(caught.value)
    assert emulator.stats["generate"] == 0 and emulator.jobs_created == 0


def test_insufficient_credit_is_raised_at_once_and_nothing_is_created(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(fast_config(credit_balance=10))
    sleeps = NoSleep()
    request = GenerationTextToVideo("x", resolution="480p")
    with generation_client(emulator, sleep=sleeps) as client:
        with pytest.raises(KvidInsufficientCreditError) as caught:
            client.generate(request)
        assert caught.value.status_code == 402
        assert not isinstance(caught.value, KvidUncertainSubmissionError)
        assert emulator.stats["generate"] == 1 and sleeps == []  # one request, no retry
        assert emulator.jobs_created == 0 and emulator.stats["insufficient_credit"] == 1
        emulator.add_credits(1000)
        assert client.generate(request).startswith("job_")
    assert emulator.jobs_created == 1


def test_the_concurrent_limit_is_raised_at_once_and_the_queue_goes_on(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(fast_config(concurrent_limit=1, job_duration=1.0))
    sleeps = NoSleep()
    request = GenerationTextToVideo("x", resolution="480p")
    with generation_client(emulator, sleep=sleeps) as client:
        first = client.generate(request)
        with pytest.raises(KvidConcurrentLimitError) as caught:
            client.generate(GenerationTextToVideo("y", resolution="480p"))
        assert caught.value.status_code == 429 and sleeps == []
        assert emulator.stats["generate"] == 2 and emulator.jobs_created == 1
        assert emulator.stats["concurrent_limit"] == 1
        client.wait(T2V, first, poll_interval=0.05, deadline=60)  # the slot frees
        assert client.generate(GenerationTextToVideo("y", resolution="480p")).startswith("job_")
    assert emulator.jobs_created == 2


def test_a_canceled_job_ends_the_wait_and_has_no_result(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fast_config(job_duration=30.0))
    with generation_client(emulator) as client:
        job_id = client.generate(GenerationTextToVideo("x", resolution="480p"))
        emulator.cancel_job(job_id)
        status = client.status(T2V, job_id)
        assert status.state is JobState.CANCELED and status.ended_without_video
        assert not status.is_failed
        with pytest.raises(KvidJobFailedError, match="canceled"):
            client.wait(T2V, job_id, poll_interval=0.05, deadline=10)
        with pytest.raises(KvidNotReadyError):
            client.result(T2V, job_id)
    assert emulator.stats["generate"] == 1


def test_a_failed_job_gives_its_reason_to_wait_and_result(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory()
    with generation_client(emulator) as client:
        job_id = client.generate(GenerationTextToVideo(f"x {FAIL_MARKER}", resolution="480p"))
        with pytest.raises(KvidJobFailedError) as waited:
            client.wait(T2V, job_id, poll_interval=0.05, deadline=30)
        assert waited.value.reason and waited.value.request_id == job_id
        with pytest.raises(KvidJobFailedError) as fetched:
            client.result(I2V, job_id)  # the kind does not matter to shared endpoints
        assert fetched.value.request_id == job_id and fetched.value.status_code == 400
        assert waited.value.reason in fetched.value.reason


def test_not_ready_unknown_and_unauthorised(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fast_config(job_duration=30.0))
    with generation_client(emulator) as client:
        job_id = client.generate(GenerationTextToVideo("x", resolution="480p"))
        with pytest.raises(KvidNotReadyError):
            client.result(T2V, job_id)
        with pytest.raises(KvidNotFoundError):
            client.status(T2V, "job_0_unknown")
    with KvidClient("wrong-key", emulator.base_url, dialect="generation") as client:
        with pytest.raises(KvidAuthenticationError) as caught:
            client.status(T2V, job_id)
        assert caught.value.status_code == 403


def test_a_server_refusal_names_the_field_and_creates_nothing(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory()
    request = GenerationTextToVideo("x", model="acme/custom", extra_models={"acme/custom"})
    with generation_client(emulator) as client, pytest.raises(KvidValidationError) as caught:
        client.generate(request)  # valid to the client as configured, not to the server
    assert caught.value.field == "model" and caught.value.status_code == 400
    assert emulator.stats["generate"] == 1 and emulator.jobs_created == 0


def test_the_credit_pool_is_sent_and_shown_nowhere(
    emulator_factory: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True, echo_request_in_failures=True))
    pool = ("product_code", POOL_VALUE)
    request = GenerationTextToVideo(f"x {FAIL_MARKER}", resolution="480p")
    caplog.set_level(logging.DEBUG)
    with generation_client(emulator, credit_pool=pool) as client:
        job_id = client.generate(request)
        assert emulator.jobs[job_id].body == {**request.to_body(), "product_code": POOL_VALUE}
        assert request.to_body().get("product_code") is None  # not part of the request
        with pytest.raises(KvidJobFailedError) as failed:
            client.wait(T2V, job_id, poll_interval=0.05, deadline=30)
        status = client.status(T2V, job_id)
        emulator.add_fault("generate", "reset", after_create=True)
        with pytest.raises(KvidUncertainSubmissionError) as uncertain:
            client.generate(GenerationTextToVideo("y", resolution="480p"))
    assert emulator.stats["undocumented_field"] == 0
    echoed = status.message or ""
    assert "***" in echoed and "product_code" in echoed  # the server echoed it; we did not
    shown = [str(failed.value), failed.value.reason, echoed, str(uncertain.value),
             json.dumps(uncertain.value.body), caplog.text]  # fmt: skip
    assert not [text for text in shown if POOL_VALUE in text]
    assert "product_code" not in uncertain.value.body


@pytest.mark.parametrize("kind", [T2V, I2V, R2V])
def test_status_and_result_ignore_the_job_kind(emulator: KvidEmulator, kind: JobKind) -> None:
    with generation_client(emulator) as client:
        job_id = client.generate(GenerationTextToVideo("x", resolution="480p"))
        assert client.wait(kind, job_id, poll_interval=0.05, deadline=60).is_completed
        assert client.result(kind, job_id).url.endswith(".mp4")
    assert emulator.stats["status"] >= 1 and emulator.stats["result"] == 1
