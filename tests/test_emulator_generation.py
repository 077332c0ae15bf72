"""The emulator's generation dialect (the vendor's current English page) against plain httpx.

Every test talks to a real server on 127.0.0.1: generate-async, status and result by jobId, the
page's error table, the money knobs (credit balance, concurrency limit, cancel) counted at the
emulator, strict mode, faults and rough edges, and both dialects served at once. Videos are
downloaded and decoded with PyAV; renders are kept at 480p and 4 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT, EmulatorFactory, fast_config
from test_emulator import SMALL_T2V, download, image_b64, load_image, make_client, probe
from test_emulator import generate as generate_video

from kvid_dagster.emulator import (
    FAIL_MARKER,
    EmulatedDialect,
    EmulatorConfig,
    ErrorCode,
    KvidEmulator,
)

T2V, I2V, R2V = "text-to-video", "image-to-video", "reference-to-video"
REF_MODEL = "bytedance/seedance-2.0/fast/reference-to-video"
JOB_ID = re.compile(r"job_\d{13}_[0-9a-z]{9}")
CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
STATUS_KEYS = {
    *("job_id", "status", "prompt", "result_url", "error_message", "video_type", "created_at"),
}
RESULT_KEYS = {
    *("job_id", "status", "result_url", "width", "height", "size", "file_size"),
    *("type", "used_credit", "created_at", "prompt"),
}
MISSING, INVALID = ErrorCode.MISSING_PARAMETERS, ErrorCode.INVALID_PARAMETERS
SMALL = {"prompt": "A waterfall in a forest", "resolution": "480p", "duration": 4}
URL = "http://h.example/a.png"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def client(emulator: KvidEmulator) -> Iterator[httpx.Client]:
    with make_client(emulator) as c:
        yield c


def post(client: httpx.Client, kind: str, body: Any) -> httpx.Response:
    return client.post(f"/ai/generation/{kind}/generate-async", json=body)


def generate(client: httpx.Client, kind: str, body: dict[str, Any]) -> str:
    """A generate-async that must be accepted; checks the page's answer and returns the id."""
    response = post(client, kind, body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["success"] is True
    data = payload["data"]
    assert set(data) == {"job_id", "status", "message", "estimated_time", "video_type"}
    assert JOB_ID.fullmatch(data["job_id"]), data["job_id"]
    assert (data["status"], data["video_type"]) == ("queued", kind)
    assert re.fullmatch(r"\d+s", data["estimated_time"])
    return str(data["job_id"])


def status(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get("/ai/generation/status", params={"jobId": job_id})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["success"] is True
    data: dict[str, Any] = payload["data"]
    assert set(data) == STATUS_KEYS  # no progress, no logs: the page has neither
    assert CREATED_AT.fullmatch(data["created_at"])
    return data


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll status until completed, failed or canceled; before that only queued/processing,
    with no result_url and no error_message."""
    deadline = time.monotonic() + timeout
    while True:
        data = status(client, job_id)
        if data["status"] in ("completed", "failed", "canceled"):
            return data
        assert data["status"] in ("queued", "processing"), data
        assert data["result_url"] is None and data["error_message"] is None
        assert time.monotonic() < deadline, f"{job_id} still {data['status']}"
        time.sleep(0.05)


def result(client: httpx.Client, job_id: str) -> httpx.Response:
    return client.get("/ai/generation/result", params={"jobId": job_id})


def refused(response: httpx.Response, http_status: int, code: ErrorCode | None) -> str:
    """An error as this emulator answers one: the envelope with the code beside it (none for
    a 403); returns the message."""
    assert response.status_code == http_status, response.text
    payload = response.json()
    assert payload["success"] is False and payload["data"] is None
    assert payload.get("code") == (code.value if code is not None else None)
    return str(payload["message"])


def names(message: str, field: str) -> bool:
    """Whether a 400's message names ``field`` (each problem is "field: ...; allowed: ...")."""
    return message.startswith(f"{field}: ") or f"; {field}: " in message


def video(path: Path) -> tuple[int, int, Fraction, int]:
    """(width, height, fps, frames) of an H.264 yuv420p MP4, read back with PyAV."""
    width, height, fps, frames, codec, pixels = probe(path)
    assert (codec, pixels) == ("h264", "yuv420p")
    return width, height, fps, frames


def rule_size(short: int, ratio: Fraction) -> tuple[int, int]:
    """The contract's geometry: short side = resolution, long side by ratio, rounded even."""
    long = int(short * max(ratio, 1 / ratio) / 2 + Fraction(1, 2)) * 2
    return (long, short) if ratio >= 1 else (short, long)


def fetch_video(client: httpx.Client, job_id: str, dest: Path) -> tuple[dict[str, Any], Path]:
    """Wait for completed, fetch the result and its file; check the result's fields."""
    done = wait_terminal(client, job_id)
    assert done["status"] == "completed", done
    assert done["result_url"] and done["error_message"] is None
    response = result(client, job_id)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert set(data) == RESULT_KEYS
    assert (data["job_id"], data["status"], data["prompt"]) == (job_id, "completed", done["prompt"])
    assert data["created_at"] == done["created_at"] and CREATED_AT.fullmatch(data["created_at"])
    assert data["type"] == done["video_type"]
    video = httpx.get(data["result_url"], timeout=30)  # storage: no api-key needed
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert data["size"] == data["file_size"] == len(video.content)  # bytes, not KB
    path = dest / f"{job_id}.mp4"
    path.write_bytes(video.content)
    return data, path


# --- every job kind, end to end --------------------------------------------------------------

E2E_CASES = [
    # (id, kind, body, image placeholders in it, expected (w, h) or an image name for "auto",
    #  fps, frames, used_credit)
    (
        "t2v-seedance-9:16",
        T2V,
        {**SMALL, "model": "seedance", "function": "txt2vid", "aspect_ratio": "9:16", "seed": 1},
        (480, 854),
        24,
        96,
        32,  # seedance 480p: 39 per 5 s -> 39 * 4 / 5 = 31.2 -> 32
    ),
    (
        "t2v-wan-frames",  # a v1-family model takes num_frames / frames_per_second
        T2V,
        {"prompt": "A waterfall", "model": "v1", "num_frames": 81, "frames_per_second": 16},
        (854, 480),  # no resolution: 480p, and text-to-video's default 16:9
        16,
        81,
        60,  # one base clip at wan 480p
    ),
    (
        "t2v-veo-ignores-v1-fields",  # ...any other model ignores them: 24 fps x 4 s
        T2V,
        {**SMALL, "model": "veo3.1", "frames_per_second": 16, "aspect_ratio": "1:1"},
        (480, 480),
        24,
        96,
        120,  # veo 480p: 150 per 5 s
    ),
    (
        "i2v-url-auto",
        I2V,
        {**SMALL, "model": "v2", "function": "img2vid", "image_url": "tiger.jpg"},
        "tiger.jpg",
        24,
        96,
        32,
    ),
    (
        "i2v-file-16:9",
        I2V,
        {**SMALL, "model": "wan", "image_file": "salmon_dish.jpg", "aspect_ratio": "16:9"},
        (854, 480),
        24,
        96,
        48,  # wan 480p: 60 * 4 / 5
    ),
    (
        "r2v-first-image",  # rendered from the first image reference, whose ratio auto takes
        R2V,
        {
            **SMALL,
            "model": REF_MODEL,
            "function": "ref2vid",
            "image_urls": ["pavilion_park.jpg", "tiger.jpg"],
            "video_urls": [],
            "audio_urls": ["https://h.example/voice.mp3"],  # never fetched
            "aspect_ratio": "auto",
            "generate_audio": True,
        },
        "pavilion_park.jpg",
        24,
        96,
        32,
    ),
]


@pytest.mark.parametrize(
    ("kind", "body", "size", "fps", "frames", "credit"),
    [case[1:] for case in E2E_CASES],
    ids=[case[0] for case in E2E_CASES],
)
def test_every_job_kind_end_to_end(
    emulator_factory: EmulatorFactory,
    image_server: str,
    tmp_path: Path,
    kind: str,
    body: dict[str, Any],
    size: tuple[int, int] | str,
    fps: int,
    frames: int,
    credit: int,
) -> None:
    emulator = emulator_factory(fast_config(job_duration=0.5))
    body = dict(body)
    if "image_url" in body:
        body["image_url"] = f"{image_server}/{body['image_url']}"
    if "image_file" in body:
        body["image_file"] = image_b64(body["image_file"])
    if "image_urls" in body:
        body["image_urls"] = [f"{image_server}/{name}" for name in body["image_urls"]]
    if isinstance(size, str):  # aspect_ratio auto: the input image's ratio, at 480p
        height, width = load_image(size).shape[:2]
        size = rule_size(480, Fraction(width, height))
    with make_client(emulator) as client:
        job_id = generate(client, kind, body)
        info = emulator.jobs[job_id]
        assert (info.dialect, info.kind, info.used_credit) == (
            EmulatedDialect.GENERATION,
            kind,
            credit,
        )
        data, path = fetch_video(client, job_id, tmp_path)
    assert (data["width"], data["height"]) == size
    assert data["used_credit"] == credit
    assert video(path) == (*size, Fraction(fps), frames)
    assert emulator.jobs[job_id].state == "completed"
    assert emulator.jobs_created == 1 and emulator.stats[("generate", 200)] == 1


def test_reference_to_video_from_a_video_renders_its_first_frame(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(job_duration=0.3))
    with make_client(emulator) as client:
        portrait = generate(client, T2V, {**SMALL, "aspect_ratio": "9:16"})
        source = fetch_video(client, portrait, tmp_path)[0]["result_url"]
        body = {**SMALL, "video_urls": [source], "audio_urls": [URL], "aspect_ratio": "auto"}
        job_id = generate(client, R2V, body)
        data, path = fetch_video(client, job_id, tmp_path)
    assert (data["width"], data["height"]) == (480, 854)  # auto: the video's 9:16 frame
    assert video(path) == (480, 854, Fraction(24), 96)


def test_duration_auto_and_the_range_ends_are_accepted(
    client: httpx.Client, emulator: KvidEmulator, image_server: str
) -> None:
    url = f"{image_server}/tiger.jpg"
    refs = {"image_urls": [url] * 9, "video_urls": [url] * 2, "audio_urls": [URL]}  # 12 in all
    generate(client, R2V, {"prompt": "x", **refs, "duration": "auto"})  # priced as 5 s
    generate(client, R2V, {"prompt": "x", "video_urls": [url] * 3, "duration": 15})
    generate(client, T2V, {"prompt": "x", "duration": 4, "seed": 0, "email": "me@example.com"})
    generate(client, I2V, {"prompt": "x", "image_url": url, "product_code": "p", "shift": 1.5})
    assert emulator.jobs_created == 4  # wan (the default) at 480p (the default): 60 per 5 s
    assert sorted(info.used_credit or 0 for info in emulator.jobs.values()) == [48, 60, 60, 180]


# --- the error table -------------------------------------------------------------------------

B64 = image_b64("tiger.jpg")
BAD_BODIES = [
    # (id, kind, body, code, the field the message names)
    ("no-prompt", T2V, {"resolution": "480p"}, MISSING, "prompt"),
    ("blank-prompt", T2V, {"prompt": "  "}, MISSING, "prompt"),
    ("i2v-no-image", I2V, {"prompt": "x"}, MISSING, "image_url"),
    ("i2v-blank-image", I2V, {"prompt": "x", "image_url": ""}, MISSING, "image_url"),
    ("r2v-no-reference", R2V, {"prompt": "x", "image_urls": []}, MISSING, "image_urls"),
    ("resolution", T2V, {"prompt": "x", "resolution": "580p"}, INVALID, "resolution"),
    ("unknown-model", T2V, {"prompt": "x", "model": "sora"}, INVALID, "model"),
    ("model-of-another-kind", T2V, {"prompt": "x", "model": REF_MODEL}, INVALID, "model"),
    (
        "function",
        I2V,
        {"prompt": "x", "function": "txt2vid", "image_url": URL},
        INVALID,
        "function",
    ),
    ("duration-short", T2V, {"prompt": "x", "duration": 3}, INVALID, "duration"),
    ("duration-string", T2V, {"prompt": "x", "duration": "5"}, INVALID, "duration"),
    ("duration-auto-t2v", T2V, {"prompt": "x", "duration": "auto"}, INVALID, "duration"),
    (
        "r2v-duration-long",
        R2V,
        {"prompt": "x", "image_urls": [URL], "duration": 16},
        INVALID,
        "duration",
    ),
    ("null-seed", T2V, {"prompt": "x", "seed": None}, INVALID, "seed"),
    ("bool-seed", T2V, {"prompt": "x", "seed": True}, INVALID, "seed"),
    ("aspect-ratio", T2V, {"prompt": "x", "aspect_ratio": "4:3"}, INVALID, "aspect_ratio"),
    ("negative-prompt", T2V, {"prompt": "x", "negative_prompt": 1}, INVALID, "negative_prompt"),
    (
        "two-credit-pools",
        T2V,
        {"prompt": "x", "product_id": "pdt_1", "email": "a@b.c"},
        INVALID,
        "email",
    ),
    (
        "frames-and-duration",
        T2V,
        {"prompt": "x", "model": "wan", "num_frames": 81, "duration": 5},
        INVALID,
        "num_frames",
    ),
    ("fps-range", T2V, {"prompt": "x", "frames_per_second": 30}, INVALID, "frames_per_second"),
    ("steps", T2V, {"prompt": "x", "num_inference_steps": 0}, INVALID, "num_inference_steps"),
    ("guidance", T2V, {"prompt": "x", "guidance_scale": "high"}, INVALID, "guidance_scale"),
    ("acceleration", T2V, {"prompt": "x", "acceleration": "turbo"}, INVALID, "acceleration"),
    ("safety", T2V, {"prompt": "x", "enable_safety_checker": 1}, INVALID, "enable_safety_checker"),
    (
        "i2v-both-images",
        I2V,
        {"prompt": "x", "image_url": URL, "image_file": B64},
        INVALID,
        "image_file",
    ),
    ("i2v-ftp", I2V, {"prompt": "x", "image_url": "ftp://h/x.jpg"}, INVALID, "image_url"),
    ("i2v-bad-base64", I2V, {"prompt": "x", "image_file": "not base64!!"}, INVALID, "image_file"),
    ("r2v-10-images", R2V, {"prompt": "x", "image_urls": [URL] * 10}, INVALID, "image_urls"),
    ("r2v-4-videos", R2V, {"prompt": "x", "video_urls": [URL] * 4}, INVALID, "video_urls"),
    (
        "r2v-4-audio",
        R2V,
        {"prompt": "x", "image_urls": [URL], "audio_urls": [URL] * 4},
        INVALID,
        "audio_urls",
    ),
    (
        "r2v-13-in-all",
        R2V,
        {"prompt": "x", "image_urls": [URL] * 9, "video_urls": [URL] * 3, "audio_urls": [URL]},
        INVALID,
        "image_urls",
    ),
    ("r2v-audio-alone", R2V, {"prompt": "x", "audio_urls": [URL]}, INVALID, "image_urls"),
    ("r2v-not-a-list", R2V, {"prompt": "x", "image_urls": URL}, INVALID, "image_urls"),
    (
        "r2v-bad-entry",
        R2V,
        {"prompt": "x", "image_urls": [URL, "file:///etc/passwd"]},
        INVALID,
        "image_urls[1]",
    ),
    (
        "r2v-audio-flag",
        R2V,
        {"prompt": "x", "image_urls": [URL], "generate_audio": "yes"},
        INVALID,
        "generate_audio",
    ),
    ("body-not-object", T2V, ["prompt"], INVALID, "body"),
]


@pytest.mark.parametrize(
    ("kind", "body", "code", "field"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_400_names_the_field_and_creates_nothing(
    emulator: KvidEmulator,
    client: httpx.Client,
    kind: str,
    body: Any,
    code: ErrorCode,
    field: str,
) -> None:
    message = refused(post(client, kind, body), 400, code)
    assert names(message, field), message
    assert "allowed:" in message
    assert emulator.jobs_created == 0 and emulator.stats[("generate", 400)] == 1


def test_400_for_a_body_that_is_not_json_or_absent(client: httpx.Client) -> None:
    path = f"/ai/generation/{T2V}/generate-async"
    headers = {"Content-Type": "application/json"}
    assert names(
        refused(client.post(path, content=b"{not json", headers=headers), 400, INVALID), "body"
    )
    assert names(refused(client.post(path, content=b"", headers=headers), 400, MISSING), "body")


def test_403_for_a_missing_or_wrong_key_while_the_video_dialect_keeps_its_401(
    emulator: KvidEmulator,
) -> None:
    for key in (None, "", "wrong-key"):
        with make_client(emulator, key) as client:
            refused(post(client, T2V, SMALL), 403, None)
            refused(client.get("/ai/generation/status", params={"jobId": "job_1"}), 403, None)
            refused(client.get("/ai/generation/result", params={"jobId": "job_1"}), 403, None)
            video = client.post(f"/ai/video/{T2V}/generate", json={"prompt": "x"})
            assert video.status_code == 401 and "code" not in video.json()
    assert emulator.jobs_created == 0


def test_404_job_not_found_and_each_dialect_knows_only_its_own_jobs(
    client: httpx.Client,
) -> None:
    for endpoint in ("status", "result"):
        path = f"/ai/generation/{endpoint}"
        message = refused(
            client.get(path, params={"jobId": "job_0_000000000"}), 404, ErrorCode.JOB_NOT_FOUND
        )
        assert "job_0_000000000" in message
        assert names(refused(client.get(path), 400, MISSING), "jobId")
    request_id = generate_video(client, T2V, SMALL_T2V)
    job_id = generate(client, T2V, SMALL)
    wrong = client.get("/ai/generation/status", params={"jobId": request_id})
    refused(wrong, 404, ErrorCode.JOB_NOT_FOUND)
    other = client.get(f"/ai/video/{T2V}/status", params={"request_id": job_id})
    assert other.status_code == 404 and "code" not in other.json()


def test_the_plain_rate_limit_answers_429_with_retry_after_and_no_code(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(rate_limit=2.0)
    with make_client(emulator) as client:
        answers = [client.get("/ai/generation/status", params={"jobId": "job_x"}) for _ in range(6)]
    limited = [r for r in answers if r.status_code == 429]
    assert [r.status_code for r in answers[:2]] == [404, 404] and len(limited) >= 3
    for response in limited:
        assert int(response.headers["retry-after"]) >= 1
        assert "code" not in response.json()  # not CONCURRENT_LIMIT: a plain rate limit


def test_job_not_completed_before_completion_and_job_failed_after_a_failure(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(fast_config(job_duration=1.5, workers=1))
    with make_client(emulator) as client:
        running = generate(client, T2V, SMALL)
        queued = generate(client, T2V, {**SMALL, "prompt": "behind the first"})
        assert status(client, queued)["status"] == "queued"
        for job_id, word in ((queued, "queued"), (running, "processing")):
            message = refused(result(client, job_id), 400, ErrorCode.JOB_NOT_COMPLETED)
            assert f"{job_id} is {word}" in message and "poll status" in message
        failing = generate(client, T2V, {**SMALL, "prompt": f"a storm {FAIL_MARKER}"})
        done = wait_terminal(client, failing)
        assert done["status"] == "failed" and done["result_url"] is None
        assert FAIL_MARKER in done["error_message"]
        message = refused(result(client, failing), 400, ErrorCode.JOB_FAILED)
        assert done["error_message"] in message
        assert emulator.jobs[failing].state == "failed"
    assert emulator.stats[("result", 400)] == 3


# --- money: credit, concurrency, cancel -------------------------------------------------------


def test_402_creates_no_job_until_credits_are_added(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fast_config(credit_balance=70, reuse_renders=True))
    body = {**SMALL, "model": "seedance", "duration": 5}  # 39 credits
    with make_client(emulator) as client:
        first = generate(client, T2V, body)
        assert emulator.credit_balance == 31
        message = refused(post(client, T2V, body), 402, ErrorCode.INSUFFICIENT_CREDIT)
        assert "39" in message and "31" in message
        assert emulator.jobs_created == 1 and set(emulator.jobs) == {first}
        assert emulator.stats["insufficient_credit"] == 1 and emulator.credit_balance == 31
        generate_video(client, T2V, SMALL_T2V)  # the video dialect is not metered
        emulator.add_credits(8)
        second = generate(client, T2V, body)
        assert emulator.credit_balance == 0 and emulator.jobs_created == 3
        assert wait_terminal(client, second)["status"] == "completed"
        assert result(client, second).json()["data"]["used_credit"] == 39
    with pytest.raises(ValueError, match="unlimited"):
        emulator_factory().add_credits(1)


def test_concurrent_limit_creates_no_job_and_accepts_again_once_one_finishes(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(
        fast_config(concurrent_limit=1, job_duration=1.0, reuse_renders=True)
    )
    with make_client(emulator) as client:
        first = generate(client, T2V, SMALL)
        response = post(client, T2V, SMALL)
        message = refused(response, 429, ErrorCode.CONCURRENT_LIMIT)
        assert "1 queued or processing" in message and "retry-after" not in response.headers
        assert emulator.jobs_created == 1 and emulator.stats["concurrent_limit"] == 1
        generate_video(client, T2V, SMALL_T2V)  # video-dialect jobs do not count
        assert wait_terminal(client, first)["status"] == "completed"
        second = generate(client, T2V, SMALL)
        refused(post(client, T2V, SMALL), 429, ErrorCode.CONCURRENT_LIMIT)
        emulator.cancel_job(second)  # a canceled job frees its slot at once
        generate(client, T2V, SMALL)
    assert emulator.jobs_created == 4 and emulator.stats["concurrent_limit"] == 2


def test_canceled_is_terminal_without_a_video(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fast_config(job_duration=0.8, workers=1))
    with make_client(emulator) as client:
        running = generate(client, T2V, SMALL)
        queued = generate(client, T2V, SMALL)
        emulator.cancel_job(queued)
        emulator.cancel_job(running)
        for job_id in (queued, running):
            data = wait_terminal(client, job_id)
            assert data["status"] == "canceled"
            assert data["result_url"] is None and data["error_message"] is None
            message = refused(result(client, job_id), 400, ErrorCode.JOB_NOT_COMPLETED)
            assert "canceled" in message and "poll status" not in message
            assert emulator.jobs[job_id].state == "canceled"
        time.sleep(1.0)  # past the end the clock had booked: still canceled
        assert status(client, running)["status"] == "canceled"
        done = generate(client, T2V, SMALL)
        assert wait_terminal(client, done)["status"] == "completed"
        with pytest.raises(ValueError, match="already ended"):
            emulator.cancel_job(done)
        with pytest.raises(ValueError, match="already ended"):
            emulator.cancel_job(running)
        request_id = generate_video(client, T2V, SMALL_T2V)
        with pytest.raises(ValueError, match="video-dialect"):
            emulator.cancel_job(request_id)
        with pytest.raises(KeyError):
            emulator.cancel_job("job_0_000000000")
    assert emulator.stats["canceled"] == 2


# --- strict mode -------------------------------------------------------------------------------


def test_strict_mode_refuses_an_undocumented_field_and_names_it(
    emulator_factory: EmulatorFactory, image_server: str
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True, reuse_renders=True))
    with make_client(emulator) as client:
        for kind, body, field in (
            (T2V, {**SMALL, "camera_fixed": False}, "camera_fixed"),  # the video dialect's v2
            (T2V, {**SMALL, "image_url": URL}, "image_url"),  # another endpoint's field
            (I2V, {**SMALL, "image_url": URL, "end_image_url": URL}, "end_image_url"),
            (R2V, {**SMALL, "image_urls": [URL], "request_id": "req_1"}, "request_id"),
        ):
            message = refused(post(client, kind, body), 400, INVALID)
            assert names(message, field) and f"not a documented {kind} field" in message
        assert emulator.jobs_created == 0 and emulator.stats["undocumented_field"] == 4
        # every field the page lists is accepted, model-dependent ones included
        documented = {
            **SMALL,
            "product_id": "pdt_1",
            "model": "wan",
            "function": "ref2vid",
            "negative_prompt": "blur",
            "aspect_ratio": "auto",
            "seed": 5834,
            "frames_per_second": 16,
            "num_inference_steps": 30,
            "guidance_scale": 5,
            "shift": 8.0,
            "enable_safety_checker": True,
            "enable_prompt_expansion": False,
            "acceleration": "regular",
            "image_urls": [f"{image_server}/tiger.jpg"],
            "video_urls": [],
            "audio_urls": [],
            "generate_audio": False,
        }
        generate(client, R2V, documented)
    assert emulator.stats["undocumented_field"] == 4


def test_without_strict_mode_an_undocumented_field_is_ignored_and_counted(
    emulator: KvidEmulator, client: httpx.Client
) -> None:
    job_id = generate(client, T2V, {**SMALL, "camera_fixed": True, "end_image_url": 7})
    assert emulator.stats["undocumented_field"] == 2
    assert emulator.jobs[job_id].body["camera_fixed"] is True  # as sent
    assert wait_terminal(client, job_id)["status"] == "completed"


# --- both dialects at once ---------------------------------------------------------------------


def test_both_dialects_are_served_at_once_on_one_engine(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(job_duration=0.5, workers=2))
    with make_client(emulator) as client:
        request_id = generate_video(client, T2V, SMALL_T2V)
        job_id = generate(client, T2V, {**SMALL, "prompt": "A lake at dusk"})
        jobs = emulator.jobs
        assert {jobs[request_id].dialect, jobs[job_id].dialect} == set(EmulatedDialect)
        assert jobs[request_id].state in ("IN_QUEUE", "PROCESSING")
        assert jobs[job_id].state in ("queued", "processing")
        generation, path = fetch_video(client, job_id, tmp_path)
        old_path = download(client, T2V, request_id, tmp_path)[1]  # it checks the KB size
    assert video(old_path) == (854, 480, Fraction(16), 81)  # v1: 81 frames at 16 fps
    assert video(path) == (854, 480, Fraction(24), 96)
    assert generation["size"] == path.stat().st_size  # bytes here
    assert emulator.jobs_created == 2 and emulator.stats["generate"] == 2
    assert {info.state for info in emulator.jobs.values()} == {"COMPLETED", "completed"}


# --- faults and rough edges ------------------------------------------------------------------


def test_faults_target_generation_requests_by_prompt_and_job_id(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(fast_config(credit_balance=200, reuse_renders=True))
    emulator.add_fault("generate", "500", match="doomed")
    emulator.add_fault("generate", "timeout", match="slow", delay=1.0)
    with make_client(emulator) as client:
        assert post(client, T2V, {**SMALL, "prompt": "doomed"}).status_code == 500
        assert emulator.jobs_created == 0 and emulator.credit_balance == 200  # nothing created
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                f"/ai/generation/{T2V}/generate-async",
                json={**SMALL, "prompt": "slow"},
                timeout=0.3,
            )
        assert emulator.wait_for_jobs(1, timeout=5)
        assert emulator.credit_balance == 152  # paid (wan 480p 4 s), though the answer was lost
        job_id = generate(client, T2V, SMALL)
        emulator.add_fault("status", "503", match=job_id, retry_after=2)
        other = generate(client, T2V, SMALL)
        assert status(client, other)["job_id"] == other  # another id passes the fault by
        hit = client.get("/ai/generation/status", params={"jobId": job_id})
        assert hit.status_code == 503 and hit.headers["retry-after"] == "2"
        assert status(client, job_id)["job_id"] == job_id and emulator.pending_faults() == []


def test_realistic_edges_apply_to_the_generation_dialect(emulator_factory: EmulatorFactory) -> None:
    # windows of seconds, so that a loaded machine's pauses do not end them early
    config = fast_config(realistic=True, fresh_404_s=2.0, result_url_ttl_s=3.0)
    emulator = emulator_factory(config)
    with make_client(emulator) as client:
        job_id = generate(client, T2V, SMALL)
        fresh = client.get("/ai/generation/status", params={"jobId": job_id})
        refused(fresh, 404, ErrorCode.JOB_NOT_FOUND)  # the read replica lags
        time.sleep(2.0)
        done = wait_terminal(client, job_id)
        url = done["result_url"]
        assert url.startswith(f"{emulator.storage_url}/videos/{job_id}.mp4?")
        assert httpx.get(url, timeout=30).content[4:8] == b"ftyp"
        time.sleep(3.2)
        assert httpx.get(url).status_code == 403  # an expired presigned URL
        fresh_url = result(client, job_id).json()["data"]["result_url"]
        assert fresh_url != url and httpx.get(fresh_url, timeout=30).status_code == 200
        failing = generate(client, T2V, {**SMALL, "prompt": f"x {FAIL_MARKER}", "seed": 3})
        time.sleep(2.0)
        reason = wait_terminal(client, failing)["error_message"]
        assert '"seed": 3' in reason  # a careless server echoes the request


# --- configuration and command line ----------------------------------------------------------


def test_config_prices_models_and_limits() -> None:
    assert EmulatorConfig(generation_models=("v1", "alibaba/wan-2.2/text-to-video"))
    for bad in (
        {"generation_models": ("kling-2.6",)},
        {"generation_prices": {}},
        {"credit_balance": -1},
        {"concurrent_limit": 0},
    ):
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)


def test_custom_models_and_prices_are_used(emulator_factory: EmulatorFactory) -> None:
    prices = {
        family: {"480p": 10, "720p": 20, "1080p": 30} for family in ("wan", "seedance", "veo")
    }
    emulator = emulator_factory(
        fast_config(generation_models=("alibaba/wan-2.2/text-to-video",), generation_prices=prices)
    )
    with make_client(emulator) as client:
        refused(post(client, T2V, {**SMALL, "model": "wan"}), 400, INVALID)
        job_id = generate(client, T2V, {**SMALL, "model": "alibaba/wan-2.2/text-to-video"})
    assert emulator.jobs[job_id].used_credit == 8  # 10 per 5 s, for 4 s


def test_command_line_strict_fields_and_money_knobs(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        *(sys.executable, "-m", "kvid_dagster.emulator", "--port", "0", "--api-key", "cli-key"),
        *("--job-duration", "0.1", "--output-dir", str(tmp_path / "out"), "--strict-fields"),
        *("--credit-balance", "50", "--concurrent-limit", "1"),
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        with httpx.Client(base_url=base_url, headers={"api-key": "cli-key"}, timeout=10) as client:
            refused(post(client, T2V, {**SMALL, "camera_fixed": True}), 400, INVALID)
            generate(client, T2V, SMALL)  # 48 credits
            refused(post(client, T2V, SMALL), 402, ErrorCode.INSUFFICIENT_CREDIT)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
