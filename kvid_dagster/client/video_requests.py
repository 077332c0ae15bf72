"""Typed requests for the four job kinds of the video dialect, and ``build_request``: the loose
front door for both dialects (the generation dialect's types are in ``generation_requests``).

The dataclasses are strict (a bool is not an int, ``duration`` is the string "5" or "10") and
validate in ``__post_init__``, so an invalid request never reaches the network (and never costs
credits). ``build_request`` is the loose front door for tables and CLIs: it normalises cells
(blank means "the API default", 81.0 means 81, "true" means True) and then builds the strict type.
One table of field specs per type (``_Spec``, see ``_fields``) drives both, so the rules live in
one place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from ._fields import (
    _BOOL,
    _IMAGE,
    _PROMPT,
    _SEED,
    _TEXT,
    MAX_IMAGE_BYTES,
    MAX_PROMPT_CHARS,
    ApiDialect,
    JobKind,
    LocalImage,
    _Spec,
    _wrong_type,
    canonical_json,
    check_fields,
    frame_size,
    image_body,
    is_blank,
    job_image,
    loose_kwargs,
    parse_dialect,
    resolve_job,
)
from .errors import KvidValidationError
from .generation_requests import (
    GENERATION_FIELDS,
    GENERATION_MODELS,
    GENERATION_TYPES,
    CreditPoolField,
    GenerationImageToVideo,
    GenerationReferenceToVideo,
    GenerationTextToVideo,
    build_generation_request,
)

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_CHARS",
    "V2_IMAGE_TO_VIDEO_MODEL",
    "V2_TEXT_TO_VIDEO_MODEL",
    "ApiDialect",
    "ImageToVideoV1",
    "ImageToVideoV2",
    "JobKind",
    "KvidRequest",
    "LocalImage",
    "TextToVideoV1",
    "TextToVideoV2",
    "build_request",
    "canonical_json",
]

V2_TEXT_TO_VIDEO_MODEL = "bytedance/seedance/v1/lite/text-to-video"
V2_IMAGE_TO_VIDEO_MODEL = "bytedance/seedance/v1/lite/image-to-video"
V2_FPS = 24

# --------------------------------------------------------------------------------------------
# the four request types
# --------------------------------------------------------------------------------------------

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

    dialect: ClassVar[ApiDialect] = ApiDialect.VIDEO
    job_kind: ClassVar[JobKind]
    model: ClassVar[Literal["v1", "v2"]]
    model_id: ClassVar[str | None] = None  # the body's "model" (v2 only)
    _SPECS: ClassVar[Mapping[str, _Spec]]

    def __post_init__(self) -> None:
        check_fields(self, self._SPECS)

    @classmethod
    def describe(cls) -> str:
        return f"{cls.model} {cls.job_kind.value}"

    def _body(self, *, for_hash: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name, spec in self._SPECS.items():
            value = getattr(self, name)
            if spec.kind == "image":
                key, encoded = image_body(name, value, for_hash=for_hash)
                body[key] = encoded
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
        width, height = frame_size(resolution, aspect_ratio, image_size)
        fps, frames = self._timing()
        return width, height, fps, frames


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
    """v1 (Wan) image-to-video; ``image`` is an http(s) URL or a local image file (held as a
    ``LocalImage``: sent only while the file has the bytes the request was hashed by)."""

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


KvidRequest = (
    TextToVideoV1
    | ImageToVideoV1
    | TextToVideoV2
    | ImageToVideoV2
    | GenerationTextToVideo
    | GenerationImageToVideo
    | GenerationReferenceToVideo
)

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


def _owners(classes: Iterable[type[KvidRequest]]) -> dict[str, str]:
    """field -> the request types that have it ("v1 image-to-video and v1 text-to-video")."""
    found: dict[str, set[str]] = {}
    for cls in classes:
        for name in cls._SPECS:
            found.setdefault(name, set()).add(cls.describe())
    return {name: " and ".join(sorted(types)) for name, types in found.items()}


# where a field a request type lacks belongs: the same dialect's other types first, else the
# other dialect (a row written for one dialect is reported as such under the other)
_VIDEO_OWNERS = {
    **{name: "the generation dialect" for name in GENERATION_FIELDS},
    **_owners(_CLASSES.values()),
}
_GENERATION_OWNERS = {
    **{name: f"the video dialect ({types})" for name, types in _owners(_CLASSES.values()).items()},
    **_owners(GENERATION_TYPES.values()),
}


def _resolve_model(model: Any, job_kind: JobKind) -> str:
    if is_blank(model):
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
    problem = "is not a model"
    if text in GENERATION_MODELS:
        problem += " of the video dialect (it is one of the generation dialect's)"
    raise KvidValidationError("model", model, allowed, problem=problem)


def build_request(
    prompt: Any,
    *,
    dialect: ApiDialect | str = ApiDialect.VIDEO,
    job: JobKind | str | None = None,
    model: str | None = None,
    image: str | os.PathLike[str] | None = None,
    end_image: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    models: Iterable[str] = (),
    **params: Any,
) -> KvidRequest:
    """Build a validated request of ``dialect`` from loose input (a table row, CLI flags).

    ``job`` None means reference-to-video when a reference list is given (generation dialect),
    image-to-video when an image is, else text-to-video. Video dialect: ``model`` is "v1"
    (the default), "v2" or a full v2 model id (which must match the job). Generation dialect:
    ``model`` is passed through (blank: the server's default) if it is in ``GENERATION_MODELS``
    or ``models``; ``image_urls``/``video_urls``/``audio_urls`` may be lists, JSON arrays or
    ``a|b`` strings. Blank values mean the API default; a parameter of another model or of the
    other dialect, or an unknown one, is an error naming it.
    """
    api = parse_dialect(dialect)
    for name in CreditPoolField:
        if not is_blank(params.pop(name, None)):
            # never echoed: the credit pool is held like the api-key
            raise KvidValidationError(
                name,
                problem="is the client's credit_pool setting, not a request parameter",
                allowed="no credit-pool field in a request",
            )
    explicit: dict[str, Any] = {"image": image, "end_image": end_image}
    for alias, name in _ALIASES.items():
        if alias in params:
            value = params.pop(alias)
            if not is_blank(value):
                if not is_blank(explicit[name]):
                    raise KvidValidationError(
                        alias, value, f"either {name} or {alias}", problem=f"conflicts with {name}"
                    )
                explicit[name] = value
    image = None if is_blank(explicit["image"]) else explicit["image"]
    end_image = None if is_blank(explicit["end_image"]) else explicit["end_image"]
    base = Path(base_dir).expanduser().absolute() if base_dir is not None else None
    if api is ApiDialect.GENERATION:
        return build_generation_request(
            prompt,
            job=job,
            model=model,
            image=image,
            end_image=end_image,
            base_dir=base,
            models=models,
            params=params,
            owners=_GENERATION_OWNERS,
        )

    job_kind = resolve_job(job, image=image is not None, references=False, dialect=api)
    cls = _CLASSES[_resolve_model(model, job_kind), job_kind]
    kwargs = loose_kwargs(
        params, cls._SPECS, describe=cls.describe(), owners=_VIDEO_OWNERS, skip=_EXPLICIT
    )
    if not isinstance(prompt, str):
        raise _wrong_type("prompt", prompt, _PROMPT)
    resolved = job_image(job_kind, image, base)
    if resolved is not None:
        kwargs["image"] = resolved
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
