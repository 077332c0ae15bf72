"""The generation dialect (the vendor's current English page): body rules, codes and words.

Restated from shared/kvid-api.md ("The current dialect") and the page's two published revisions
(docs.kvid.ai/docs/api-services/video-api), without importing the client, so that the two
implementations check each other. Where the revisions disagree, both readings are accepted:
``model`` in either vocabulary (``v1``/``v2``/``v3``, ``wan``/``seedance``/``veo3.1``) or a full
model path; ``function`` optional; the credit-pool fields (``product_id``/``product_code``/
``email``) optional, at most one; ``num_inference_steps``, ``enable_safety_checker`` and
``enable_prompt_expansion`` with any model (one revision lists them as common fields).

What the page leaves open, resolved here (the emulator's rules; tests rely on them):

- A field sent as ``null`` is a wrong type, not an absent one: the page never sends null.
- No ``model``: the later revision's default, ``wan``; no ``resolution``: its ``480p``.
- ``duration``: integer seconds, 4-15 (the page's "typically 4–15 s"); reference-to-video also
  ``"auto"``, rendered as 5 s. Default 5.
- The video: short side = the resolution's number, long side by the aspect ratio (``auto``
  follows the input image; text-to-video has none, so its ``auto`` is 16:9); 24 fps x duration.
  A v1-family (Wan) model takes ``frames_per_second`` and ``num_frames`` (an alternative to
  ``duration``, not both) within the seed page's ranges for the same model (5-24 fps, 81-100
  frames); other models ignore them, as the gateway "sanitizes and ignores" what a model
  does not take.
- Reference-to-video needs at least one reference and renders from the first image (else the
  first frame of the first video). The page's "≤ 15 s combined" for videos and for audio is not
  checked: the emulator fetches only the reference it renders from.
- A full model path that names a job kind (``.../reference-to-video``) must match the endpoint.
- The price (``used_credit``) is the model family's credits per 5 s clip at the resolution
  (``EmulatorConfig.generation_prices``), times duration / 5, rounded up; a ``num_frames`` clip
  is one base clip.
- Fields the page does not list for the endpoint are ignored, as the gateway ignores fields a
  model does not take; ``EmulatorConfig.strict_fields`` refuses them (400, named).
"""

from __future__ import annotations

import math
import secrets
import string
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from kvid_dagster.emulator.jobs import EmulatedJobState
from kvid_dagster.emulator.validation import (
    IMAGE_TO_VIDEO,
    MISSING,
    REFERENCE_TO_VIDEO,
    TEXT_TO_VIDEO,
    FieldError,
    FieldSpec,
    check_field,
    check_url,
    decode_image_file,
)


class ErrorCode(StrEnum):
    """The page's error codes (the body's ``code``; a 403 for the api-key has none)."""

    MISSING_PARAMETERS = "MISSING_PARAMETERS"  # 400: not created
    INVALID_PARAMETERS = "INVALID_PARAMETERS"  # 400: not created
    INSUFFICIENT_CREDIT = "INSUFFICIENT_CREDIT"  # 402: not created
    CONCURRENT_LIMIT = "CONCURRENT_LIMIT"  # 429: not created
    JOB_NOT_FOUND = "JOB_NOT_FOUND"  # 404
    JOB_NOT_COMPLETED = "JOB_NOT_COMPLETED"  # 400 on result: queued / processing (or canceled)
    JOB_FAILED = "JOB_FAILED"  # 400 on result: the reason is the status's error_message


class ModelFamily(StrEnum):
    """What a model name prices and renders as."""

    WAN = "wan"  # v1, self-hosted: takes num_frames / frames_per_second
    SEEDANCE = "seedance"  # v2
    VEO = "veo"  # v3


GENERATION_KINDS: Final = (TEXT_TO_VIDEO, IMAGE_TO_VIDEO, REFERENCE_TO_VIDEO)
FUNCTIONS: Final = MappingProxyType(
    {TEXT_TO_VIDEO: "txt2vid", IMAGE_TO_VIDEO: "img2vid", REFERENCE_TO_VIDEO: "ref2vid"}
)
GENERATION_MODELS: Final = (
    *("v1", "v2", "v3"),  # one revision's vocabulary
    *("wan", "seedance", "veo3.1"),  # the other's
    "bytedance/seedance-2.0/fast/reference-to-video",  # the page's full model path
)
DEFAULT_MODEL: Final = "wan"
RESOLUTIONS: Final = ("480p", "720p", "1080p")
DEFAULT_RESOLUTION: Final = "480p"
ASPECT_RATIOS: Final = ("16:9", "9:16", "1:1", "auto")
PRICE_SECONDS: Final = 5
GENERATION_PRICES: Final[Mapping[ModelFamily, Mapping[str, int]]] = MappingProxyType(
    {
        # the vendor's price page, per 5 s clip; "assumed": a figure it does not give, so
        # that every documented resolution has a price (2x the one below, as Wan's 720p is)
        ModelFamily.WAN: {"480p": 60, "720p": 120, "1080p": 240},  # 1080p assumed
        ModelFamily.SEEDANCE: {"480p": 39, "720p": 54, "1080p": 89},
        ModelFamily.VEO: {"480p": 150, "720p": 300, "1080p": 600},  # 720p, 1080p assumed
    }
)
FPS: Final = 24
DURATION_RANGE: Final = (4, 15)
DEFAULT_DURATION: Final = 5
MAX_IMAGE_REFS: Final = 9
MAX_VIDEO_REFS: Final = 3
MAX_AUDIO_REFS: Final = 3
MAX_REFS: Final = 12
STATUS_WORDS: Final = MappingProxyType(
    {
        EmulatedJobState.IN_QUEUE: "queued",
        EmulatedJobState.PROCESSING: "processing",
        EmulatedJobState.COMPLETED: "completed",
        EmulatedJobState.FAILED: "failed",
        EmulatedJobState.CANCELED: "canceled",
    }
)

_ALIASES: Final = {"v1": ModelFamily.WAN, "v2": ModelFamily.SEEDANCE, "v3": ModelFamily.VEO}
_CREDIT_POOL: Final = ("product_id", "product_code", "email")
_REF_LISTS: Final = (
    ("image_urls", MAX_IMAGE_REFS, "image"),
    ("video_urls", MAX_VIDEO_REFS, "video"),
    ("audio_urls", MAX_AUDIO_REFS, "audio"),
)
_ID_ALPHABET: Final = string.digits + string.ascii_lowercase


def model_family(model: str) -> ModelFamily | None:
    """``v1``/``v2``/``v3`` by alias, a name or path by the family it names; None: none."""
    if model in _ALIASES:
        return _ALIASES[model]
    lowered = model.lower()
    return next((family for family in ModelFamily if family.value in lowered), None)


def _specs(kind: str) -> dict[str, FieldSpec]:
    """The page's fields for ``kind`` that are checked one by one (``duration`` and the
    reference lists have rules of their own)."""
    specs = [
        *(FieldSpec(name, "str", None, non_empty=True) for name in _CREDIT_POOL),
        FieldSpec("prompt", "str", non_empty=True),
        FieldSpec("model", "str", None, non_empty=True),
        FieldSpec("function", "str", None, choices=tuple(FUNCTIONS.values())),
        FieldSpec("negative_prompt", "str", None),
        FieldSpec("resolution", "str", None, choices=RESOLUTIONS),
        FieldSpec("aspect_ratio", "str", None, choices=ASPECT_RATIOS),
        FieldSpec("seed", "int", None),
        FieldSpec("num_frames", "int", None, minimum=81, maximum=100),
        FieldSpec("frames_per_second", "int", None, minimum=5, maximum=24),
        FieldSpec("num_inference_steps", "int", None, minimum=1),
        FieldSpec("guidance_scale", "number", None),
        FieldSpec("shift", "number", None),
        FieldSpec("enable_safety_checker", "bool", None),
        FieldSpec("enable_prompt_expansion", "bool", None),
        FieldSpec("acceleration", "str", None, choices=("regular", "high")),
    ]
    if kind == IMAGE_TO_VIDEO:
        specs += [FieldSpec(name, "str", None) for name in ("image_url", "image_file")]
    if kind == REFERENCE_TO_VIDEO:
        specs.append(FieldSpec("generate_audio", "bool", None))
    return {spec.name: spec for spec in specs}


SPECS: Final = MappingProxyType({kind: _specs(kind) for kind in GENERATION_KINDS})
DOCUMENTED: Final = MappingProxyType(
    {
        kind: (
            *SPECS[kind],
            "duration",
            *((name for name, _, _ in _REF_LISTS) if kind == REFERENCE_TO_VIDEO else ()),
        )
        for kind in GENERATION_KINDS
    }
)
"""Every field the page lists for each endpoint (what strict mode accepts)."""


def undocumented_fields(kind: str, body: Mapping[str, Any]) -> list[str]:
    """The body's fields the page does not list for ``kind`` (ignored, or refused if strict)."""
    return [name for name in body if name not in DOCUMENTED[kind]]


@dataclass(frozen=True)
class GenerationRequest:
    """A generation-dialect body that passed validation, reduced to what the emulator uses."""

    kind: str
    model: str  # as sent, or DEFAULT_MODEL
    family: ModelFamily
    prompt: str
    seed: int | None
    resolution: str
    aspect_ratio: str  # "auto": the input image decides (never for text-to-video)
    fps: int
    frames: int
    seconds: int  # what the price scales with
    image_bytes: bytes | None = None  # image-to-video's decoded image_file
    source_url: str | None = None  # the image (or video) the render animates

    def price(self, prices: Mapping[ModelFamily, Mapping[str, int]]) -> int:
        """Credits this job costs (``used_credit``)."""
        return math.ceil(prices[self.family][self.resolution] * self.seconds / PRICE_SECONDS)


class GenerationInvalid(Exception):
    """The body breaks the page's rules; ``str()`` is the 400's message, ``code`` its code."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))

    @property
    def code(self) -> ErrorCode:
        if any(e.problem == "required" for e in self.errors):
            return ErrorCode.MISSING_PARAMETERS
        return ErrorCode.INVALID_PARAMETERS


def validate_generation(
    kind: str,
    body: Any,
    *,
    models: Collection[str],
    strict: bool,
    max_image_bytes: int,
) -> GenerationRequest:
    """Check a generate-async body for ``kind``; raise :class:`GenerationInvalid` naming every
    bad field. ``models``: the accepted model names; ``strict``: refuse undocumented fields."""
    if not isinstance(body, dict):
        raise GenerationInvalid(
            [FieldError("body", body, "must be a JSON object", "a JSON object")]
        )
    errors: list[FieldError] = []
    if strict:
        allowed = f"the documented {kind} fields: {', '.join(DOCUMENTED[kind])}"
        errors += [
            FieldError(name, body[name], f"not a documented {kind} field", allowed)
            for name in undocumented_fields(kind, body)
        ]
    for name, spec in SPECS[kind].items():
        value = body.get(name, MISSING)
        if spec.required and (value is MISSING or _blank(value)):
            errors.append(FieldError(name, value, "required", spec.allowed()))
        elif value is not MISSING and (error := check_field(spec, value)) is not None:
            errors.append(error)
    bad = {e.field for e in errors}

    model = body.get("model", DEFAULT_MODEL)
    if "model" not in bad:
        errors += _model_errors(kind, model, models)
    function = body.get("function")
    if "function" not in bad and function is not None and function != FUNCTIONS[kind]:
        allowed = f"{FUNCTIONS[kind]!r} for {kind}, or no function"
        errors.append(FieldError("function", function, "does not match the endpoint", allowed))
    pool = [name for name in _CREDIT_POOL if name in body]
    if len(pool) > 1:
        errors.append(
            FieldError(
                pool[1],
                body[pool[1]],
                f"given together with {pool[0]}",
                "at most one of " + ", ".join(_CREDIT_POOL),
            )
        )
    family = model_family(model) if isinstance(model, str) else None
    wan = family is ModelFamily.WAN
    errors += _duration_errors(kind, body, wan)

    image_bytes: bytes | None = None
    source_url: str | None = None
    if kind == IMAGE_TO_VIDEO:
        image_bytes, source_url = _image_input(body, bad, errors, max_image_bytes)
    elif kind == REFERENCE_TO_VIDEO:
        source_url = _references(body, errors)
    if errors:
        raise GenerationInvalid(errors)
    assert family is not None  # every accepted model has one (EmulatorConfig checks)

    duration = body.get("duration", DEFAULT_DURATION)
    seconds = duration if isinstance(duration, int) else DEFAULT_DURATION
    fps = body.get("frames_per_second", FPS) if wan else FPS
    frames = body["num_frames"] if wan and "num_frames" in body else fps * seconds
    if "duration" not in body and wan and "num_frames" in body:
        seconds = PRICE_SECONDS  # one base clip
    aspect = body.get("aspect_ratio", "16:9" if kind == TEXT_TO_VIDEO else "auto")
    return GenerationRequest(
        kind=kind,
        model=model,
        family=family,
        prompt=body["prompt"],
        seed=body.get("seed"),
        resolution=body.get("resolution", DEFAULT_RESOLUTION),
        aspect_ratio="16:9" if kind == TEXT_TO_VIDEO and aspect == "auto" else aspect,
        fps=fps,
        frames=frames,
        seconds=seconds,
        image_bytes=image_bytes,
        source_url=source_url,
    )


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _model_errors(kind: str, model: Any, models: Collection[str]) -> list[FieldError]:
    if model not in models:
        allowed = f"one of {', '.join(models)}"
        return [FieldError("model", model, "not an accepted model", allowed)]
    for other in GENERATION_KINDS:
        if other != kind and model.endswith(f"/{other}"):
            return [FieldError("model", model, f"a {other} model", f"a model for {kind}")]
    return []


def _duration_errors(kind: str, body: Mapping[str, Any], wan: bool) -> list[FieldError]:
    if "duration" not in body:
        return []
    value = body["duration"]
    low, high = DURATION_RANGE
    auto = kind == REFERENCE_TO_VIDEO
    allowed = f"an integer {low}-{high} (seconds)" + (' or "auto"' if auto else "")
    if auto and value == "auto":
        return []
    if not isinstance(value, int) or isinstance(value, bool):
        return [FieldError("duration", value, "must be an integer", allowed)]
    if not low <= value <= high:
        return [FieldError("duration", value, "out of range", allowed)]
    if wan and "num_frames" in body:
        problem = "given together with duration: they are alternatives"
        return [FieldError("num_frames", body["num_frames"], problem, "duration or num_frames")]
    return []


def _image_input(
    body: Mapping[str, Any], bad: set[str], errors: list[FieldError], max_image_bytes: int
) -> tuple[bytes | None, str | None]:
    """Image-to-video's one image: (decoded image_file, image_url); problems into ``errors``."""
    one_of = "exactly one of image_url (an http(s) URL) or image_file (base64)"
    if bad & {"image_url", "image_file"}:
        return None, None
    # blank is absent, as a gateway's ``if (!image_url)`` reads it
    url, file = (None if _blank(body.get(k)) else body.get(k) for k in ("image_url", "image_file"))
    if url is None and file is None:
        errors.append(FieldError("image_url", MISSING, "required", one_of))
        return None, None
    if url is not None and file is not None:
        errors.append(FieldError("image_file", "<base64>", "given together with image_url", one_of))
        return None, None
    if url is not None:
        if (error := check_url("image_url", url)) is not None:
            errors.append(error)
        return None, url
    data, error = decode_image_file(file, max_image_bytes)
    if error is not None:
        errors.append(error)
    return data, None


def _references(body: Mapping[str, Any], errors: list[FieldError]) -> str | None:
    """Reference-to-video's lists checked; the URL the render starts from (first image, else
    first video); problems into ``errors``."""
    lists: dict[str, list[str]] = {}
    for name, limit, what in _REF_LISTS:
        value = body.get(name, [])
        allowed = f"a list of at most {limit} http(s) {what} URLs"
        if not isinstance(value, list):
            errors.append(FieldError(name, value, "must be a list", allowed))
            continue
        if len(value) > limit:
            errors.append(FieldError(name, f"<{len(value)} URLs>", "too many", allowed))
        for i, url in enumerate(value):
            entry = f"{name}[{i}]"
            if not isinstance(url, str):
                errors.append(FieldError(entry, url, "must be a string", allowed))
            elif (error := check_url(entry, url, what)) is not None:
                errors.append(error)
        lists[name] = value
    if len(lists) < len(_REF_LISTS):
        return None
    images, videos, audio = lists["image_urls"], lists["video_urls"], lists["audio_urls"]
    total = len(images) + len(videos) + len(audio)
    if total > MAX_REFS:
        errors.append(
            FieldError(
                "image_urls",
                f"<{total} references>",
                "too many references in all",
                f"at most {MAX_REFS} image, video and audio URLs together",
            )
        )
    if not images and not videos:
        problem = "required with audio_urls" if audio else "required"
        allowed = "at least one image_urls or video_urls entry (audio alone is not enough)"
        errors.append(FieldError("image_urls", images, problem, allowed))
    return next(iter(images or videos), None)


def new_job_id() -> str:
    """``job_<epoch ms>_<9 base-36 characters>``, as the page's ``job_1768540311147_4mcdv65c7``."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
    return f"job_{time.time_ns() // 1_000_000}_{suffix}"


def iso_time(epoch: float) -> str:
    """``2026-05-27T09:00:00.000Z``, the page's ``created_at``."""
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
