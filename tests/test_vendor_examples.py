"""The vendor pages' own Python examples, run against the emulator.

The seed page's snippets below are copied verbatim from shared/seed/kvid-video-api.ko.txt
(sections 1-4). Only three things are substituted when they run, each by a plain text
replacement:
- the base URL ``https://api.kvid.ai`` -> the emulator's base URL;
- the image URL placeholder ``https://your-image-url.jpg`` -> a sample image on a local server;
- the placeholder ``"req_12345abcdef"`` in the status and result snippets -> the request id
  the generate snippet printed (the page's comment says to use the id from the generate call).
The page's text lost the indentation of the status loop's body and of the ``if``/``else`` of
the result snippet; it is restored here (Python needs it), nothing else changed. The status
loop's ``time.sleep(5)`` is real: the test sees one PROCESSING poll, sleeps 5 s while the
renders run, then sees COMPLETED.

The current English page's snippets (the "generation" dialect, both published revisions: see
``ENGLISH_PAGE``) are copied verbatim too, and substituted the same way: the base URL, the
page's placeholder image URLs and its example job id. That page shows each call on its own
(generate-async, status, result, each printing ``response.json()``) and has no polling loop or
download code: the test runs the status snippet unchanged in a loop until the job ends, and
downloads ``result_url`` itself, with the same ``requests``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest
import requests
from conftest import EmulatorFactory

from kvid_dagster.emulator import EmulatorConfig, KvidEmulator

VENDOR_BASE_URL = "https://api.kvid.ai"
VENDOR_IMAGE_URL = "https://your-image-url.jpg"
VENDOR_REQUEST_ID = '"req_12345abcdef"'

# 1. Text-to-Video 생성 — v1 모델 요청 예제
T2V_V1 = """
import requests
import json

url = "https://api.kvid.ai/ai/video/text-to-video/generate"
api_key = "YOUR_API_KEY"

# v1 모델 (wan-t2v)
payload = json.dumps({
"prompt": "A waterfall flowing down a mountain, nature documentary style",
"negative_prompt": "low quality, bad anatomy",
"num_frames": 81,
"frames_per_second": 16,
"seed": None,
"resolution": "720p",
"aspect_ratio": "16:9",
"num_inference_steps": 30,
"enable_safety_checker": True,
"enable_prompt_expansion": True
})

headers = {
'api-key': api_key,
'Content-Type': 'application/json'
}

response = requests.request("POST", url, headers=headers, data=payload)
result = response.json()
request_id = result['data']['request_id']
print(f"Request ID: {request_id}")
"""

# 1. Text-to-Video 생성 — v2 모델 요청 예제 (continues the v1 snippet: same url and headers)
T2V_V2 = """
# v2 모델 (bytedance/seedance)
payload = json.dumps({
"prompt": "A beautiful sunset over the ocean",
"aspect_ratio": "16:9",
"resolution": "1080p",
"duration": "5",
"camera_fixed": False,
"seed": None,
"model": "bytedance/seedance/v1/lite/text-to-video"
})

response = requests.request("POST", url, headers=headers, data=payload)
"""

# 2. Image-to-Video 생성 — v1 모델 요청 예제
I2V_V1 = """
import requests
import json

url = "https://api.kvid.ai/ai/video/image-to-video/generate"
api_key = "YOUR_API_KEY"

# v1 모델 (wan-i2v)
payload = json.dumps({
"prompt": "Make the subject move naturally",
"negative_prompt": "low quality, bad anatomy",
"num_frames": 81,
"frames_per_second": 16,
"seed": None,
"resolution": "720p",
"aspect_ratio": "auto",
"num_inference_steps": 30,
"enable_safety_checker": True,
"enable_prompt_expansion": True,
"image_url": "https://your-image-url.jpg"
})

headers = {
'api-key': api_key,
'Content-Type': 'application/json'
}

response = requests.request("POST", url, headers=headers, data=payload)
result = response.json()
request_id = result['data']['request_id']
print(f"Request ID: {request_id}")
"""

# 2. Image-to-Video 생성 — v2 모델 요청 예제 (continues the v1 snippet)
I2V_V2 = """
# v2 모델 (bytedance/seedance)
payload = json.dumps({
"prompt": "Camera panning across the scene",
"resolution": "1080p",
"duration": "5",
"camera_fixed": False,
"seed": None,
"model": "bytedance/seedance/v1/lite/image-to-video",
"image_url": "https://your-image-url.jpg"
})

response = requests.request("POST", url, headers=headers, data=payload)
"""

# 3. 생성 상태 조회 — 상태 확인 예제
STATUS_LOOP = """
import requests
import time

api_key = "YOUR_API_KEY"
request_id = "req_12345abcdef" # 생성 요청에서 받은 request_id

# Text-to-Video 상태 확인
url = f"https://api.kvid.ai/ai/video/text-to-video/status?request_id={request_id}"

headers = {
'api-key': api_key
}

# 상태 폴링
while True:
    response = requests.get(url, headers=headers)
    result = response.json()

    status = result['data']['status']
    progress = result['data']['progress']

    print(f"Status: {status}, Progress: {progress}%")

    if status == 'COMPLETED':
        print("비디오 생성 완료!")
        break
    elif status == 'FAILED':
        print("비디오 생성 실패")
        break

    time.sleep(5) # 5초 대기
"""

# 4. 비디오 결과 가져오기 — 결과 조회 예제
RESULT = """
import requests

api_key = "YOUR_API_KEY"
request_id = "req_12345abcdef"

# Text-to-Video 결과 조회
url = f"https://api.kvid.ai/ai/video/text-to-video/result?request_id={request_id}"

headers = {
'api-key': api_key
}

response = requests.get(url, headers=headers)
result = response.json()

if result['success']:
    video_url = result['data']['url']
    video_name = result['data']['name']
    video_size = result['data']['size']

    print(f"비디오 URL: {video_url}")
    print(f"파일명: {video_name}")
    print(f"파일 크기: {video_size} KB")
else:
    print(f"오류: {result['message']}")
"""


def run_snippet(
    code: str,
    namespace: dict[str, Any],
    *,
    base_url: str,
    placeholders: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """exec a vendor snippet with only the base URL and the page's ``placeholders`` (image URLs,
    an example id; each must be in it) replaced."""
    code = code.replace(VENDOR_BASE_URL, base_url)  # the v2 snippets reuse the v1 ``url``
    for placeholder, value in (placeholders or {}).items():
        assert placeholder in code, placeholder
        code = code.replace(placeholder, value)
    exec(compile(code, "<vendor example>", "exec"), namespace)
    return namespace


def probe(path: Path) -> tuple[int, int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.width, stream.height, int(stream.average_rate), frames


def fetch(url: str, dest: Path) -> Path:
    response = requests.get(url, timeout=60)
    assert response.status_code == 200
    dest.write_bytes(response.content)
    return dest


def test_vendor_python_examples_run_unchanged(
    emulator_factory: EmulatorFactory,
    image_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the snippets send the literal key "YOUR_API_KEY": make it the one the emulator accepts;
    # 2 s jobs, so the first status poll sees PROCESSING and the loop's 5 s sleep is exercised
    emulator: KvidEmulator = emulator_factory(
        EmulatorConfig(api_key="YOUR_API_KEY", workers=4, job_duration=2.0)
    )
    base = emulator.base_url

    # 1. and 2.: the four generate snippets (each v2 snippet continues its v1 snippet)
    t2v = run_snippet(T2V_V1, {}, base_url=base)
    t2v_v1_id = t2v["request_id"]
    run_snippet(T2V_V2, t2v, base_url=base)
    t2v_v2_id = t2v["response"].json()["data"]["request_id"]
    salmon = {VENDOR_IMAGE_URL: f"{image_server}/salmon_dish.jpg"}
    i2v = run_snippet(I2V_V1, {}, base_url=base, placeholders=salmon)
    i2v_v1_id = i2v["request_id"]
    run_snippet(
        I2V_V2, i2v, base_url=base, placeholders={VENDOR_IMAGE_URL: f"{image_server}/tiger.jpg"}
    )
    i2v_v2_id = i2v["response"].json()["data"]["request_id"]

    printed = capsys.readouterr().out
    assert printed.splitlines() == [f"Request ID: {t2v_v1_id}", f"Request ID: {i2v_v1_id}"]
    assert emulator.jobs_created == 4
    assert {info.model for info in emulator.jobs.values()} == {"v1", "v2"}

    # 3. the status loop and 4. the result call, for each text-to-video job
    videos: dict[str, Path] = {}
    for n, request_id in enumerate((t2v_v1_id, t2v_v2_id)):
        placeholder = {VENDOR_REQUEST_ID: f'"{request_id}"'}
        run_snippet(STATUS_LOOP, {}, base_url=base, placeholders=placeholder)
        lines = capsys.readouterr().out.splitlines()
        assert lines[-2:] == ["Status: COMPLETED, Progress: 100%", "비디오 생성 완료!"]
        if n == 0:  # polled while the job ran, slept its 5 s, then saw it done
            assert re.fullmatch(r"Status: PROCESSING, Progress: \d+%", lines[0])
            assert len(lines) == 3
        result = run_snippet(RESULT, {}, base_url=base, placeholders=placeholder)
        printed = capsys.readouterr().out
        assert f"비디오 URL: {base}/files/{request_id}.mp4" in printed
        assert result["video_name"] == f"{request_id}.mp4"
        path = fetch(result["video_url"], tmp_path / result["video_name"])
        assert f"파일 크기: {math.ceil(path.stat().st_size / 1024)} KB" in printed
        videos[request_id] = path

    # the page has no status/result snippet for image-to-video (its snippets hard-code
    # text-to-video): these two jobs are polled in test code, with the same library
    headers = {"api-key": "YOUR_API_KEY"}
    for request_id in (i2v_v1_id, i2v_v2_id):
        videos[request_id] = wait_and_fetch(base, "image-to-video", request_id, headers, tmp_path)

    assert probe(videos[t2v_v1_id]) == (1280, 720, 16, 81)  # 720p 16:9, 81 frames at 16 fps
    assert probe(videos[t2v_v2_id]) == (1920, 1080, 24, 120)  # 1080p 16:9, 24 fps x 5 s
    assert probe(videos[i2v_v1_id]) == (960, 720, 16, 81)  # auto: the 640x480 food photo, 4:3
    assert probe(videos[i2v_v2_id]) == (1920, 1080, 24, 120)  # v2's default aspect ratio, 16:9


def wait_and_fetch(
    base: str, kind: str, request_id: str, headers: dict[str, str], dest: Path
) -> Path:
    status_url = f"{base}/ai/video/{kind}/status?request_id={request_id}"
    deadline = time.monotonic() + 60
    while True:
        status = requests.get(status_url, headers=headers, timeout=30).json()["data"]["status"]
        if status in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == "COMPLETED"
    result_url = f"{base}/ai/video/{kind}/result?request_id={request_id}"
    data = requests.get(result_url, headers=headers, timeout=60).json()["data"]
    return fetch(data["url"], dest / data["name"])


# the page's usage examples (section "사용 예제"): its sample prompts, with our sample images
PAVILION = (
    "A traditional Korean pavilion by a lotus pond, with two small dogs (a white poodle and a "
    "brown shiba inu) joyfully running along the wooden walkway. The pond is filled with green "
    "lotus leaves, and the background is full of lush green trees. Bright sunny day, peaceful "
    "and vivid atmosphere."
)
PAVILION_FOLLOW_UP = (
    " The two small dogs (white poodle and brown shiba inu) approach the pavilion, wagging their "
    "tails, playfully interacting. They stop at the end of the deck, looking around curiously. "
    "[Over-the-shoulder shot] Captures the view of the park and lotus pond from behind the dogs."
)
SALMON = (
    "Remove the cooking effect and only add camera movement. highlight the food in Zoom format. "
    "promotional video for this food"
)
TIGER = (
    "The tiger briefly pulls back its tongue, blinks, and tilts its head slightly. Then "
    "immediately sticks out its tongue for a second time, a bit longer than the first, while "
    "lowering its head slightly. [Low-angle close-up shot] Capture from below to show both "
    "majesty and cuteness."
)
HIKER = "A video of a man hiking with a backpack. The bag must be the main subject. Walking slowly"
VACUUM = "Video of cleaning with a vacuum cleaner. slow movement. low angle"
USAGE_EXAMPLES = [
    # (id, prompt, sample image for v1 image-to-video or None for text-to-video, output size)
    ("hiker", HIKER, None, (854, 480)),
    ("vacuum", VACUUM, None, (854, 480)),
    ("salmon", SALMON, "salmon_dish.jpg", (640, 480)),
    ("pavilion", PAVILION, "pavilion_park.jpg", (722, 480)),  # 480 * 640/426 = 721.1 -> 722
    ("pavilion-t2v", PAVILION + PAVILION_FOLLOW_UP, None, (854, 480)),
    ("tiger", TIGER, "tiger.jpg", (480, 600)),
]


@pytest.mark.parametrize(
    ("prompt", "image", "size"), [e[1:] for e in USAGE_EXAMPLES], ids=[e[0] for e in USAGE_EXAMPLES]
)
def test_vendor_usage_examples_generate(
    emulator_factory: EmulatorFactory,
    image_server: str,
    tmp_path: Path,
    prompt: str,
    image: str | None,
    size: tuple[int, int],
) -> None:
    emulator = emulator_factory(EmulatorConfig(api_key="YOUR_API_KEY", job_duration=0.2))
    headers = {"api-key": "YOUR_API_KEY", "Content-Type": "application/json"}
    body: dict[str, Any] = {"prompt": prompt, "resolution": "480p"}
    kind = "text-to-video"
    if image is not None:  # v1 image-to-video, aspect_ratio "auto" by default
        kind = "image-to-video"
        body["image_url"] = f"{image_server}/{image}"
    url = f"{emulator.base_url}/ai/video/{kind}/generate"
    response = requests.request("POST", url, headers=headers, data=json.dumps(body))
    assert response.status_code == 200, response.text
    request_id = response.json()["data"]["request_id"]
    path = wait_and_fetch(emulator.base_url, kind, request_id, headers, tmp_path)
    assert probe(path)[:2] == size


# --- the current English page (docs.kvid.ai/docs/api-services/video-api): the generation dialect

# Its two published revisions, verbatim (the kvidai/kvidai-documentation repository,
# docs/api-services/video-api.md at a4627e0 and at 27fa603). The earlier: models v1/v2/v3, the
# key resolves the credit pool. The later: models wan/seedance/veo3.1 and a model path, a
# reference-to-video endpoint, and one of product_id/product_code/email in every body.
EARLIER_T2V = """
import requests

url = "https://api.kvid.ai/ai/generation/text-to-video/generate-async"
api_key = "YOUR_API_KEY"

payload = {
    "prompt": "[Truck left, Pan right] A woman is drinking coffee.",
    "model": "v2",          # v1 / v2 / v3
    "resolution": "720p",   # 480p / 720p / 1080p (model-dependent)
}
headers = {
    "api-key": api_key,
    "Content-Type": "application/json",
}

response = requests.post(url, headers=headers, json=payload)
print(response.json())
"""

EARLIER_I2V = """
import requests

url = "https://api.kvid.ai/ai/generation/image-to-video/generate-async"
api_key = "YOUR_API_KEY"

payload = {
    "prompt": "The tiger briefly pulls back its tongue, blinks, tilts its head slightly.",
    "image_url": "https://your-host.example/tiger.jpg",
    "model": "v2",
    "resolution": "720p",
}
headers = {
    "api-key": api_key,
    "Content-Type": "application/json",
}

response = requests.post(url, headers=headers, json=payload)
print(response.json())
"""

EARLIER_STATUS = """
import requests

api_key = "YOUR_API_KEY"
job_id = "vid_1777360165746_abc123"

url = f"https://api.kvid.ai/ai/generation/status?jobId={job_id}"
headers = {"api-key": api_key}

response = requests.get(url, headers=headers)
print(response.json())
"""

EARLIER_RESULT = """
import requests

api_key = "YOUR_API_KEY"
job_id = "vid_1777360165746_abc123"

url = f"https://api.kvid.ai/ai/generation/result?jobId={job_id}"
headers = {"api-key": api_key}

response = requests.get(url, headers=headers)
print(response.json())
"""

LATER_T2V = """
import requests

url = "https://api.kvid.ai/ai/generation/text-to-video/generate-async"
api_key = "YOUR_API_KEY"

payload = {
    "product_id": "pdt_XXXXXXXXXXXX",   # or product_code / email — required
    "prompt": "A beautiful sunset over the ocean",
    "model": "veo3.1",                   # wan / seedance / veo3.1
    "function": "txt2vid",
    "resolution": "720p",                # 480p / 720p / 1080p (model-dependent)
    "duration": 4,
    "aspect_ratio": "16:9",
    "seed": 5834
}
headers = {
    "api-key": api_key,
    "Content-Type": "application/json",
}

response = requests.post(url, headers=headers, json=payload)
print(response.json())
"""

LATER_I2V = """
import requests

url = "https://api.kvid.ai/ai/generation/image-to-video/generate-async"
api_key = "YOUR_API_KEY"

payload = {
    "product_id": "pdt_XXXXXXXXXXXX",   # or product_code / email — required
    "prompt": "windy, forest, autumn",
    "model": "wan",
    "function": "img2vid",
    "image_url": "https://your-host.example/scene.png",   # or image_file (base64)
    "resolution": "720p",
    "duration": 5,
    "aspect_ratio": "auto",              # auto follows the input image ratio
    "seed": 5834
}
headers = {
    "api-key": api_key,
    "Content-Type": "application/json",
}

response = requests.post(url, headers=headers, json=payload)
print(response.json())
"""

LATER_R2V = """
import requests

url = "https://api.kvid.ai/ai/generation/reference-to-video/generate-async"
api_key = "YOUR_API_KEY"

payload = {
    "product_id": "pdt_XXXXXXXXXXXX",   # or product_code / email — required
    "prompt": "the character from the reference image walks through a neon city at night",
    "model": "bytedance/seedance-2.0/fast/reference-to-video",
    "function": "ref2vid",
    "image_urls": ["https://your-host.example/ref-character.png"],
    "video_urls": [],
    "audio_urls": [],
    "resolution": "720p",
    "duration": 5,             # 4–15 (integer) or "auto"
    "aspect_ratio": "auto",
    "generate_audio": True,
    "seed": 5834
}
headers = {
    "api-key": api_key,
    "Content-Type": "application/json",
}

response = requests.post(url, headers=headers, json=payload)
print(response.json())
"""

LATER_STATUS = """
import requests

api_key = "YOUR_API_KEY"
job_id = "job_1768540311147_4mcdv65c7"

url = f"https://api.kvid.ai/ai/generation/status?jobId={job_id}"
headers = {"api-key": api_key}

response = requests.get(url, headers=headers)
print(response.json())
"""

LATER_RESULT = """
import requests

api_key = "YOUR_API_KEY"
job_id = "job_1768540311147_4mcdv65c7"

url = f"https://api.kvid.ai/ai/generation/result?jobId={job_id}"
headers = {"api-key": api_key}

response = requests.get(url, headers=headers)
print(response.json())
"""


@dataclass(frozen=True)
class Generate:
    """One generate-async snippet and what its video must be (the contract's rule)."""

    snippet: str
    images: Mapping[str, str]  # the page's placeholder URL -> our sample image
    size: tuple[int, int]
    frames: int  # at 24 fps
    used_credit: int  # the emulator's default prices


@dataclass(frozen=True)
class Revision:
    generates: tuple[Generate, ...]
    status: str
    result: str
    job_id: str  # the page's example id in its status and result snippets


ENGLISH_PAGE = {
    "earlier-v1-v2-v3": Revision(
        generates=(
            # v2 at 720p, 16:9 and 5 s by default: 54 credits, the page's own used_credit
            Generate(EARLIER_T2V, {}, (1280, 720), 120, 54),
            # auto: the 480x600 tiger photo's 4:5 at 720p
            Generate(
                EARLIER_I2V,
                {"https://your-host.example/tiger.jpg": "tiger.jpg"},
                (720, 900),
                120,
                54,
            ),
        ),
        status=EARLIER_STATUS,
        result=EARLIER_RESULT,
        job_id="vid_1777360165746_abc123",
    ),
    "later-wan-seedance-veo": Revision(
        generates=(
            Generate(LATER_T2V, {}, (1280, 720), 96, 240),  # veo 720p (assumed 300 per 5 s)
            # auto: the 640x426 park photo at 720p (720 * 640/426 = 1081.7 -> 1082)
            Generate(
                LATER_I2V,
                {"https://your-host.example/scene.png": "pavilion_park.jpg"},
                (1082, 720),
                120,
                120,
            ),
            Generate(
                LATER_R2V,
                {"https://your-host.example/ref-character.png": "tiger.jpg"},
                (720, 900),
                120,
                54,
            ),
        ),
        status=LATER_STATUS,
        result=LATER_RESULT,
        job_id="job_1768540311147_4mcdv65c7",
    ),
}


def printed_json(capsys: pytest.CaptureFixture[str], response: requests.Response) -> Any:
    """What a snippet printed (``print(response.json())``), checked against the response."""
    printed = capsys.readouterr().out.strip()
    assert ast.literal_eval(printed) == response.json()
    return response.json()


@pytest.mark.parametrize("revision", ENGLISH_PAGE.values(), ids=ENGLISH_PAGE.keys())
def test_english_page_python_examples_run_unchanged(
    emulator_factory: EmulatorFactory,
    image_server: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    revision: Revision,
) -> None:
    # the snippets send the literal key "YOUR_API_KEY"; 2 s jobs, so that the first job is
    # polled while it runs
    emulator: KvidEmulator = emulator_factory(
        EmulatorConfig(api_key="YOUR_API_KEY", workers=4, job_duration=2.0)
    )
    base = emulator.base_url
    job_ids = []
    for generate in revision.generates:
        images = {url: f"{image_server}/{name}" for url, name in generate.images.items()}
        namespace = run_snippet(generate.snippet, {}, base_url=base, placeholders=images)
        answer = printed_json(capsys, namespace["response"])
        assert answer["success"] is True and answer["data"]["status"] == "queued"
        job_ids.append(answer["data"]["job_id"])
    assert emulator.jobs_created == len(revision.generates)

    for n, (generate, job_id) in enumerate(zip(revision.generates, job_ids, strict=True)):
        # the status snippet, unchanged but for the id, in the loop the page leaves to us
        example_id = {revision.job_id: job_id}
        seen = []
        deadline = time.monotonic() + 120
        while True:
            namespace = run_snippet(revision.status, {}, base_url=base, placeholders=example_id)
            data = printed_json(capsys, namespace["response"])["data"]
            seen.append(data["status"])
            if data["status"] in ("completed", "failed", "canceled"):
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
        assert seen[-1] == "completed" and set(seen[:-1]) <= {"queued", "processing"}
        if n == 0:
            assert len(seen) > 1  # it was polled while it ran
        namespace = run_snippet(revision.result, {}, base_url=base, placeholders=example_id)
        data = printed_json(capsys, namespace["response"])["data"]
        assert (data["job_id"], data["status"]) == (job_id, "completed")
        assert data["used_credit"] == generate.used_credit
        path = fetch(data["result_url"], tmp_path / f"{job_id}.mp4")
        assert data["size"] == path.stat().st_size  # bytes
        assert (data["width"], data["height"]) == generate.size
        assert probe(path) == (*generate.size, 24, generate.frames)
