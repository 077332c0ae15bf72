"""Validation of generate bodies against the contract's parameter tables (shared/kvid-api.md).

Every error names the field, the value received and what is allowed, so a 422 tells the caller
exactly what to fix. The emulator is standalone: these tables restate the contract rather than
import the client's request classes, so the two implementations check each other.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit


class EmulatedDialect(StrEnum):
    """The two API dialects the emulator serves at once (their paths differ); named apart
    from the client's dialects, which the emulator does not import."""

    VIDEO = "video"  # the seed page: /ai/video/{kind}/generate, ?request_id=
    GENERATION = "generation"  # the current English page: /ai/generation/..., ?jobId=


TEXT_TO_VIDEO: Final = "text-to-video"
IMAGE_TO_VIDEO: Final = "image-to-video"
REFERENCE_TO_VIDEO: Final = "reference-to-video"  # the generation dialect only
JOB_KINDS: Final = (TEXT_TO_VIDEO, IMAGE_TO_VIDEO)
V2_MODELS: Final = {
    TEXT_TO_VIDEO: "bytedance/seedance/v1/lite/text-to-video",
    IMAGE_TO_VIDEO: "bytedance/seedance/v1/lite/image-to-video",
}
MAX_URL_LENGTH: Final = 2048

_REQUIRED: Final = object()


@dataclass(frozen=True)
class FieldSpec:
    """One parameter: JSON type, default (or required), and its allowed values or range."""

    name: str
    type: str  # "str" | "int" | "number" | "bool" | "int|null" | "str|null"
    default: Any = _REQUIRED
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    non_empty: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def allowed(self) -> str:
        """What the contract allows, in words (part of every 422 message)."""
        if self.choices is not None:
            kind = "string" if self.type.startswith("str") else self.type
            return f"one of {', '.join(json.dumps(c) for c in self.choices)} ({kind})"
        if self.type.startswith("int"):
            if self.minimum is not None and self.maximum is not None:
                text = f"an integer {self.minimum}-{self.maximum}"
            elif self.minimum is not None:
                text = f"an integer >= {self.minimum}"
            else:
                text = "an integer"
        elif self.type.startswith("number"):
            text = "a number"
        elif self.type.startswith("bool"):
            text = "true or false"
        else:
            text = "a non-empty string" if self.non_empty else "a string"
        return text + (" or null" if self.type.endswith("|null") else "")


def _v1_common() -> list[FieldSpec]:
    return [
        FieldSpec("prompt", "str", non_empty=True),
        FieldSpec("negative_prompt", "str", ""),
        FieldSpec("num_frames", "int", 81, minimum=81, maximum=100),
        FieldSpec("frames_per_second", "int", 16, minimum=5, maximum=24),
        FieldSpec("seed", "int|null", None),
        FieldSpec("resolution", "str", "720p", choices=("480p", "580p", "720p")),
        # the page gives no range; anything below one step is meaningless
        FieldSpec("num_inference_steps", "int", 30, minimum=1),
        FieldSpec("enable_safety_checker", "bool", True),
        FieldSpec("enable_prompt_expansion", "bool", True),
    ]


def _v2_common(kind: str) -> list[FieldSpec]:
    return [
        FieldSpec("prompt", "str", non_empty=True),
        FieldSpec("model", "str", choices=(V2_MODELS[kind],)),
        FieldSpec("aspect_ratio", "str", "16:9", choices=("16:9", "4:3", "1:1", "9:21")),
        FieldSpec("resolution", "str", "720p", choices=("480p", "720p", "1080p")),
        FieldSpec("duration", "str", "5", choices=("5", "10")),
        FieldSpec("camera_fixed", "bool", False),
        FieldSpec("seed", "int|null", None),
    ]


_IMAGE_FIELDS: Final = [
    FieldSpec("image_url", "str|null", None),
    FieldSpec("image_file", "str|null", None),
]

SCHEMAS: Final[dict[tuple[str, str], dict[str, FieldSpec]]] = {
    (TEXT_TO_VIDEO, "v1"): {
        f.name: f
        for f in [*_v1_common(), FieldSpec("aspect_ratio", "str", "16:9", choices=("16:9", "9:16"))]
    },
    (IMAGE_TO_VIDEO, "v1"): {
        f.name: f
        for f in [
            *_v1_common(),
            FieldSpec("aspect_ratio", "str", "auto", choices=("auto", "16:9", "9:16", "1:1")),
            *_IMAGE_FIELDS,
        ]
    },
    (TEXT_TO_VIDEO, "v2"): {f.name: f for f in _v2_common(TEXT_TO_VIDEO)},
    (IMAGE_TO_VIDEO, "v2"): {
        f.name: f
        for f in [
            *_v2_common(IMAGE_TO_VIDEO),
            *_IMAGE_FIELDS,
            FieldSpec("end_image_url", "str|null", None),
        ]
    },
}


@dataclass(frozen=True)
class FieldError:
    """One validation problem; ``str()`` is the message fragment sent in the 422."""

    field: str
    value: Any
    problem: str
    allowed: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem} (got {show(self.value)}); allowed: {self.allowed}"


class RequestInvalid(Exception):
    """The body breaks the contract; ``str()`` is the full 422 message."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class ValidRequest:
    """A generate body that passed validation, with every default filled in."""

    kind: str
    model: str  # "v1" | "v2"
    params: dict[str, Any]
    image_bytes: bytes | None = None  # the decoded ``image_file``, if one was sent


MISSING: Final = object()
"""A field the body does not carry (shown as "nothing" in messages)."""


def show(value: Any) -> str:
    """A value as a message shows it: JSON, cut at 80 characters."""
    if value is MISSING:
        return "nothing"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_ok(spec: FieldSpec, value: Any) -> bool:
    if value is None:
        return spec.type.endswith("|null")
    base = spec.type.split("|")[0]
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1
    if base == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


def _type_words(spec: FieldSpec) -> str:
    base = spec.type.split("|")[0]
    words = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string"}[
        base
    ]
    return words + (" or null" if spec.type.endswith("|null") else "")


def check_field(spec: FieldSpec, value: Any) -> FieldError | None:
    """The first problem of a present ``value`` against its spec, or None."""
    if not _type_ok(spec, value):
        return FieldError(spec.name, value, f"must be {_type_words(spec)}", spec.allowed())
    if value is None:
        return None
    if spec.choices is not None and value not in spec.choices:
        return FieldError(spec.name, value, "not an allowed value", spec.allowed())
    if isinstance(value, int) and not isinstance(value, bool):
        too_low = spec.minimum is not None and value < spec.minimum
        too_high = spec.maximum is not None and value > spec.maximum
        if too_low or too_high:
            return FieldError(spec.name, value, "out of range", spec.allowed())
    if spec.non_empty and isinstance(value, str) and not value.strip():
        return FieldError(spec.name, value, "must not be empty", spec.allowed())
    return None


def _misplaced(name: str, kind: str, model: str) -> str:
    """Why a field does not belong to this body: v1/v2 mix-ups and kind mix-ups get named."""
    other_model = "v2" if model == "v1" else "v1"
    if name in SCHEMAS[(kind, other_model)]:
        if other_model == "v2":
            return "v2 (Seedance) only; a body without a 'model' field is v1 (Wan)"
        return "v1 (Wan) only; a body with a 'model' field is v2 (Seedance)"
    other_kind = IMAGE_TO_VIDEO if kind == TEXT_TO_VIDEO else TEXT_TO_VIDEO
    if name in SCHEMAS[(other_kind, model)]:
        return f"{other_kind} only, not accepted by {kind}"
    if name in SCHEMAS[(other_kind, other_model)]:
        return f"{other_kind} {other_model} only, not accepted by {kind} {model}"
    return "unknown field"


def check_url(name: str, value: str, what: str = "image") -> FieldError | None:
    """An http(s) URL the emulator can fetch (``what`` it should point at, for the message)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(value) > MAX_URL_LENGTH:
        return FieldError(
            name,
            value,
            f"not a usable {what} URL",
            f"an http:// or https:// URL (<= {MAX_URL_LENGTH})",
        )
    return None


def decode_image_file(value: str, max_bytes: int) -> tuple[bytes | None, FieldError | None]:
    """An ``image_file`` (base64, or a data URL) decoded, or the problem naming the field."""
    text = value.strip()
    if text.startswith("data:") and "," in text:  # tolerate data URLs
        text = text.split(",", 1)[1]
    allowed = f"the image as base64 (at most {max_bytes} bytes decoded)"
    if len(text) > (max_bytes * 4) // 3 + 8:
        return None, FieldError(
            "image_file", f"<{len(text)} base64 characters>", "too large", allowed
        )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None, FieldError(
            "image_file", f"<{len(value)} characters>", "not valid base64", allowed
        )
    if not data:
        return None, FieldError("image_file", value, "empty image", allowed)
    return data, None


def model_of(body: Mapping[str, Any]) -> str:
    """The contract's rule: a body with a ``model`` field is v2, one without is v1."""
    return "v2" if "model" in body else "v1"


def validate_body(kind: str, body: Any, *, max_image_bytes: int) -> ValidRequest:
    """Check a generate body for ``kind``; raise :class:`RequestInvalid` naming every bad field."""
    if not isinstance(body, dict):
        raise RequestInvalid([FieldError("body", body, "must be a JSON object", "a JSON object")])
    model = model_of(body)
    schema = SCHEMAS[(kind, model)]
    errors: list[FieldError] = []
    params: dict[str, Any] = {}

    for name, value in body.items():
        if name not in schema:
            allowed = f"the {kind} {model} fields: {', '.join(schema)}"
            errors.append(FieldError(name, value, _misplaced(name, kind, model), allowed))
    for name, spec in schema.items():
        value = body.get(name, MISSING)
        if value is MISSING:
            if spec.required:
                errors.append(FieldError(name, value, "required", spec.allowed()))
                continue
            value = spec.default
        elif (error := check_field(spec, value)) is not None:
            errors.append(error)
            continue
        params[name] = value

    image_bytes: bytes | None = None
    if kind == IMAGE_TO_VIDEO:
        # null counts as absent: clients that fill every key send the unused one as null
        url, file = body.get("image_url"), body.get("image_file")
        one_of = "exactly one of image_url (an http(s) URL) or image_file (base64)"
        if url is None and file is None and "image_url" not in {e.field for e in errors}:
            errors.append(FieldError("image_url", MISSING, "required", one_of))
        elif url is not None and file is not None:
            errors.append(
                FieldError(
                    "image_file",
                    "<base64>",
                    "given together with image_url: send one, not both",
                    one_of,
                )
            )
        if isinstance(url, str) and (error := check_url("image_url", url)) is not None:
            errors.append(error)
        if isinstance(file, str) and url is None:
            image_bytes, error = decode_image_file(file, max_image_bytes)
            if error is not None:
                errors.append(error)
        end_url = body.get("end_image_url")
        end_error = check_url("end_image_url", end_url) if isinstance(end_url, str) else None
        if model == "v2" and end_error is not None:
            errors.append(end_error)

    if errors:
        raise RequestInvalid(errors)
    return ValidRequest(kind=kind, model=model, params=params, image_bytes=image_bytes)
