"""Typed requests for the four kvid job kinds, with every default and rule of the contract.

The dataclasses are strict (a bool is not an int, ``duration`` is the string "5" or "10") and
validate in ``__post_init__``, so an invalid request never reaches the network (and never costs
credits). ``build_request`` is the loose front door for tables and CLIs: it normalises cells
(blank means "the API default", 81.0 means 81, "true" means True) and then builds the strict type.
One table of field specs (``_Spec``) drives both, so the rules live in one place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from .errors import KvidValidationError

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_CHARS",
    "V2_IMAGE_TO_VIDEO_MODEL",
    "V2_TEXT_TO_VIDEO_MODEL",
    "ImageToVideoV1",
    "ImageToVideoV2",
    "JobKind",
    "KvidRequest",
    "TextToVideoV1",
    "TextToVideoV2",
    "build_request",
    "canonical_json",
]


class JobKind(StrEnum):
    TEXT_TO_VIDEO = "text-to-video"
    IMAGE_TO_VIDEO = "image-to-video"


V2_TEXT_TO_VIDEO_MODEL = "bytedance/seedance/v1/lite/text-to-video"
V2_IMAGE_TO_VIDEO_MODEL = "bytedance/seedance/v1/lite/image-to-video"

MAX_PROMPT_CHARS = 10_000
# base64 grows an image by a third: 14 MiB of image is a body under 20 MiB, the request size
# servers commonly accept (the emulator's limit too). Refusing here is free; a 413 is not.
MAX_IMAGE_BYTES = 14 * 1024 * 1024
MAX_URL_CHARS = 2048
V2_FPS = 24
_SEED_RANGE = (-(2**63), 2**63 - 1)

# Magic numbers of the image formats an image-to-video model can take: catching a wrong file
# here is free, catching it on the server costs a job.
_IMAGE_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"\xff\xd8\xff"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (8, b"WEBP"),
    (0, b"BM"),
)


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 (the input of ``canonical_hash``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------------------------
# field specs: one rule per field, used strictly by the dataclasses and loosely by build_request
# --------------------------------------------------------------------------------------------

SpecKind = Literal["prompt", "text", "int", "seed", "choice", "bool", "image", "url"]


@dataclass(frozen=True)
class _Spec:
    kind: SpecKind
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed (seed, end_image)

    def allowed(self) -> str:
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind in ("int", "seed"):
            if self.kind == "seed":
                return "an integer or null"
            if self.hi is None:
                return f"an integer ≥ {self.lo}"
            return f"{self.lo}–{self.hi}"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "prompt":
            return f"a non-empty string of at most {MAX_PROMPT_CHARS} characters"
        if self.kind == "text":
            return f"a string of at most {MAX_PROMPT_CHARS} characters"
        if self.kind == "image":
            return f"an http(s) URL or an existing image file of at most {MAX_IMAGE_BYTES} bytes"
        return "an http(s) URL" + (" or null" if self.optional else "")

    def check(self, field: str, value: Any) -> None:
        """Strict check of a dataclass field (images are checked by ``_resolve_image``)."""
        if value is None and (self.optional or self.kind == "seed"):
            return
        if self.kind in ("prompt", "text"):
            _check_text(field, value, self, required=self.kind == "prompt")
        elif self.kind in ("int", "seed"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise _wrong_type(field, value, self)
            lo, hi = _SEED_RANGE if self.kind == "seed" else (self.lo, self.hi)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise KvidValidationError(field, value, self.allowed(), problem="is out of range")
        elif self.kind == "choice":
            if not isinstance(value, str):
                raise _wrong_type(field, value, self)
            if value not in self.choices:
                raise KvidValidationError(field, value, self.allowed(), problem="is not allowed")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise _wrong_type(field, value, self)
        elif self.kind == "url":
            _check_url(field, value, self)

    def coerce(self, field: str, value: Any) -> Any:
        """Loose normalisation of a table cell to the strict type (blank cells never get here)."""
        if self.kind in ("int", "seed"):
            return _coerce_int(field, value, self)
        if self.kind == "bool":
            return _coerce_bool(field, value, self)
        if self.kind == "choice":
            if isinstance(value, str):
                return value.strip()
            if field == "duration" and not _is_boolish(value):
                # duration is a string on the wire; a table may well hold the number 5
                number = _coerce_int(field, value, self)
                if str(number) in self.choices:
                    return str(number)
                raise KvidValidationError(field, value, self.allowed(), problem="is not allowed")
            raise _wrong_type(field, value, self)
        return value


def _wrong_type(field: str, value: Any, spec: _Spec) -> KvidValidationError:
    return KvidValidationError(
        field, value, spec.allowed(), problem=f"has the wrong type ({type(value).__name__})"
    )


def _check_text(field: str, value: Any, spec: _Spec, *, required: bool) -> None:
    if not isinstance(value, str):
        raise _wrong_type(field, value, spec)
    if required and not value.strip():
        raise KvidValidationError(field, value, spec.allowed(), problem="is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise KvidValidationError(
            field, value, spec.allowed(), problem=f"is too long ({len(value)} characters)"
        )
    for index, char in enumerate(value):
        if char not in "\n\t" and unicodedata.category(char) == "Cc":
            raise KvidValidationError(
                field,
                value,
                "printable text, newlines and tabs",
                problem=f"contains the control character {char!r} at index {index}",
            )


def _is_boolish(value: Any) -> bool:
    # numpy.bool_ is neither bool nor int, but is what a pandas bool column yields
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


def _coerce_int(field: str, value: Any, spec: _Spec) -> int:
    if _is_boolish(value):
        raise _wrong_type(field, value, spec)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        # a numeric column with an empty cell turns into floats: 81.0 is 81, 81.5 is an error
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise KvidValidationError(field, value, spec.allowed(), problem="is not a whole number")
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if digits.isascii() and digits.isdigit():
            return int(text)
    raise _wrong_type(field, value, spec)


def _coerce_bool(field: str, value: Any, spec: _Spec) -> bool:
    if _is_boolish(value):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _wrong_type(field, value, spec)


def _check_url(field: str, value: Any, spec: _Spec) -> str:
    if not isinstance(value, str):
        raise _wrong_type(field, value, spec)
    if len(value) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in value):
        raise KvidValidationError(field, value, spec.allowed(), problem="is not a usable URL")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise KvidValidationError(field, value, spec.allowed(), problem="has a forbidden scheme")
    if not parts.hostname:
        raise KvidValidationError(field, value, spec.allowed(), problem="has no host")
    return value


def _looks_like_url(text: str) -> bool:
    """True for anything with a scheme: 'https://…', but also 'file:…', 'javascript:…'."""
    if "://" in text:
        return True
    scheme, sep, _ = text.partition(":")
    return bool(sep) and scheme.lower() in (
        "file",
        "javascript",
        "data",
        "vbscript",
        "ftp",
        "about",
    )


def _resolve_image(field: str, value: Any, spec: _Spec, base_dir: Path | None = None) -> str | Path:
    """An image is an http(s) URL (kept as str) or a local image file (made an absolute Path)."""
    if isinstance(value, str) and _looks_like_url(value):
        return _check_url(field, value, spec)
    if not isinstance(value, str | os.PathLike):
        raise _wrong_type(field, value, spec)
    raw = os.fspath(value)
    if not isinstance(raw, str) or not raw.strip():
        raise _wrong_type(field, value, spec)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    path = Path(os.path.normpath(path.absolute()))  # "a/../b.png" and "b.png" are one image
    if not path.exists():
        raise KvidValidationError(field, str(path), spec.allowed(), problem="does not exist")
    if not path.is_file():
        raise KvidValidationError(field, str(path), spec.allowed(), problem="is not a file")
    size = path.stat().st_size
    if size == 0 or size > MAX_IMAGE_BYTES:
        raise KvidValidationError(
            field, str(path), spec.allowed(), problem=f"has an unusable size ({size} bytes)"
        )
    with path.open("rb") as handle:
        head = handle.read(16)
    if not any(head[offset : offset + len(magic)] == magic for offset, magic in _IMAGE_MAGIC):
        raise KvidValidationError(
            field, str(path), "PNG, JPEG, WebP, GIF or BMP", problem="is not a known image format"
        )
    return path


def _read_image(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:  # it grew since validation
        raise KvidValidationError(
            "image", str(path), f"at most {MAX_IMAGE_BYTES} bytes", problem="is too large"
        )
    return data


def _aspect(ratio: str) -> Fraction:
    width, _, height = ratio.partition(":")
    return Fraction(int(width), int(height))


def _round_even(value: Fraction) -> int:
    """Nearest even integer, halves rounded up (the emulator's rule for the long side)."""
    return 2 * math.floor(value / 2 + Fraction(1, 2))


def _frame_size(resolution: str, ratio: Fraction) -> tuple[int, int]:
    short = int(resolution.removesuffix("p"))
    if ratio >= 1:
        return _round_even(short * ratio), short
    return short, _round_even(short / ratio)


# --------------------------------------------------------------------------------------------
# the four request types
# --------------------------------------------------------------------------------------------

_PROMPT = _Spec("prompt")
_TEXT = _Spec("text")
_BOOL = _Spec("bool")
_SEED = _Spec("seed")
_IMAGE = _Spec("image")
_END_IMAGE = _Spec("url", optional=True)

_V1_SPECS: dict[str, _Spec] = {
    "prompt": _PROMPT,
    "negative_prompt": _TEXT,
    "num_frames": _Spec("int", 81, 100),
    "frames_per_second": _Spec("int", 5, 24),
    "seed": _SEED,
    "resolution": _Spec("choice", choices=("480p", "580p", "720p")),
    "aspect_ratio": _Spec("choice", choices=("16:9", "9:16")),
    "num_inference_steps": _Spec("int", 1, None),
    "enable_safety_checker": _BOOL,
    "enable_prompt_expansion": _BOOL,
}
_V2_SPECS: dict[str, _Spec] = {
    "prompt": _PROMPT,
    "aspect_ratio": _Spec("choice", choices=("16:9", "4:3", "1:1", "9:21")),
    "resolution": _Spec("choice", choices=("480p", "720p", "1080p")),
    "duration": _Spec("choice", choices=("5", "10")),
    "camera_fixed": _BOOL,
    "seed": _SEED,
}


@dataclass(frozen=True)
class _RequestBase:
    """Shared behaviour; subclasses declare fields and the ``_SPECS`` that validate them."""

    prompt: str

    job_kind: ClassVar[JobKind]
    model: ClassVar[Literal["v1", "v2"]]
    model_id: ClassVar[str | None] = None  # the body's "model" (v2 only)
    _SPECS: ClassVar[Mapping[str, _Spec]]

    def __post_init__(self) -> None:
        for name, spec in self._SPECS.items():
            value = getattr(self, name)
            if spec.kind == "image":
                # normalise so a later chdir cannot change what the request means
                object.__setattr__(self, name, _resolve_image(name, value, spec))
            else:
                spec.check(name, value)

    @classmethod
    def describe(cls) -> str:
        return f"{cls.model} {cls.job_kind.value}"

    def _body(self, *, for_hash: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name, spec in self._SPECS.items():
            value = getattr(self, name)
            if spec.kind == "image":
                if isinstance(value, Path):
                    data = _read_image(value)
                    body["image_file"] = (
                        "sha256:" + hashlib.sha256(data).hexdigest()
                        if for_hash
                        else base64.b64encode(data).decode("ascii")
                    )
                else:
                    body["image_url"] = value
            elif name == "end_image":
                body["end_image_url"] = value
            else:
                body[name] = value
        if self.model_id is not None:
            body["model"] = self.model_id
        return body

    def to_body(self) -> dict[str, Any]:
        """The exact JSON body for ``generate``, every default spelled out."""
        return self._body(for_hash=False)

    def canonical_hash(self) -> str:
        """sha256 hex of the canonical body; a local image counts by the sha256 of its bytes."""
        return hashlib.sha256(canonical_json(self._body(for_hash=True))).hexdigest()

    def _timing(self) -> tuple[int, int]:
        raise NotImplementedError

    def output_geometry(
        self, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """(width, height, fps, num_frames) of the video this request yields.

        ``aspect_ratio="auto"`` follows the input image, so it needs ``image_size`` (w, h).
        """
        aspect_ratio: str = getattr(self, "aspect_ratio", "16:9")
        resolution: str = getattr(self, "resolution", "720p")
        if aspect_ratio == "auto":
            if image_size is None:
                raise ValueError("aspect_ratio='auto' follows the input image: pass image_size")
            width, height = image_size
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 < height):
                raise ValueError(f"image_size must be two positive ints, got {image_size!r}")
            ratio = Fraction(width, height)
        else:
            ratio = _aspect(aspect_ratio)
        fps, frames = self._timing()
        return (*_frame_size(resolution, ratio), fps, frames)


@dataclass(frozen=True)
class TextToVideoV1(_RequestBase):
    """v1 (Wan) text-to-video."""

    _: KW_ONLY
    negative_prompt: str = ""
    num_frames: int = 81
    frames_per_second: int = 16
    seed: int | None = None
    resolution: str = "720p"
    aspect_ratio: str = "16:9"
    num_inference_steps: int = 30
    enable_safety_checker: bool = True
    enable_prompt_expansion: bool = True

    job_kind: ClassVar[JobKind] = JobKind.TEXT_TO_VIDEO
    model: ClassVar[Literal["v1", "v2"]] = "v1"
    _SPECS: ClassVar[Mapping[str, _Spec]] = _V1_SPECS

    def _timing(self) -> tuple[int, int]:
        return self.frames_per_second, self.num_frames


@dataclass(frozen=True)
class ImageToVideoV1(TextToVideoV1):
    """v1 (Wan) image-to-video; ``image`` is an http(s) URL or a local image file."""

    image: str | os.PathLike[str]
    _: KW_ONLY
    aspect_ratio: str = "auto"

    job_kind: ClassVar[JobKind] = JobKind.IMAGE_TO_VIDEO
    _SPECS: ClassVar[Mapping[str, _Spec]] = {
        **_V1_SPECS,
        "aspect_ratio": _Spec("choice", choices=("auto", "16:9", "9:16", "1:1")),
        "image": _IMAGE,
    }


@dataclass(frozen=True)
class TextToVideoV2(_RequestBase):
    """v2 (Seedance lite) text-to-video."""

    _: KW_ONLY
    aspect_ratio: str = "16:9"
    resolution: str = "720p"
    duration: str = "5"
    camera_fixed: bool = False
    seed: int | None = None

    job_kind: ClassVar[JobKind] = JobKind.TEXT_TO_VIDEO
    model: ClassVar[Literal["v1", "v2"]] = "v2"
    model_id: ClassVar[str | None] = V2_TEXT_TO_VIDEO_MODEL
    _SPECS: ClassVar[Mapping[str, _Spec]] = _V2_SPECS

    def _timing(self) -> tuple[int, int]:
        return V2_FPS, V2_FPS * int(self.duration)


@dataclass(frozen=True)
class ImageToVideoV2(TextToVideoV2):
    """v2 (Seedance lite) image-to-video; ``end_image`` (URL) is the frame to end on."""

    image: str | os.PathLike[str]
    _: KW_ONLY
    end_image: str | None = None

    job_kind: ClassVar[JobKind] = JobKind.IMAGE_TO_VIDEO
    model_id: ClassVar[str | None] = V2_IMAGE_TO_VIDEO_MODEL
    _SPECS: ClassVar[Mapping[str, _Spec]] = {
        **_V2_SPECS,
        "image": _IMAGE,
        "end_image": _END_IMAGE,
    }


KvidRequest = TextToVideoV1 | ImageToVideoV1 | TextToVideoV2 | ImageToVideoV2

_CLASSES: dict[tuple[str, JobKind], type[KvidRequest]] = {
    ("v1", JobKind.TEXT_TO_VIDEO): TextToVideoV1,
    ("v1", JobKind.IMAGE_TO_VIDEO): ImageToVideoV1,
    ("v2", JobKind.TEXT_TO_VIDEO): TextToVideoV2,
    ("v2", JobKind.IMAGE_TO_VIDEO): ImageToVideoV2,
}
_MODEL_IDS = {
    V2_TEXT_TO_VIDEO_MODEL: JobKind.TEXT_TO_VIDEO,
    V2_IMAGE_TO_VIDEO_MODEL: JobKind.IMAGE_TO_VIDEO,
}
# names build_request takes as keywords of its own (not **params)
_EXPLICIT = ("prompt", "image", "end_image")
# the vendor's wire names, accepted as aliases so a table may use either spelling
_ALIASES = {"image_url": "image", "end_image_url": "end_image"}


def _is_blank(value: Any) -> bool:
    """A table cell meaning "not given": None, '', whitespace, NaN, pandas NA."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _resolve_job(job: Any, image: Any) -> JobKind:
    if _is_blank(job):
        return JobKind.TEXT_TO_VIDEO if image is None else JobKind.IMAGE_TO_VIDEO
    text = job.strip() if isinstance(job, str) else job
    try:
        return JobKind(text)
    except ValueError:
        allowed = ", ".join(kind.value for kind in JobKind)
        raise KvidValidationError("job", job, allowed, problem="is not a job kind") from None


def _resolve_model(model: Any, job_kind: JobKind) -> str:
    if _is_blank(model):
        return "v1"
    text = model.strip() if isinstance(model, str) else model
    if text in ("v1", "v2"):
        return text
    if text in _MODEL_IDS:
        if _MODEL_IDS[text] is not job_kind:
            expected = (
                V2_TEXT_TO_VIDEO_MODEL
                if job_kind is JobKind.TEXT_TO_VIDEO
                else (V2_IMAGE_TO_VIDEO_MODEL)
            )
            raise KvidValidationError(
                "model", model, f"v1, v2 or {expected}", problem=f"does not match job {job_kind}"
            )
        return "v2"
    allowed = f"v1, v2, {V2_TEXT_TO_VIDEO_MODEL}, {V2_IMAGE_TO_VIDEO_MODEL}"
    raise KvidValidationError("model", model, allowed, problem="is not a model")


def build_request(
    prompt: Any,
    *,
    job: JobKind | str | None = None,
    model: str | None = "v1",
    image: str | os.PathLike[str] | None = None,
    end_image: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    **params: Any,
) -> KvidRequest:
    """Build a validated request from loose input (a table row, CLI flags).

    ``job`` None means image-to-video when an image is given, else text-to-video. ``model`` is
    "v1", "v2" or a full v2 model id (which must match the job). Blank values mean the API
    default; a parameter of the other model, or an unknown one, is an error naming it.
    """
    explicit: dict[str, Any] = {"image": image, "end_image": end_image}
    for alias, name in _ALIASES.items():
        if alias in params:
            value = params.pop(alias)
            if not _is_blank(value):
                if not _is_blank(explicit[name]):
                    raise KvidValidationError(
                        alias, value, f"either {name} or {alias}", problem=f"conflicts with {name}"
                    )
                explicit[name] = value
    image = None if _is_blank(explicit["image"]) else explicit["image"]
    end_image = None if _is_blank(explicit["end_image"]) else explicit["end_image"]

    job_kind = _resolve_job(job, image)
    cls = _CLASSES[_resolve_model(model, job_kind), job_kind]
    specs = cls._SPECS
    known_anywhere = {name for klass in _CLASSES.values() for name in klass._SPECS}

    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name in specs and name not in _EXPLICIT:
            if not _is_blank(value):
                kwargs[name] = specs[name].coerce(name, value)
            continue
        if name in known_anywhere and name not in _EXPLICIT and _is_blank(value):
            continue  # another model's column, left empty in this row
        owners = sorted({k.describe() for k in _CLASSES.values() if name in k._SPECS})
        problem = f"is not a parameter of {cls.describe()}"
        if owners:
            problem += f" (it belongs to {' and '.join(owners)})"
        allowed = ", ".join(n for n in specs if n not in _EXPLICIT)
        raise KvidValidationError(name, value, allowed, problem=problem)

    if not isinstance(prompt, str):
        raise _wrong_type("prompt", prompt, _PROMPT)
    if job_kind is JobKind.IMAGE_TO_VIDEO:
        if image is None:
            raise KvidValidationError(
                "image", None, _IMAGE.allowed(), problem="is required for image-to-video"
            )
        base = Path(base_dir).expanduser().absolute() if base_dir is not None else None
        kwargs["image"] = _resolve_image("image", image, _IMAGE, base)
    elif image is not None:
        raise KvidValidationError(
            "image", image, "no image", problem="is not allowed for text-to-video"
        )
    if end_image is not None:
        if cls is not ImageToVideoV2:
            raise KvidValidationError(
                "end_image",
                end_image,
                "only with v2 image-to-video",
                problem=f"is not a parameter of {cls.describe()}",
            )
        kwargs["end_image"] = end_image
    return cls(prompt, **kwargs)
