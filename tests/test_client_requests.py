"""Typed requests: bodies, validation, canonical hash, output geometry and build_request.

No server is needed: everything here happens before the first byte goes out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvid_dagster.client import (
    MAX_IMAGE_BYTES,
    MAX_PROMPT_CHARS,
    V2_IMAGE_TO_VIDEO_MODEL,
    V2_TEXT_TO_VIDEO_MODEL,
    ImageToVideoV1,
    ImageToVideoV2,
    JobKind,
    KvidValidationError,
    TextToVideoV1,
    TextToVideoV2,
    build_request,
)

# enough of a PNG for the client's format check (the emulator never sees these files)
PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\x00" * 56
URL = "https://images.example.com/tiger.png"


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(PNG_HEAD)
    return path


# ---- bodies -----------------------------------------------------------------------------------


def test_v1_text_to_video_body_spells_out_every_default() -> None:
    request = TextToVideoV1("A waterfall")
    assert request.job_kind is JobKind.TEXT_TO_VIDEO and request.model == "v1"
    assert request.to_body() == {
        "prompt": "A waterfall",
        "negative_prompt": "",
        "num_frames": 81,
        "frames_per_second": 16,
        "seed": None,
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "num_inference_steps": 30,
        "enable_safety_checker": True,
        "enable_prompt_expansion": True,
    }


def test_v1_image_to_video_body_with_url_defaults_to_auto() -> None:
    body = ImageToVideoV1("Make it move", URL, seed=7).to_body()
    assert body["image_url"] == URL and "image_file" not in body
    assert body["aspect_ratio"] == "auto" and body["seed"] == 7 and "model" not in body


def test_local_image_is_sent_as_base64_image_file(png: Path) -> None:
    request = ImageToVideoV1("Make it move", png)
    body = request.to_body()
    assert "image_url" not in body
    assert base64.b64decode(body["image_file"]) == PNG_HEAD
    assert Path(request.image) == png.absolute()


def test_v2_bodies_carry_the_model_id() -> None:
    t2v = TextToVideoV2("Sunset", resolution="1080p", duration="10", camera_fixed=True)
    assert t2v.model == "v2" and t2v.job_kind is JobKind.TEXT_TO_VIDEO
    assert t2v.to_body() == {
        "prompt": "Sunset",
        "aspect_ratio": "16:9",
        "resolution": "1080p",
        "duration": "10",
        "camera_fixed": True,
        "seed": None,
        "model": V2_TEXT_TO_VIDEO_MODEL,
    }
    i2v = ImageToVideoV2("Pan", URL, end_image="https://x.example/end.png")
    body = i2v.to_body()
    assert body["model"] == V2_IMAGE_TO_VIDEO_MODEL
    assert body["image_url"] == URL and body["end_image_url"] == "https://x.example/end.png"
    assert ImageToVideoV2("Pan", URL).to_body()["end_image_url"] is None


def test_requests_are_frozen() -> None:
    request = TextToVideoV1("x")
    with pytest.raises(AttributeError):
        request.num_frames = 90  # type: ignore[misc]


# ---- validation -------------------------------------------------------------------------------

INVALID: list[tuple[type, dict[str, Any], str, str]] = [
    (
        TextToVideoV1,
        {"num_frames": 120},
        "num_frames",
        "num_frames=120 is out of range: allowed 81–100",
    ),
    (TextToVideoV1, {"num_frames": 80}, "num_frames", "out of range"),
    (TextToVideoV1, {"num_frames": True}, "num_frames", "wrong type (bool)"),
    (TextToVideoV1, {"num_frames": 81.0}, "num_frames", "wrong type (float)"),
    (TextToVideoV1, {"num_frames": "81"}, "num_frames", "wrong type (str)"),
    (TextToVideoV1, {"frames_per_second": 4}, "frames_per_second", "allowed 5–24"),
    (TextToVideoV1, {"frames_per_second": 25}, "frames_per_second", "allowed 5–24"),
    (TextToVideoV1, {"resolution": "1080p"}, "resolution", "allowed 480p, 580p, 720p"),
    (TextToVideoV1, {"aspect_ratio": "auto"}, "aspect_ratio", "allowed 16:9, 9:16"),
    (TextToVideoV1, {"aspect_ratio": "1:1"}, "aspect_ratio", "not allowed"),
    (TextToVideoV1, {"num_inference_steps": 0}, "num_inference_steps", "≥ 1"),
    (TextToVideoV1, {"seed": 1.5}, "seed", "wrong type"),
    (TextToVideoV1, {"seed": False}, "seed", "wrong type"),
    (TextToVideoV1, {"seed": 2**63}, "seed", "out of range"),
    (TextToVideoV1, {"enable_safety_checker": "true"}, "enable_safety_checker", "wrong type"),
    (TextToVideoV1, {"enable_prompt_expansion": 1}, "enable_prompt_expansion", "wrong type"),
    (TextToVideoV1, {"negative_prompt": None}, "negative_prompt", "wrong type"),
    (TextToVideoV1, {"negative_prompt": "a\x00b"}, "negative_prompt", "control character"),
    (TextToVideoV2, {"resolution": "580p"}, "resolution", "allowed 480p, 720p, 1080p"),
    (TextToVideoV2, {"aspect_ratio": "9:16"}, "aspect_ratio", "allowed 16:9, 4:3, 1:1, 9:21"),
    (TextToVideoV2, {"duration": 5}, "duration", "wrong type (int)"),
    (TextToVideoV2, {"duration": "7"}, "duration", "allowed 5, 10"),
    (TextToVideoV2, {"camera_fixed": "false"}, "camera_fixed", "wrong type"),
]


@pytest.mark.parametrize(("cls", "kwargs", "field", "fragment"), INVALID)
def test_invalid_fields_name_field_value_and_allowed(
    cls: type, kwargs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(KvidValidationError) as caught:
        cls("a prompt", **kwargs)
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert caught.value.status_code is None  # raised by the client, not the server


@pytest.mark.parametrize(
    "prompt",
    ["", "   \n\t", 5, None, "x" * (MAX_PROMPT_CHARS + 1), "bell\x07", "cr\r", "del\x7f", "c1\x85"],
)
def test_bad_prompts_are_refused(prompt: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        TextToVideoV2(prompt)
    assert caught.value.field == "prompt"


def test_prompt_may_hold_newlines_tabs_and_any_script() -> None:
    prompt = "호랑이가 눈을 깜빡인다.\n\t[Low-angle close-up shot]" + "x" * 9000
    assert TextToVideoV1(prompt).to_body()["prompt"] == prompt


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 81, "frames_per_second": 5},
        {"num_frames": 100, "frames_per_second": 24},
        {"seed": -1},
        {"seed": 0},
    ],
)
def test_boundaries_are_accepted(kwargs: dict[str, Any]) -> None:
    assert TextToVideoV1("x", **kwargs).to_body().items() >= kwargs.items()


@pytest.mark.parametrize(
    "image",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "https://",
        "http://exa mple.com/a.png",
        "does/not/exist.png",
        42,
        b"/tmp/x.png",
    ],
)
def test_bad_images_are_refused(image: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        ImageToVideoV1("x", image)
    assert caught.value.field == "image"


def test_image_file_must_be_a_real_image_of_sane_size(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:  # sparse: costs no disk
        handle.write(PNG_HEAD)
        handle.truncate(MAX_IMAGE_BYTES + 1)
    for path, fragment in [
        (empty, "unusable size (0 bytes)"),
        (text, "not a known image format"),
        (huge, f"unusable size ({MAX_IMAGE_BYTES + 1} bytes)"),
        (tmp_path, "is not a file"),
    ]:
        with pytest.raises(KvidValidationError, match=r"image=") as caught:
            ImageToVideoV2("x", path)
        assert fragment in str(caught.value)


def test_end_image_is_a_url_only(png: Path) -> None:
    for end in (str(png), "ftp://x.example/e.png"):
        with pytest.raises(KvidValidationError) as caught:
            ImageToVideoV2("x", URL, end_image=end)
        assert caught.value.field == "end_image"


def test_other_model_fields_are_errors_not_silently_dropped() -> None:
    with pytest.raises(TypeError, match="num_frames"):
        TextToVideoV2("x", num_frames=81)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="duration"):
        TextToVideoV1("x", duration="5")  # type: ignore[call-arg]


def test_a_huge_value_is_abbreviated_in_the_message() -> None:
    with pytest.raises(KvidValidationError) as caught:
        TextToVideoV1("x" * (MAX_PROMPT_CHARS + 500))
    assert len(str(caught.value)) < 300
    assert caught.value.value == "x" * (MAX_PROMPT_CHARS + 500)  # the attribute keeps it whole


# ---- canonical hash ---------------------------------------------------------------------------


def test_canonical_hash_is_sha256_of_sorted_compact_body() -> None:
    request = TextToVideoV2("Sunset", seed=3)
    body = request.to_body()
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert request.canonical_hash() == expected


def test_defaults_make_the_canonical_form_explicit() -> None:
    assert TextToVideoV1("p").canonical_hash() == TextToVideoV1("p", num_frames=81).canonical_hash()
    assert TextToVideoV1("p").canonical_hash() != TextToVideoV1("p", num_frames=82).canonical_hash()
    assert TextToVideoV1("p").canonical_hash() != TextToVideoV1("p ").canonical_hash()


def test_local_image_counts_by_content_not_path(tmp_path: Path, png: Path) -> None:
    copy = tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    copy.write_bytes(png.read_bytes())
    first, second = ImageToVideoV1("x", png), ImageToVideoV1("x", copy)
    assert first.canonical_hash() == second.canonical_hash()
    copy.write_bytes(PNG_HEAD + b"changed")
    assert ImageToVideoV1("x", copy).canonical_hash() != first.canonical_hash()
    # a URL to the same picture is a different request (the server fetches it)
    assert ImageToVideoV1("x", URL).canonical_hash() != first.canonical_hash()


def test_hash_input_holds_the_image_digest_not_the_base64(png: Path) -> None:
    digest = hashlib.sha256(png.read_bytes()).hexdigest()
    hashed = ImageToVideoV1("x", png)._body(for_hash=True)
    assert hashed["image_file"] == f"sha256:{digest}"


def test_v1_and_v2_bodies_never_collide() -> None:
    hashes = {
        TextToVideoV1("same").canonical_hash(),
        TextToVideoV2("same").canonical_hash(),
        ImageToVideoV1("same", URL).canonical_hash(),
        ImageToVideoV2("same", URL).canonical_hash(),
    }
    assert len(hashes) == 4


V1_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "negative_prompt": st.text(alphabet="abc", max_size=20),
        "num_frames": st.integers(81, 100),
        "frames_per_second": st.integers(5, 24),
        "seed": st.none() | st.integers(0, 2**31),
        "resolution": st.sampled_from(["480p", "580p", "720p"]),
        "aspect_ratio": st.sampled_from(["16:9", "9:16"]),
        "num_inference_steps": st.integers(1, 80),
        "enable_safety_checker": st.booleans(),
        "enable_prompt_expansion": st.booleans(),
    },
)


@settings(max_examples=60, deadline=None)
@given(params=V1_PARAMS, order_seed=st.integers(0, 1000))
def test_hash_ignores_parameter_order_and_loose_spellings(
    params: dict[str, Any], order_seed: int
) -> None:
    strict = TextToVideoV1("walk", **params)
    items = list(params.items())
    random.Random(order_seed).shuffle(items)
    # the same values as a spreadsheet would hold them: ints as floats, bools as strings
    loose = {
        k: float(v) if type(v) is int else (str(v).upper() if isinstance(v, bool) else v)
        for k, v in items
    }
    assert build_request("walk", **loose).canonical_hash() == strict.canonical_hash()


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(["num_frames", "frames_per_second"]),
    value=st.integers(-(10**6), 10**6).filter(lambda v: not 5 <= v <= 100),
)
def test_every_out_of_range_value_names_its_field(field: str, value: int) -> None:
    with pytest.raises(KvidValidationError) as caught:
        TextToVideoV1("x", **{field: value})
    assert caught.value.field == field and f"{field}={value}" in str(caught.value)


# ---- output geometry --------------------------------------------------------------------------

GEOMETRY = [
    (TextToVideoV1("x"), (1280, 720, 16, 81)),
    (
        TextToVideoV1("x", aspect_ratio="9:16", num_frames=90, frames_per_second=24),
        (720, 1280, 24, 90),
    ),
    (TextToVideoV1("x", resolution="580p"), (1032, 580, 16, 81)),
    (TextToVideoV1("x", resolution="480p"), (854, 480, 16, 81)),
    (ImageToVideoV1("x", URL, aspect_ratio="1:1"), (720, 720, 16, 81)),
    (TextToVideoV2("x", aspect_ratio="4:3"), (960, 720, 24, 120)),
    (TextToVideoV2("x", aspect_ratio="9:21", duration="10"), (720, 1680, 24, 240)),
    (TextToVideoV2("x", resolution="1080p"), (1920, 1080, 24, 120)),
    (TextToVideoV2("x", resolution="480p", aspect_ratio="1:1"), (480, 480, 24, 120)),
    (ImageToVideoV2("x", URL, resolution="480p"), (854, 480, 24, 120)),
]


@pytest.mark.parametrize(("request_", "expected"), GEOMETRY)
def test_output_geometry_follows_the_contract(request_: Any, expected: tuple[int, ...]) -> None:
    assert request_.output_geometry() == expected


@pytest.mark.parametrize(
    ("image_size", "resolution", "expected"),
    [
        ((1000, 500), "480p", (960, 480)),
        ((500, 1000), "480p", (480, 960)),
        ((640, 640), "720p", (720, 720)),
        ((1920, 1080), "580p", (1032, 580)),
        ((1000, 333), "480p", (1442, 480)),
    ],
)
def test_auto_aspect_follows_the_image(
    image_size: tuple[int, int], resolution: str, expected: tuple[int, int]
) -> None:
    request = ImageToVideoV1("x", URL, resolution=resolution)
    assert request.output_geometry(image_size)[:2] == expected


def test_auto_aspect_without_image_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="image_size"):
        ImageToVideoV1("x", URL).output_geometry()
    with pytest.raises(ValueError, match="positive"):
        ImageToVideoV1("x", URL).output_geometry((0, 10))


# ---- build_request ----------------------------------------------------------------------------


def test_job_follows_the_image_and_model_picks_the_type(png: Path) -> None:
    assert type(build_request("x")) is TextToVideoV1
    assert type(build_request("x", image=png)) is ImageToVideoV1
    assert type(build_request("x", model="v2")) is TextToVideoV2
    assert type(build_request("x", model=V2_IMAGE_TO_VIDEO_MODEL, image=URL)) is ImageToVideoV2
    assert type(build_request("x", model=V2_TEXT_TO_VIDEO_MODEL, job="text-to-video")) is (
        TextToVideoV2
    )
    assert type(build_request("x", model="", job=JobKind.IMAGE_TO_VIDEO, image=URL)) is (
        ImageToVideoV1
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"model": V2_TEXT_TO_VIDEO_MODEL, "image": URL}, "model", "does not match"),
        ({"model": V2_IMAGE_TO_VIDEO_MODEL}, "model", "does not match"),
        ({"model": "v3"}, "model", "is not a model"),
        ({"job": "video-to-video"}, "job", "is not a job kind"),
        ({"job": "image-to-video"}, "image", "required"),
        ({"job": "text-to-video", "image": URL}, "image", "not allowed for text-to-video"),
        ({"model": "v2", "num_frames": 81}, "num_frames", "belongs to v1"),
        ({"model": "v1", "duration": "5"}, "duration", "belongs to v2"),
        ({"model": "v1", "camera_fixed": False}, "camera_fixed", "belongs to v2"),
        ({"frames": 81}, "frames", "is not a parameter of v1 text-to-video"),
        ({"frames": None}, "frames", "is not a parameter"),
        ({"end_image": URL, "image": URL}, "end_image", "only with v2 image-to-video"),
        ({"num_frames": 81.5}, "num_frames", "not a whole number"),
        ({"num_frames": "81.0"}, "num_frames", "wrong type"),
        ({"num_frames": True}, "num_frames", "wrong type"),
        ({"num_frames": float("inf")}, "num_frames", "not a whole number"),
        ({"enable_safety_checker": "yes"}, "enable_safety_checker", "wrong type"),
        ({"enable_safety_checker": 1}, "enable_safety_checker", "wrong type"),
        ({"model": "v2", "duration": 7}, "duration", "allowed 5, 10"),
        ({"model": "v2", "duration": True}, "duration", "wrong type"),
        ({"model": "v2", "duration": 5.5}, "duration", "not a whole number"),
        ({"image_file": "AAAA", "image": URL}, "image_file", "is not a parameter"),
        ({"image_url": URL, "image": URL}, "image_url", "conflicts with image"),
        ({"resolution": 720}, "resolution", "wrong type"),
    ],
)
def test_build_request_errors_name_the_field(
    kwargs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(KvidValidationError) as caught:
        build_request("a prompt", **kwargs)
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_blank_cells_mean_the_api_default() -> None:
    blank: dict[str, Any] = {
        "negative_prompt": "",
        "num_frames": None,
        "frames_per_second": float("nan"),
        "seed": "",
        "resolution": "  ",
        "duration": None,  # another model's column, empty in this row
        "camera_fixed": float("nan"),
    }
    assert build_request("x", **blank) == TextToVideoV1("x")


def test_loose_values_are_normalised() -> None:
    request = build_request(
        "x",
        num_frames=81.0,
        frames_per_second=np.int64(12),
        seed="42",
        enable_safety_checker="FALSE",
        enable_prompt_expansion=np.bool_(False),
        resolution=" 480p ",
        num_inference_steps=np.float64(20.0),
    )
    assert request == TextToVideoV1(
        "x",
        num_frames=81,
        frames_per_second=12,
        seed=42,
        enable_safety_checker=False,
        enable_prompt_expansion=False,
        resolution="480p",
        num_inference_steps=20,
    )
    assert type(request.frames_per_second) is int and type(request.seed) is int


@pytest.mark.parametrize(("value", "expected"), [(5, "5"), (10, "10"), (10.0, "10"), ("10", "10")])
def test_duration_numbers_become_the_wire_string(value: Any, expected: str) -> None:
    assert build_request("x", model="v2", duration=value).to_body()["duration"] == expected


def test_relative_images_resolve_against_base_dir(tmp_path: Path, png: Path) -> None:
    (tmp_path / "imgs").mkdir()
    target = tmp_path / "imgs" / "a.png"
    target.write_bytes(PNG_HEAD)
    request = build_request("x", image="imgs/a.png", base_dir=tmp_path)
    assert isinstance(request, ImageToVideoV1) and Path(request.image) == target
    with pytest.raises(KvidValidationError, match="does not exist"):
        build_request("x", image="imgs/a.png", base_dir=tmp_path / "imgs")
    assert Path(build_request("x", image=os.path.relpath(png)).image) == png.absolute()


def test_wire_names_are_accepted_as_aliases() -> None:
    end = "https://x.example/end.png"
    request = build_request("x", model="v2", image_url=URL, end_image_url=end)
    assert isinstance(request, ImageToVideoV2)
    assert request.to_body()["image_url"] == URL and request.end_image == end


def test_build_request_prompt_rules_match_the_dataclass() -> None:
    for prompt in ("", None, 3, "\x1b[31m"):
        with pytest.raises(KvidValidationError) as caught:
            build_request(prompt)
        assert caught.value.field == "prompt"
