"""The kvid emulator against plain httpx: the contract end to end, the error table, faults.

Every test talks to a real server on 127.0.0.1; videos are downloaded and decoded with PyAV.
Renders are kept at 480p and the fewest frames the contract allows, except one 720p case.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from conftest import IMAGES_DIR, REPO_ROOT, TEST_API_KEY, EmulatorFactory

from kvid_dagster.emulator import FAIL_MARKER, EmulatorConfig, KvidEmulator
from kvid_dagster.emulator.__main__ import build_parser
from kvid_dagster.emulator.config import REALISTIC, RoughEdges

T2V, I2V = "text-to-video", "image-to-video"
V2_MODEL = {
    T2V: "bytedance/seedance/v1/lite/text-to-video",
    I2V: "bytedance/seedance/v1/lite/image-to-video",
}
REQUEST_ID = re.compile(r"req_[0-9a-f]{16}")
LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} - .+")
SMALL_T2V = {"prompt": "A waterfall in a forest", "resolution": "480p", "num_frames": 81}


# --- helpers ---------------------------------------------------------------------------------


def make_client(
    emulator: KvidEmulator, key: str | None = TEST_API_KEY, timeout: float = 30.0
) -> httpx.Client:
    headers = {"api-key": key} if key is not None else {}
    return httpx.Client(base_url=emulator.base_url, headers=headers, timeout=timeout)


@pytest.fixture
def client(emulator: KvidEmulator) -> Iterator[httpx.Client]:
    with make_client(emulator) as c:
        yield c


def post_generate(client: httpx.Client, kind: str, body: Any) -> httpx.Response:
    return client.post(f"/ai/video/{kind}/generate", json=body)


def generate(client: httpx.Client, kind: str, body: dict[str, Any]) -> str:
    response = post_generate(client, kind, body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["success"] is True
    request_id = payload["data"]["request_id"]
    assert REQUEST_ID.fullmatch(request_id)
    return request_id


def get_status(client: httpx.Client, kind: str, request_id: str) -> httpx.Response:
    return client.get(f"/ai/video/{kind}/status", params={"request_id": request_id})


def get_result(client: httpx.Client, kind: str, request_id: str) -> httpx.Response:
    return client.get(f"/ai/video/{kind}/result", params={"request_id": request_id})


def status_data(client: httpx.Client, kind: str, request_id: str) -> dict[str, Any]:
    response = get_status(client, kind, request_id)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["success"] is True
    return {**payload["data"], "message": payload["message"]}


def wait_terminal(
    client: httpx.Client, kind: str, request_id: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = status_data(client, kind, request_id)
        if data["status"] in ("COMPLETED", "FAILED"):
            return data
        assert time.monotonic() < deadline, f"{request_id} still {data['status']}"
        time.sleep(0.05)


def download(
    client: httpx.Client, kind: str, request_id: str, dest: Path
) -> tuple[dict[str, Any], Path]:
    """Wait for COMPLETED, fetch the result and the file; check the result's fields."""
    assert wait_terminal(client, kind, request_id)["status"] == "COMPLETED"
    response = get_result(client, kind, request_id)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    video = httpx.get(data["url"], timeout=30)  # storage: no api-key needed
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4"
    assert int(video.headers["content-length"]) == len(video.content)
    path = dest / data["name"]
    path.write_bytes(video.content)
    assert data["name"] == f"{request_id}.mp4"
    assert data["size"] == math.ceil(len(video.content) / 1024)
    assert data["url"].startswith(f"{client.base_url}".rstrip("/") + "/files/")
    return data, path


def probe(path: Path) -> tuple[int, int, Fraction, int, str, str]:
    """(width, height, fps, decoded frame count, codec, pixel format) read back with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return (
            stream.width,
            stream.height,
            Fraction(stream.average_rate),
            count,
            stream.codec_context.name,
            stream.codec_context.pix_fmt,
        )


def frame_at(path: Path, index: int) -> np.ndarray:
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise IndexError(index)


def frame_hashes(path: Path) -> list[str]:
    with av.open(str(path)) as container:
        return [
            hashlib.sha256(f.to_ndarray(format="rgb24").tobytes()).hexdigest()
            for f in container.decode(video=0)
        ]


def load_image(name: str) -> np.ndarray:
    with av.open(str(IMAGES_DIR / name)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def thumb(rgb: np.ndarray, width: int = 24, height: int = 24) -> np.ndarray:
    """A tiny grey version of an image, for correlating pictures of different sizes."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    small = frame.reformat(width=width, height=height, format="gray", interpolation="AREA")
    return small.to_ndarray().astype(np.float64).ravel()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(thumb(a), thumb(b))[0, 1])


def center_fit(rgb: np.ndarray, ratio: float) -> np.ndarray:
    """The centred crop of ``rgb`` with aspect ``ratio`` (what the first frame shows)."""
    h, w = rgb.shape[:2]
    if w / h > ratio:
        cw = round(h * ratio)
        return rgb[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    ch = round(w / ratio)
    return rgb[(h - ch) // 2 : (h - ch) // 2 + ch]


def image_b64(name: str) -> str:
    return base64.b64encode((IMAGES_DIR / name).read_bytes()).decode()


# --- end to end: every job kind x model ----------------------------------------------------------

E2E_CASES = [
    # (id, kind, body (image placeholders filled in the test), expected width, height, fps, frames)
    ("t2v-v1", T2V, {**SMALL_T2V, "frames_per_second": 16}, 854, 480, 16, 81),
    (
        "t2v-v1-9:16",
        T2V,
        {**SMALL_T2V, "aspect_ratio": "9:16", "frames_per_second": 24, "seed": 7},
        480,
        854,
        24,
        81,
    ),
    (
        "t2v-v2",
        T2V,
        {
            "prompt": "A beautiful sunset over the ocean",
            "model": V2_MODEL[T2V],
            "resolution": "480p",
            "aspect_ratio": "4:3",
            "duration": "5",
            "camera_fixed": False,
            "seed": None,
        },
        640,
        480,
        24,
        120,
    ),
    (
        "i2v-v1-url-auto",
        I2V,
        {"prompt": "The tiger blinks", "resolution": "480p", "image_url": "tiger.jpg"},
        480,
        600,
        16,
        81,
    ),
    (
        "i2v-v1-file-1:1",
        I2V,
        {
            "prompt": "Zoom on the food",
            "resolution": "480p",
            "aspect_ratio": "1:1",
            "frames_per_second": 5,
            "image_file": "salmon_dish.jpg",
        },
        480,
        480,
        5,
        81,
    ),
    (
        "i2v-v2-end-image",
        I2V,
        {
            "prompt": "Camera panning across the scene",
            "model": V2_MODEL[I2V],
            "resolution": "480p",
            "aspect_ratio": "9:21",
            "image_url": "pavilion_park.jpg",
            "end_image_url": "tiger.jpg",
        },
        480,
        1120,
        24,
        120,
    ),
]


@pytest.mark.parametrize(
    ("kind", "body", "width", "height", "fps", "frames"),
    [case[1:] for case in E2E_CASES],
    ids=[case[0] for case in E2E_CASES],
)
def test_end_to_end_video_matches_the_contract(
    emulator: KvidEmulator,
    client: httpx.Client,
    image_server: str,
    tmp_path: Path,
    kind: str,
    body: dict[str, Any],
    width: int,
    height: int,
    fps: int,
    frames: int,
) -> None:
    body = dict(body)
    for field in ("image_url", "end_image_url"):
        if field in body:
            body[field] = f"{image_server}/{body[field]}"
    if "image_file" in body:
        body["image_file"] = image_b64(body["image_file"])
    request_id = generate(client, kind, body)

    final = wait_terminal(client, kind, request_id)
    assert final["progress"] == 100
    assert final["logs"][0].endswith(" - Video generation started")
    assert final["logs"][-1].endswith(" - Video generation completed")
    assert all(LOG_LINE.fullmatch(line) for line in final["logs"])

    _, path = download(client, kind, request_id, tmp_path)
    assert probe(path) == (width, height, Fraction(fps), frames, "h264", "yuv420p")

    info = emulator.jobs[request_id]
    assert (info.kind, info.model, info.state) == (
        kind,
        "v2" if "model" in body else "v1",
        "COMPLETED",
    )
    if "image_file" in body:  # the job view never holds the image itself
        assert "elided" in info.body["image_file"]
        assert len(info.body["image_file"]) < 100


def test_720p_and_result_waits_for_the_render(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    # job_duration 0: COMPLETED at once, so result must wait for the encoder to finish
    emulator = emulator_factory(job_duration=0.0)
    with make_client(emulator) as client:
        request_id = generate(
            client,
            T2V,
            {
                "prompt": "Video of cleaning with a vacuum cleaner. slow movement. low angle",
                "resolution": "720p",
            },
        )
        assert status_data(client, T2V, request_id)["status"] == "COMPLETED"
        _, path = download(client, T2V, request_id, tmp_path)
    assert probe(path) == (1280, 720, Fraction(16), 81, "h264", "yuv420p")


# --- queue behaviour ---------------------------------------------------------------------------


def test_queue_beyond_capacity_waits_in_queue(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(workers=1, job_duration=1.2)
    with make_client(emulator) as client:
        first = generate(client, T2V, SMALL_T2V)
        second = generate(client, T2V, {**SMALL_T2V, "prompt": "another"})
        a, b = status_data(client, T2V, first), status_data(client, T2V, second)
        assert a["status"] == "PROCESSING" and 0 <= a["progress"] <= 99
        assert a["logs"][0].endswith("Video generation started")
        assert a["message"] == "Video generation in progress"
        assert b == {"status": "IN_QUEUE", "progress": 0, "logs": [], "message": b["message"]}
        assert emulator.jobs[second].state == "IN_QUEUE"

        time.sleep(0.45)
        a2, b2 = status_data(client, T2V, first), status_data(client, T2V, second)
        assert a2["status"] == "PROCESSING"
        assert a2["progress"] > a["progress"]
        assert len(a2["logs"]) > len(a["logs"])
        assert any("Processing frame 1-20" in line for line in a2["logs"])
        assert b2["status"] == "IN_QUEUE" and b2["progress"] == 0

        assert wait_terminal(client, T2V, first)["status"] == "COMPLETED"
        b3 = status_data(client, T2V, second)
        assert b3["status"] in ("PROCESSING", "COMPLETED")
        assert wait_terminal(client, T2V, second)["status"] == "COMPLETED"


def test_vendor_timing_scales_with_resolution_and_length(emulator_factory: EmulatorFactory) -> None:
    # time_scale 0.01: 480p/5 s = 60 s -> 0.6 s; 1080p/10 s = 300 s -> 3 s
    emulator = emulator_factory(job_duration=None, time_scale=0.01)
    with make_client(emulator) as client:
        quick = generate(client, T2V, {**SMALL_T2V})
        slow = generate(
            client,
            T2V,
            {"prompt": "x", "model": V2_MODEL[T2V], "resolution": "1080p", "duration": "10"},
        )
        time.sleep(0.9)
        assert status_data(client, T2V, quick)["status"] == "COMPLETED"
        slow_status = status_data(client, T2V, slow)
        assert slow_status["status"] == "PROCESSING"
        assert 20 <= slow_status["progress"] <= 45


# --- failures ----------------------------------------------------------------------------------


def test_fail_marker_ends_failed_with_reason(client: httpx.Client) -> None:
    request_id = generate(client, T2V, {**SMALL_T2V, "prompt": "a cat [[kvid:fail]]"})
    final = wait_terminal(client, T2V, request_id)
    assert final["status"] == "FAILED"
    assert "[[kvid:fail]]" in final["message"]
    assert "failed" in final["logs"][-1].lower() and "[[kvid:fail]]" in final["logs"][-1]
    response = get_result(client, T2V, request_id)
    assert response.status_code == 409
    assert response.json()["success"] is False and "FAILED" in response.json()["message"]


def test_fail_job_fails_a_running_job_at_once(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(job_duration=5.0)
    with make_client(emulator) as client:
        request_id = generate(client, T2V, SMALL_T2V)
        emulator.fail_job(request_id, "GPU on fire")
        data = status_data(client, T2V, request_id)
        assert data["status"] == "FAILED"
        assert "GPU on fire" in data["message"] and "GPU on fire" in data["logs"][-1]
        with pytest.raises(KeyError):
            emulator.fail_job("req_ffffffffffffffff")


def test_failure_rate_one_fails_every_job(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(failure_rate=1.0, job_duration=0.2)
    with make_client(emulator) as client:
        ids = [generate(client, T2V, SMALL_T2V) for _ in range(3)]
        finals = [wait_terminal(client, T2V, rid) for rid in ids]
    assert [f["status"] for f in finals] == ["FAILED"] * 3
    assert all(f["message"].startswith("Video generation failed: ") for f in finals)
    assert all(f["progress"] < 100 for f in finals)


def test_unfetchable_or_undecodable_image_fails_the_job(
    client: httpx.Client, image_server: str
) -> None:
    missing = generate(
        client,
        I2V,
        {"prompt": "x", "resolution": "480p", "image_url": f"{image_server}/missing.jpg"},
    )
    garbage = generate(
        client,
        I2V,
        {
            "prompt": "x",
            "resolution": "480p",
            "image_file": base64.b64encode(b"not an image").decode(),
        },
    )
    missing_final = wait_terminal(client, I2V, missing)
    garbage_final = wait_terminal(client, I2V, garbage)
    assert missing_final["status"] == "FAILED" and "HTTP 404" in missing_final["message"]
    assert garbage_final["status"] == "FAILED" and "decode" in garbage_final["message"]
    assert get_result(client, I2V, missing).status_code == 409


# --- the error table ---------------------------------------------------------------------------


def test_401_for_a_missing_empty_or_wrong_key(emulator: KvidEmulator) -> None:
    url = "/ai/video/text-to-video/generate"
    with make_client(emulator, key=None) as anonymous:
        responses = [
            anonymous.post(url, json=SMALL_T2V),
            anonymous.post(url, json=SMALL_T2V, headers={"api-key": ""}),
            anonymous.post(url, json=SMALL_T2V, headers={"api-key": "wrong-key"}),
            anonymous.get(
                "/ai/video/text-to-video/status",
                params={"request_id": "req_0"},
                headers={"api-key": "wrong-key"},
            ),
        ]
    assert [r.status_code for r in responses] == [401, 401, 401, 401]
    for r in responses:
        assert r.json()["success"] is False and r.json()["data"] is None
        assert "wrong-key" not in r.text
    assert emulator.jobs_created == 0
    assert emulator.stats[("generate", 401)] == 3


def test_any_non_empty_key_is_accepted_when_none_is_configured(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(api_key=None)
    with make_client(emulator, key="whatever-you-like") as client:
        generate(client, T2V, SMALL_T2V)
    with make_client(emulator, key=None) as anonymous:
        assert anonymous.post("/ai/video/text-to-video/generate", json=SMALL_T2V).status_code == 401


def test_404_for_unknown_or_other_kind_request_ids(client: httpx.Client) -> None:
    unknown = "req_0123456789abcdef"
    for call in (get_status, get_result):
        response = call(client, T2V, unknown)
        assert response.status_code == 404
        assert response.json() == {
            "success": False,
            "data": None,
            "message": response.json()["message"],
        }
        assert unknown in response.json()["message"]
    text_job = generate(client, T2V, SMALL_T2V)
    assert get_status(client, I2V, text_job).status_code == 404
    assert get_result(client, I2V, text_job).status_code == 404
    assert get_status(client, T2V, text_job).status_code == 200
    missing = client.get("/ai/video/text-to-video/status")
    assert missing.status_code == 422 and "request_id" in missing.json()["message"]
    assert client.get("/ai/video/sound-to-video/status").status_code == 404
    wrong_method = client.get("/ai/video/text-to-video/generate")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


def test_409_for_result_before_completed(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(workers=1, job_duration=3.0)
    with make_client(emulator) as client:
        running = generate(client, T2V, SMALL_T2V)
        queued = generate(client, T2V, SMALL_T2V)
        for request_id, state in ((running, "PROCESSING"), (queued, "IN_QUEUE")):
            response = get_result(client, T2V, request_id)
            assert response.status_code == 409
            assert state in response.json()["message"]
            assert response.json()["success"] is False


BAD_BODIES = [
    # (id, kind, body, field named, value shown)
    ("missing-prompt", T2V, {"resolution": "480p"}, "prompt", None),
    ("empty-prompt", T2V, {"prompt": "   "}, "prompt", None),
    ("frames-below", T2V, {"prompt": "x", "num_frames": 80}, "num_frames", "80"),
    ("frames-above", T2V, {"prompt": "x", "num_frames": 101}, "num_frames", "101"),
    ("fps-below", T2V, {"prompt": "x", "frames_per_second": 4}, "frames_per_second", "4"),
    ("fps-above", T2V, {"prompt": "x", "frames_per_second": 25}, "frames_per_second", "25"),
    ("bool-is-not-int", T2V, {"prompt": "x", "num_frames": True}, "num_frames", "true"),
    ("float-is-not-int", T2V, {"prompt": "x", "num_frames": 81.0}, "num_frames", "81.0"),
    ("seed-string", T2V, {"prompt": "x", "seed": "42"}, "seed", '"42"'),
    (
        "bool-field-string",
        T2V,
        {"prompt": "x", "enable_safety_checker": "yes"},
        "enable_safety_checker",
        '"yes"',
    ),
    ("v1-1080p", T2V, {"prompt": "x", "resolution": "1080p"}, "resolution", '"1080p"'),
    ("v1-t2v-square", T2V, {"prompt": "x", "aspect_ratio": "1:1"}, "aspect_ratio", '"1:1"'),
    ("v1-t2v-auto", T2V, {"prompt": "x", "aspect_ratio": "auto"}, "aspect_ratio", '"auto"'),
    (
        "v2-duration-int",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "duration": 5},
        "duration",
        "5",
    ),
    (
        "v2-duration-7",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "duration": "7"},
        "duration",
        '"7"',
    ),
    (
        "v2-580p",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "resolution": "580p"},
        "resolution",
        '"580p"',
    ),
    (
        "v2-9:16",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "aspect_ratio": "9:16"},
        "aspect_ratio",
        '"9:16"',
    ),
    (
        "v1-field-on-v2",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "num_frames": 81},
        "num_frames",
        "v1 (Wan) only",
    ),
    (
        "v2-field-on-v1",
        T2V,
        {"prompt": "x", "camera_fixed": True},
        "camera_fixed",
        "v2 (Seedance) only",
    ),
    (
        "end-image-on-v1",
        I2V,
        {"prompt": "x", "image_url": "http://h/x.jpg", "end_image_url": "http://h/y.jpg"},
        "end_image_url",
        "v2 (Seedance) only",
    ),
    (
        "end-image-on-t2v",
        T2V,
        {"prompt": "x", "model": V2_MODEL[T2V], "end_image_url": "http://h/y.jpg"},
        "end_image_url",
        "image-to-video only",
    ),
    (
        "image-on-t2v",
        T2V,
        {"prompt": "x", "image_url": "http://h/x.jpg"},
        "image_url",
        "image-to-video only",
    ),
    ("model-of-other-kind", T2V, {"prompt": "x", "model": V2_MODEL[I2V]}, "model", V2_MODEL[T2V]),
    ("model-null", T2V, {"prompt": "x", "model": None}, "model", "null"),
    ("unknown-field", T2V, {"prompt": "x", "fps": 16}, "fps", "unknown field"),
    ("i2v-no-image", I2V, {"prompt": "x"}, "image_url", "required"),
    (
        "i2v-both-images",
        I2V,
        {"prompt": "x", "image_url": "http://h/x.jpg", "image_file": "aGk="},
        "image_file",
        "not both",
    ),
    (
        "i2v-ftp-url",
        I2V,
        {"prompt": "x", "image_url": "ftp://h/x.jpg"},
        "image_url",
        "ftp://h/x.jpg",
    ),
    ("i2v-bad-base64", I2V, {"prompt": "x", "image_file": "not base64!!"}, "image_file", "base64"),
    (
        "v2-i2v-auto",
        I2V,
        {
            "prompt": "x",
            "model": V2_MODEL[I2V],
            "image_url": "http://h/x.jpg",
            "aspect_ratio": "auto",
        },
        "aspect_ratio",
        '"auto"',
    ),
    ("body-not-object", T2V, ["prompt"], "body", "JSON object"),
]


@pytest.mark.parametrize(
    ("kind", "body", "field", "shown"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_422_names_the_field_value_and_what_is_allowed(
    emulator: KvidEmulator,
    client: httpx.Client,
    kind: str,
    body: Any,
    field: str,
    shown: str | None,
) -> None:
    response = post_generate(client, kind, body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["success"] is False and payload["data"] is None
    message = payload["message"]
    assert message.startswith(f"{field}: ") or f"; {field}: " in message
    assert "allowed:" in message
    if shown is not None:
        assert shown in message
    assert emulator.jobs_created == 0


def test_422_for_a_body_that_is_not_json(client: httpx.Client) -> None:
    response = client.post(
        "/ai/video/text-to-video/generate",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["message"].startswith("body: ")


def test_boundary_values_are_accepted(client: httpx.Client, emulator: KvidEmulator) -> None:
    for extra in (
        {"num_frames": 100},
        {"frames_per_second": 5},
        {"frames_per_second": 24},
        {"seed": None},
        {"seed": 0},
    ):
        generate(client, T2V, {**SMALL_T2V, **extra})
    generate(
        client,
        T2V,
        {
            "prompt": "x",
            "model": V2_MODEL[T2V],
            "resolution": "480p",
            "duration": "10",
            "aspect_ratio": "9:21",
        },
    )
    assert emulator.jobs_created == 6


def test_413_for_an_oversized_body(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(max_body_bytes=1024)
    with make_client(emulator) as client:
        response = post_generate(client, T2V, {"prompt": "x" * 5000})
        assert response.status_code == 413
        assert response.headers["connection"] == "close"
        assert emulator.jobs_created == 0
        generate(client, T2V, SMALL_T2V)  # a new connection works


def test_429_with_retry_after_under_rate_limit(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(rate_limit=2.0)
    with make_client(emulator) as client:
        responses = [get_status(client, T2V, "req_0000000000000000") for _ in range(6)]
        codes = [r.status_code for r in responses]
        assert codes[:2] == [404, 404]  # one second of burst
        limited = [r for r in responses if r.status_code == 429]
        assert len(limited) >= 3
        for r in limited:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["success"] is False
        assert emulator.stats[("status", 429)] == len(limited)
        time.sleep(1.05)
        assert get_status(client, T2V, "req_0000000000000000").status_code == 404
        # storage downloads are not rate limited
        assert client.get("/files/nothing.mp4").status_code == 404


# --- scripted faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["500", "502", "503", "504"])
def test_fault_status_codes_are_one_shot(
    emulator: KvidEmulator, client: httpx.Client, code: str
) -> None:
    emulator.add_fault("generate", code)
    response = post_generate(client, T2V, SMALL_T2V)
    assert response.status_code == int(code)
    if code in ("500", "503"):
        assert response.json()["success"] is False
    else:  # what a gateway sends: HTML
        assert response.headers["content-type"].startswith("text/html")
        with pytest.raises(ValueError):
            response.json()
    assert emulator.jobs_created == 0
    generate(client, T2V, SMALL_T2V)
    assert emulator.jobs_created == 1
    assert emulator.stats[("generate", int(code))] == 1
    assert emulator.stats[("generate", 200)] == 1


def test_fault_retry_after_headers(emulator: KvidEmulator, client: httpx.Client) -> None:
    emulator.add_fault("status", "503", retry_after=7)
    emulator.add_fault("status", "429", retry_after=3)
    emulator.add_fault("status", 429)
    first, second, third = (get_status(client, T2V, "req_0000000000000000") for _ in range(3))
    assert (first.status_code, first.headers["retry-after"]) == (503, "7")
    assert (second.status_code, second.headers["retry-after"]) == (429, "3")
    assert (third.status_code, third.headers["retry-after"]) == (429, "1")
    assert get_status(client, T2V, "req_0000000000000000").status_code == 404


def test_fault_5xx_after_create_bills_a_job(emulator: KvidEmulator, client: httpx.Client) -> None:
    emulator.add_fault("generate", "502", after_create=True)
    assert post_generate(client, T2V, SMALL_T2V).status_code == 502
    assert emulator.jobs_created == 1
    assert len(emulator.jobs) == 1


def test_fault_timeout_on_generate_creates_the_job_then_stalls(emulator: KvidEmulator) -> None:
    emulator.add_fault("generate", "timeout", delay=1.5)
    with make_client(emulator, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        post_generate(client, T2V, {**SMALL_T2V, "prompt": "uncertain"})
    # the uncertain submission: the client saw nothing, yet the job exists (and was billed)
    assert emulator.jobs_created == 1
    [info] = emulator.jobs.values()
    assert info.body["prompt"] == "uncertain"


def test_fault_timeout_before_creates_nothing(emulator: KvidEmulator, client: httpx.Client) -> None:
    emulator.add_fault("generate", "timeout_before", delay=0.4)
    started = time.monotonic()
    with pytest.raises(httpx.TransportError):
        post_generate(client, T2V, SMALL_T2V)
    assert time.monotonic() - started >= 0.35
    assert emulator.jobs_created == 0
    assert emulator.stats[("generate", 0)] == 1


def test_fault_timeout_on_status_delays_the_answer(
    emulator: KvidEmulator, client: httpx.Client
) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    emulator.add_fault("status", "timeout", delay=0.4)
    started = time.monotonic()
    response = get_status(client, T2V, request_id)
    assert time.monotonic() - started >= 0.35
    assert response.status_code == 200


@pytest.mark.parametrize("after_create", [False, True])
def test_fault_reset_closes_without_answering(
    emulator: KvidEmulator, client: httpx.Client, after_create: bool
) -> None:
    emulator.add_fault("generate", "reset", after_create=after_create)
    with pytest.raises(httpx.TransportError):
        post_generate(client, T2V, SMALL_T2V)
    assert emulator.jobs_created == int(after_create)
    generate(client, T2V, SMALL_T2V)  # the next request is served


def test_fault_bodies_non_json_malformed_missing_fields(
    emulator: KvidEmulator, client: httpx.Client
) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    emulator.add_fault("status", "non_json")
    emulator.add_fault("status", "malformed")
    emulator.add_fault("status", "missing_fields")
    non_json = get_status(client, T2V, request_id)
    assert non_json.status_code == 200 and non_json.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        non_json.json()
    malformed = get_status(client, T2V, request_id)
    assert malformed.status_code == 200
    assert isinstance(malformed.json(), dict) and "success" not in malformed.json()
    missing = get_status(client, T2V, request_id)
    assert missing.status_code == 200
    assert missing.json()["success"] is True and missing.json()["data"] == {}
    assert "status" in status_data(client, T2V, request_id)

    emulator.add_fault("generate", "missing_fields", after_create=True)
    response = post_generate(client, T2V, SMALL_T2V)
    assert response.json()["data"] == {} and emulator.jobs_created == 2


def test_fault_on_files_and_wildcard(
    emulator: KvidEmulator, client: httpx.Client, tmp_path: Path
) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    _, path = download(client, T2V, request_id, tmp_path)
    full = path.read_bytes()
    url = get_result(client, T2V, request_id).json()["data"]["url"]

    emulator.add_fault("files", "malformed")
    emulator.add_fault("files", "missing_fields")
    emulator.add_fault("files", "500")
    assert httpx.get(url).content == full[: len(full) // 2]
    assert httpx.get(url).content == b""
    assert httpx.get(url).status_code == 500
    assert httpx.get(url).content == full

    emulator.add_fault("*", "503", times=2)
    assert get_status(client, T2V, request_id).status_code == 503
    assert httpx.get(url).status_code == 503
    assert get_status(client, T2V, request_id).status_code == 200


def test_add_fault_rejects_nonsense(emulator: KvidEmulator) -> None:
    with pytest.raises(ValueError):
        emulator.add_fault("download", "500")
    with pytest.raises(ValueError):
        emulator.add_fault("status", "418")
    with pytest.raises(TypeError):
        emulator.add_fault("status", "timeout", retry_after=1)
    with pytest.raises(ValueError):
        emulator.add_fault("status", "reset", after_create=True)


def test_random_errors_are_deterministic_under_a_seed(emulator_factory: EmulatorFactory) -> None:
    def codes(emulator: KvidEmulator) -> list[int]:
        with make_client(emulator) as client:
            return [get_status(client, T2V, "req_0000000000000000").status_code for _ in range(20)]

    first = codes(emulator_factory(error_rate=0.5, seed=123))
    second = codes(emulator_factory(error_rate=0.5, seed=123))
    assert first == second
    assert 404 in first and {500, 502, 503, 504} & set(first)


def test_latency_is_added(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(latency=0.3)
    with make_client(emulator) as client:
        started = time.monotonic()
        get_status(client, T2V, "req_0000000000000000")
        assert time.monotonic() - started >= 0.28


# --- what the videos show ------------------------------------------------------------------------


def test_text_to_video_is_deterministic(client: httpx.Client, tmp_path: Path) -> None:
    body = {**SMALL_T2V, "prompt": "A video of a man hiking with a backpack", "seed": 1234}
    first = generate(client, T2V, body)
    again = generate(client, T2V, body)
    other = generate(client, T2V, {**body, "seed": 1235})
    paths = [download(client, T2V, rid, tmp_path)[1] for rid in (first, again, other)]
    hashes = [frame_hashes(p) for p in paths]
    assert len(hashes[0]) == 81
    assert hashes[0] == hashes[1]  # same prompt + seed: the same pixels
    assert hashes[0] != hashes[2]
    assert len(set(hashes[0])) > 40  # and it moves


def test_image_to_video_shows_the_input(
    client: httpx.Client, image_server: str, tmp_path: Path
) -> None:
    request_id = generate(
        client,
        I2V,
        {
            "prompt": "The tiger blinks",
            "resolution": "480p",
            "seed": 5,
            "image_url": f"{image_server}/tiger.jpg",
        },
    )
    _, path = download(client, I2V, request_id, tmp_path)
    tiger, salmon = load_image("tiger.jpg"), load_image("salmon_dish.jpg")
    first, middle, last = frame_at(path, 0), frame_at(path, 40), frame_at(path, 80)
    assert correlation(first, tiger) > 0.95  # the first frame is the whole picture
    assert correlation(middle, tiger) > 0.6  # zoomed and panned, still the tiger
    assert correlation(middle, center_fit(salmon, 480 / 600)) < 0.5
    assert np.abs(middle.reshape(-1, 3).mean(0) - tiger.reshape(-1, 3).mean(0)).max() < 25
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 5  # the camera moved


def test_end_image_cross_fades_at_the_end(
    client: httpx.Client, image_server: str, tmp_path: Path
) -> None:
    body = {
        "prompt": "From food to tiger",
        "model": V2_MODEL[I2V],
        "resolution": "480p",
        "aspect_ratio": "1:1",
        "image_url": f"{image_server}/salmon_dish.jpg",
        "end_image_url": f"{image_server}/tiger.jpg",
    }
    request_id = generate(client, I2V, body)
    _, path = download(client, I2V, request_id, tmp_path)
    salmon, tiger = (
        center_fit(load_image("salmon_dish.jpg"), 1.0),
        center_fit(load_image("tiger.jpg"), 1.0),
    )
    first, last = frame_at(path, 0), frame_at(path, 119)
    assert correlation(first, salmon) > 0.9 and correlation(first, tiger) < 0.5
    assert correlation(last, tiger) > 0.9 and correlation(last, salmon) < 0.5


def test_reuse_renders_renders_once_per_geometry(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(reuse_renders=True)
    with make_client(emulator) as client:
        ids = [generate(client, T2V, {**SMALL_T2V, "prompt": f"prompt {i}"}) for i in range(3)]
        paths = [download(client, T2V, rid, tmp_path)[1] for rid in ids]
        assert len({p.name for p in paths}) == 3  # each job has its own URL and name...
        assert len({p.read_bytes() for p in paths}) == 1  # ...over one shared render
        assert len(list(emulator.output_dir.glob("*.mp4"))) == 1
        other = generate(client, T2V, {**SMALL_T2V, "aspect_ratio": "9:16"})
        _, path = download(client, T2V, other, tmp_path)
        assert probe(path)[:2] == (480, 854)
        assert len(list(emulator.output_dir.glob("*.mp4"))) == 2


def test_reuse_renders_with_auto_aspect_ratio(
    emulator_factory: EmulatorFactory, image_server: str, tmp_path: Path
) -> None:
    # "auto" needs the image before the geometry is known: the render task finds the share
    emulator = emulator_factory(reuse_renders=True)
    body = {"prompt": "x", "resolution": "480p", "image_url": f"{image_server}/tiger.jpg"}
    with make_client(emulator) as client:
        ids = [generate(client, I2V, {**body, "seed": i}) for i in range(3)]
        paths = [download(client, I2V, rid, tmp_path)[1] for rid in ids]
    assert len({p.read_bytes() for p in paths}) == 1
    assert probe(paths[0])[:2] == (480, 600)
    assert [p.name for p in emulator.output_dir.glob("*.mp4")] == [
        "shared-480x600-16fps-81f-image-to-video.mp4"
    ]


# --- lifecycle, isolation, observability ---------------------------------------------------------


def test_forget_jobs_answers_404_afterwards(
    emulator: KvidEmulator, client: httpx.Client, tmp_path: Path
) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    data, _ = download(client, T2V, request_id, tmp_path)
    emulator.forget_jobs()
    assert get_status(client, T2V, request_id).status_code == 404
    assert get_result(client, T2V, request_id).status_code == 404
    assert dict(emulator.jobs) == {}
    assert emulator.jobs_created == 1  # the bill stays
    assert httpx.get(data["url"]).status_code == 200  # storage survives the restart
    generate(client, T2V, SMALL_T2V)
    assert emulator.jobs_created == 2


def test_two_emulators_in_one_process_are_independent(emulator_factory: EmulatorFactory) -> None:
    a = emulator_factory()
    b = emulator_factory(api_key="other-key")
    assert a.port != b.port
    with make_client(a) as client_a, make_client(b, key="other-key") as client_b:
        request_id = generate(client_a, T2V, SMALL_T2V)
        assert get_status(client_b, T2V, request_id).status_code == 404
        assert post_generate(client_b, T2V, SMALL_T2V).status_code == 200
        a.add_fault("status", "500")
        assert get_status(client_b, T2V, request_id).status_code == 404
        assert get_status(client_a, T2V, request_id).status_code == 500
        assert (a.jobs_created, b.jobs_created) == (1, 1)
        assert a.stats[("status", 500)] == 1 and b.stats[("status", 500)] == 0
        a.stop()
        assert get_status(client_b, T2V, request_id).status_code == 404
        with pytest.raises(httpx.TransportError):
            get_status(client_a, T2V, request_id)


def test_stats_count_by_endpoint_and_status(emulator: KvidEmulator, client: httpx.Client) -> None:
    assert emulator.stats["generate"] == 0
    request_id = generate(client, T2V, SMALL_T2V)
    get_status(client, T2V, request_id)
    get_status(client, T2V, "req_0000000000000000")
    get_result(client, T2V, "req_0000000000000000")
    stats = emulator.stats
    assert (stats["generate"], stats["status"], stats["result"]) == (1, 2, 1)
    assert (stats[("status", 200)], stats[("status", 404)], stats[("result", 404)]) == (1, 1, 1)


def test_stop_closes_connections_and_removes_the_temp_dir(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory()
    output = emulator.output_dir
    assert output.is_dir()
    with make_client(emulator) as client:
        assert get_status(client, T2V, "req_0000000000000000").status_code == 404
        emulator.stop()
        with pytest.raises(httpx.TransportError):
            get_status(client, T2V, "req_0000000000000000")
    assert not output.exists()
    kept = emulator_factory(output_dir=tmp_path / "videos")
    kept.stop()
    assert (tmp_path / "videos").is_dir()  # a directory we were given is left alone


def test_logs_never_show_the_api_key(
    emulator_factory: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvid_dagster.emulator")
    emulator = emulator_factory(api_key="sekrit-key-123")
    with make_client(emulator, key="sekrit-key-123") as client:
        request_id = generate(client, T2V, SMALL_T2V)
    with make_client(emulator, key="sekrit-wrong-456") as client:
        assert get_status(client, T2V, request_id).status_code == 401
    emulator.stop()
    assert any("created" in message for message in caplog.messages)
    assert "sekrit" not in caplog.text
    assert "sekrit" not in repr(emulator.config)


def test_jobs_view_is_read_only(emulator: KvidEmulator, client: httpx.Client) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    jobs = emulator.jobs
    with pytest.raises(TypeError):
        jobs["x"] = jobs[request_id]  # type: ignore[index]
    with pytest.raises(TypeError):
        jobs[request_id].body["prompt"] = "changed"  # type: ignore[index]
    assert jobs[request_id].body == SMALL_T2V


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(workers=0)
    with pytest.raises(ValueError):
        EmulatorConfig(failure_rate=1.5)
    with pytest.raises(ValueError):
        EmulatorConfig(rate_limit=0)
    with pytest.raises(ValueError):
        EmulatorConfig(backlog=0)


def listen_backlog(port: int) -> int | None:
    """The backlog the kernel holds for the socket listening on ``port`` (``ss``'s Send-Q of a
    LISTEN socket), or None without ``ss``."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


def test_the_listen_backlog_is_the_standard_librarys_unless_configured(
    emulator: KvidEmulator, emulator_factory: EmulatorFactory
) -> None:
    # small real servers listen with socketserver's 5: bursts must meet that here too
    assert socketserver.TCPServer.request_queue_size == 5
    assert EmulatorConfig().backlog == emulator.config.backlog == 5
    assert emulator._server is not None and emulator._server.request_queue_size == 5
    big = emulator_factory(backlog=256)
    assert big._server is not None and big._server.request_queue_size == 256
    if shutil.which("ss") is not None:  # what listen() really got, read back from the kernel
        assert listen_backlog(emulator.port) == 5
        assert listen_backlog(big.port) == 256


def test_command_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "kvid_dagster.emulator",
        "--port",
        "0",
        "--api-key",
        "cli-key",
        "--job-duration",
        "0.1",
        "--workers",
        "2",
        "--backlog",
        "7",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url), base_url
        assert listen_backlog(int(base_url.rsplit(":", 1)[1])) in (7, None)
        with httpx.Client(base_url=base_url, headers={"api-key": "cli-key"}, timeout=10) as client:
            request_id = generate(client, T2V, SMALL_T2V)
            assert get_status(client, T2V, request_id).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert process.stderr is not None
        assert "cli-key" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_result_json_is_the_envelope(client: httpx.Client) -> None:
    request_id = generate(client, T2V, SMALL_T2V)
    wait_terminal(client, T2V, request_id)
    payload = get_result(client, T2V, request_id).json()
    assert set(payload) == {"success", "data", "message"}
    assert set(payload["data"]) == {"url", "name", "size"}
    assert json.loads(json.dumps(payload)) == payload


# --- the realistic mode: rough edges of real servers -------------------------------------------

IMF_FIXDATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def completed_url(client: httpx.Client, kind: str, request_id: str) -> str:
    """The result URL of a job, once it is COMPLETED and visible (fresh jobs may 404 first)."""
    deadline = time.monotonic() + 30
    while (response := get_status(client, kind, request_id)).status_code == 404:
        assert time.monotonic() < deadline, "the job never became visible"
        time.sleep(0.05)
    assert wait_terminal(client, kind, request_id)["status"] == "COMPLETED"
    response = get_result(client, kind, request_id)
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["url"])


def is_mp4(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.content[4:8] == b"ftyp"


def test_realistic_turns_every_rough_edge_on_and_explicit_values_win() -> None:
    assert EmulatorConfig().edges == RoughEdges()  # the default: all off
    assert EmulatorConfig(realistic=True).edges == REALISTIC
    assert all(getattr(REALISTIC, f.name) for f in dataclasses.fields(RoughEdges))
    picked = EmulatorConfig(realistic=True, fresh_404_s=0, separate_storage=False).edges
    assert picked == dataclasses.replace(REALISTIC, fresh_404_s=0, separate_storage=False)
    assert EmulatorConfig(null_progress=True).edges == RoughEdges(null_progress=True)
    # KvidEmulator's overrides go through dataclasses.replace: realistic must still resolve
    assert dataclasses.replace(EmulatorConfig(), realistic=True).edges == REALISTIC
    assert EmulatorConfig(realistic=True).backlog == 5
    assert EmulatorConfig(realistic=True).echo_api_key is False  # a separate opt-in
    with pytest.raises(ValueError):
        EmulatorConfig(omit_progress_rate=1.5)
    with pytest.raises(ValueError):
        EmulatorConfig(result_url_ttl_s=-1)
    assert build_parser().parse_args(["--realistic"]).realistic is True
    assert build_parser().parse_args([]).realistic is False


def test_realistic_mode_end_to_end(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(realistic=True)
    assert emulator.storage_url != emulator.base_url
    with make_client(emulator) as client:
        response = post_generate(client, T2V, SMALL_T2V)
        assert response.status_code == 200 and "x-debug-key" not in response.headers
        url = completed_url(client, T2V, response.json()["data"]["request_id"])
        assert url.startswith(f"{emulator.storage_url}/videos/") and "signature=" in url
        assert is_mp4(httpx.get(url, timeout=30))
        emulator.add_fault("status", "503", retry_after=2)
        retry = get_status(client, T2V, "req_0000000000000000").headers["retry-after"]
        assert IMF_FIXDATE.fullmatch(retry)


def test_burst_resets_new_connections_before_anything_is_created(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(burst_reset_above=2)
    emulator.add_fault("status", "timeout", times=3, delay=6.0)  # holds three requests in flight

    def hold() -> None:
        with make_client(emulator) as client:
            assert get_status(client, T2V, "req_0000000000000000").status_code == 404

    def wait_held(count: int) -> None:
        deadline = time.monotonic() + 10
        while emulator.stats["status"] < count:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(hold), pool.submit(hold)]
        wait_held(2)
        with make_client(emulator) as client:  # two in flight: not more than 2, served
            generate(client, T2V, SMALL_T2V)
        held.append(pool.submit(hold))
        wait_held(3)
        with make_client(emulator) as client, pytest.raises(httpx.TransportError):
            post_generate(client, T2V, SMALL_T2V)
        assert emulator.jobs_created == 1  # refused before reading: no job
        assert emulator.stats["refused"] == 1
        assert emulator.stats["generate"] == 1
        for future in held:
            future.result()
    with make_client(emulator) as client:  # the burst is over
        generate(client, T2V, SMALL_T2V)
    assert emulator.jobs_created == 2 and emulator.stats["refused"] == 1


def test_fresh_jobs_answer_404_then_normally(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(fresh_404_s=3.0)
    with make_client(emulator) as client:
        started = time.monotonic()
        request_id = generate(client, T2V, SMALL_T2V)
        status, result = get_status(client, T2V, request_id), get_result(client, T2V, request_id)
        assert time.monotonic() - started < 3.0, "too slow to see the fresh window"
        for response in (status, result):
            assert response.status_code == 404
            assert response.json() == {
                "success": False,
                "data": None,
                "message": f"request_id {request_id!r} not found for {T2V}",
            }
        while get_status(client, T2V, request_id).status_code == 404:
            assert time.monotonic() - started < 15
            time.sleep(0.05)
        assert time.monotonic() - started >= 2.95  # not before the window ended
        assert wait_terminal(client, T2V, request_id)["status"] == "COMPLETED"
        assert get_result(client, T2V, request_id).status_code == 200


def test_progress_null_in_queue_and_fractional_while_running(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(
        null_progress=True, fractional_progress=True, workers=1, job_duration=4.0
    )
    with make_client(emulator) as client:
        running = generate(client, T2V, SMALL_T2V)
        queued = generate(client, T2V, SMALL_T2V)
        data = status_data(client, T2V, queued)
        assert data["status"] == "IN_QUEUE"
        assert "progress" in data and data["progress"] is None
        seen: list[Any] = []
        while len(seen) < 8:
            data = status_data(client, T2V, running)
            assert data["status"] == "PROCESSING"
            seen.append(data["progress"])
            time.sleep(0.13)
        assert all(type(p) is float and 0 <= p < 100 for p in seen)
        assert any(p != int(p) for p in seen)  # e.g. 12.5
        assert all(p == round(p, 1) for p in seen)  # one decimal
        assert wait_terminal(client, T2V, running, timeout=30)["progress"] == 100


def test_progress_is_sometimes_omitted(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(omit_progress_rate=0.5, seed=3)
    with make_client(emulator) as client:
        request_id = generate(client, T2V, SMALL_T2V)
        present = ["progress" in status_data(client, T2V, request_id) for _ in range(30)]
        assert True in present and False in present
        always = emulator_factory(omit_progress_rate=1.0)
    with make_client(always) as client:
        request_id = generate(client, T2V, SMALL_T2V)
        data = status_data(client, T2V, request_id)
        assert "progress" not in data and data["status"] in ("IN_QUEUE", "PROCESSING", "COMPLETED")


def test_separate_storage_serves_videos_on_another_port_without_the_key(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(separate_storage=True)
    storage = httpx.URL(emulator.storage_url)
    assert storage.host == "127.0.0.1" and storage.port not in (None, emulator.port)
    with make_client(emulator) as client:
        request_id = generate(client, T2V, SMALL_T2V)
        url = completed_url(client, T2V, request_id)
        assert url == f"{emulator.storage_url}/videos/{request_id}.mp4"
        video = httpx.get(url, timeout=30)  # no api-key
        assert is_mp4(video) and video.headers["content-type"] == "video/mp4"
        assert emulator.stats["files_with_api_key"] == 0
        assert is_mp4(httpx.get(url, headers={"api-key": TEST_API_KEY}, timeout=30))
        assert emulator.stats["files_with_api_key"] == 1  # counted: a client must not send it
        # the API origin serves no files, and the storage origin no API
        assert client.get(f"/files/{request_id}.mp4").status_code == 404
        assert client.get(f"/videos/{request_id}.mp4").status_code == 404
        wrong = httpx.get(f"{emulator.storage_url}/ai/video/{T2V}/status?request_id={request_id}")
        assert wrong.status_code == 404 and b"NoSuchKey" in wrong.content
        assert httpx.get(f"{emulator.storage_url}/videos/req_0.mp4").status_code == 404


def test_result_urls_expire_with_403_and_result_gives_a_fresh_one(
    emulator_factory: EmulatorFactory,
) -> None:
    emulator = emulator_factory(result_url_ttl_s=2.0)
    with make_client(emulator) as client:
        request_id = generate(client, T2V, SMALL_T2V)
        first = completed_url(client, T2V, request_id)
        assert is_mp4(httpx.get(first, timeout=30))
        unsigned = first.split("?")[0]
        for bad in (unsigned, unsigned + "?signature=forged"):
            assert httpx.get(bad).status_code == 403
        time.sleep(2.3)
        expired = httpx.get(first)
        assert expired.status_code == 403
        assert b"AccessDenied" in expired.content and b"expired" in expired.content
        second = get_result(client, T2V, request_id).json()["data"]["url"]
        assert second != first
        assert is_mp4(httpx.get(second, timeout=30))
        assert httpx.head(second).status_code == 200
        assert httpx.get(first).status_code == 403  # the old one stays dead


def test_retry_after_as_an_http_date(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory(retry_after_http_date=True, rate_limit=1.0)
    emulator.add_fault("status", "429", retry_after=5)
    emulator.add_fault("status", "503", retry_after=3)
    emulator.add_fault("status", "500")
    with make_client(emulator) as client:
        responses = [get_status(client, T2V, "req_0000000000000000") for _ in range(5)]
    before = time.time()
    codes = [r.status_code for r in responses]
    assert codes[:3] == [429, 503, 500] and codes[3] == 404 and codes[4] == 429
    assert "retry-after" not in responses[2].headers
    for response, seconds in ((responses[0], 5), (responses[1], 3), (responses[4], 1)):
        header = response.headers["retry-after"]
        assert IMF_FIXDATE.fullmatch(header), header
        delta = parsedate_to_datetime(header).timestamp() - before
        assert seconds - 3 <= delta <= seconds + 1, (header, delta)


def test_failed_messages_echo_the_request(
    emulator_factory: EmulatorFactory, client: httpx.Client
) -> None:
    body = {**SMALL_T2V, "prompt": f"A red kite over dunes {FAIL_MARKER}", "seed": 4242}
    echoing = emulator_factory(echo_request_in_failures=True)
    with make_client(echoing) as echo_client:
        request_id = generate(echo_client, T2V, body)
        data = wait_terminal(echo_client, T2V, request_id)
        failed = get_result(echo_client, T2V, request_id)
    assert data["status"] == "FAILED" and failed.status_code == 409
    for text in (data["message"], data["logs"][-1], failed.json()["message"]):
        assert "A red kite over dunes" in text and '"seed": 4242' in text
        assert '"resolution": "480p"' in text
    # by default a failure names its reason only
    plain = wait_terminal(client, T2V, generate(client, T2V, body))
    assert plain["status"] == "FAILED"
    assert "A red kite" not in plain["message"] and "4242" not in plain["logs"][-1]


def test_echo_api_key_puts_the_key_everywhere(
    emulator_factory: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvid_dagster.emulator")
    key = "sekrit-key-123"
    emulator = emulator_factory(api_key=key, echo_api_key=True)
    with make_client(emulator, key=key) as client:
        response = post_generate(client, T2V, {**SMALL_T2V, "prompt": f"x {FAIL_MARKER}"})
        assert response.headers["x-debug-key"] == key
        request_id = response.json()["data"]["request_id"]
        data = wait_terminal(client, T2V, request_id)
        assert data["status"] == "FAILED"
        assert key in data["message"] and key in data["logs"][0] and key in data["logs"][-1]
        assert key in get_result(client, T2V, request_id).json()["message"]
    with make_client(emulator, key="sekrit-wrong-456") as client:
        denied = get_status(client, T2V, request_id)
        assert denied.status_code == 401 and denied.headers["x-debug-key"] == "sekrit-wrong-456"
    assert key in caplog.text and "sekrit-wrong-456" in caplog.text
    assert "sekrit" not in repr(emulator.config)


def test_fault_match_targets_a_request_by_what_it_carries(
    emulator: KvidEmulator, client: httpx.Client
) -> None:
    fault = emulator.add_fault("generate", "500", match="target")
    assert fault.match == "target"
    generate(client, T2V, {**SMALL_T2V, "prompt": "an innocent prompt"})
    assert client.post(f"/ai/video/{T2V}/generate", content=b"{not json").status_code == 422
    assert [f.match for f in emulator.pending_faults()] == ["target"]  # not consumed
    response = post_generate(client, T2V, {**SMALL_T2V, "prompt": "the target prompt"})
    assert response.status_code == 500 and emulator.jobs_created == 1
    assert emulator.pending_faults() == []

    first = generate(client, T2V, SMALL_T2V)
    second = generate(client, T2V, SMALL_T2V)
    emulator.add_fault("status", "503", times=2, match=second)
    emulator.add_fault("status", "502")  # order-based, behind the matched one
    assert get_status(client, T2V, first).status_code == 502  # passes the matched fault by
    assert get_status(client, T2V, first).status_code == 200
    assert get_status(client, T2V, second).status_code == 503
    assert get_status(client, T2V, first).status_code == 200
    assert get_status(client, T2V, second).status_code == 503
    assert get_status(client, T2V, second).status_code == 200

    url_first, url_second = (completed_url(client, T2V, rid) for rid in (first, second))
    emulator.add_fault("*", "500", match=second)  # result and files alike
    assert get_result(client, T2V, first).status_code == 200
    assert httpx.get(url_first, timeout=30).status_code == 200
    assert httpx.get(url_second, timeout=30).status_code == 500
    assert is_mp4(httpx.get(url_second, timeout=30))
    with pytest.raises(ValueError):
        emulator.add_fault("status", "500", match="")


def test_command_line_realistic(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "kvid_dagster.emulator", "--port", "0", "--realistic"]
    command += ["--job-duration", "0.1", "--output-dir", str(tmp_path / "out")]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        with httpx.Client(base_url=base_url, headers={"api-key": "k"}, timeout=30) as client:
            url = completed_url(client, T2V, generate(client, T2V, SMALL_T2V))
        assert httpx.URL(url).port != httpx.URL(base_url).port and "signature=" in url
        assert is_mp4(httpx.get(url, timeout=30))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
