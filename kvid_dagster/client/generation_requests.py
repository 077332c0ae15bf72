"""Typed requests of the generation dialect (``/ai/generation/<kind>/generate-async``).

One frozen dataclass per job kind, validated in ``__post_init__`` so that nothing invalid is
ever paid for. The rules are ``shared/kvid-api.md``'s "current dialect" section; where the
vendor's two revisions disagree, the request is made explicit instead of relying on a default:

- ``resolution`` is always sent (720p unless given: one revision defaults to 720p, the other to
  480p), and so are ``aspect_ratio`` and ``duration``.
- ``duration`` is whole seconds: 5–10 for text- and image-to-video (the page's "typically 5–10
  seconds"), 4–15 or ``"auto"`` for reference-to-video. Default 5 (the page's shortest typical
  length); a v1-family request may give ``num_frames`` instead (not both).
- ``model`` is passed through when given (None: the server's default, which the revisions name
  differently) and must be one of ``GENERATION_MODELS`` or of the request's ``extra_models``.
- The self-hosted v1-family fields (``num_frames`` … ``acceleration``) are refused unless the
  model is of the v1 (Wan) family: elsewhere the gateway would ignore them, and a request that
  silently means less than it says is money spent on the wrong video.

The credit pool (``product_id`` / ``product_code`` / ``email``) is no part of a request: it is a
client setting (``CreditPool``), added at send time and held like the API key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from ._fields import (
    _BOOL,
    _IMAGE,
    _PROMPT,
    _SEED,
    _TEXT,
    ApiDialect,
    JobKind,
    _Spec,
    _wrong_type,
    canonical_json,
    check_fields,
    frame_size,
    image_body,
    is_blank,
    job_image,
    loose_kwargs,
    member,
    resolve_job,
)
from ._secrets import Secret
from .errors import KvidValidationError

__all__ = [
    "GENERATION_MODELS",
    "CreditPool",
    "CreditPoolField",
    "GenerationImageToVideo",
    "GenerationReferenceToVideo",
    "GenerationRequest",
    "GenerationTextToVideo",
    "build_generation_request",
]

# Both revisions' vocabularies and the one full model path the page shows. Extend it per
# request (``extra_models``) or per build (``build_request(..., models=...)``).
GENERATION_MODELS: frozenset[str] = frozenset(
    {
        "v1",
        "v2",
        "v3",
        "wan",
        "seedance",
        "veo3.1",
        "bytedance/seedance-2.0/fast/reference-to-video",
    }
)
MAX_MODEL_CHARS = 255  # the ledger's model column
DEFAULT_DURATION = 5
GENERATION_FPS = 24  # unless a v1-family request sets frames_per_second
MAX_REFERENCES = 12
URL_LISTS = ("image_urls", "video_urls", "audio_urls")

_V1_FAMILY_SPECS: dict[str, _Spec] = {
    "num_frames": _Spec("int", 81, 100, optional=True),
    "frames_per_second": _Spec("int", 5, 24, optional=True),
    "num_inference_steps": _Spec("int", 1, None, optional=True),
    "guidance_scale": _Spec("number", 0, None, optional=True),
    "shift": _Spec("number", 0, None, optional=True),
    "enable_safety_checker": _Spec("bool", optional=True),
    "enable_prompt_expansion": _Spec("bool", optional=True),
    "acceleration": _Spec("choice", choices=("regular", "high"), optional=True),
}
_COMMON_SPECS: dict[str, _Spec] = {
    "prompt": _PROMPT,
    "resolution": _Spec("choice", choices=("480p", "720p", "1080p")),
    "aspect_ratio": _Spec("choice", choices=("16:9", "9:16", "1:1", "auto")),
    "duration": _Spec("int", 5, 10, optional=True),
    "seed": _SEED,
    "negative_prompt": _Spec("text", optional=True),
    **_V1_FAMILY_SPECS,
}


def is_v1_family(model: str | None) -> bool:
    """``v1``, ``wan`` or a Wan model path (``wan/v2.2/...``, ``fal-ai/wan-t2v``)."""
    if model is None:
        return False
    return model in ("v1", "wan") or any(part.startswith("wan") for part in model.split("/"))


def _check_model_name(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong_type(field_name, value, _TEXT)
    if not value or len(value) > MAX_MODEL_CHARS or any(c.isspace() or ord(c) < 32 for c in value):
        raise KvidValidationError(
            field_name,
            value,
            f"1–{MAX_MODEL_CHARS} characters without spaces",
            problem="is not a usable model name",
        )
    return value


def model_names(field_name: str, value: Any) -> frozenset[str]:
    """A collection of model names (a lone string is a mistake, not a set of characters)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise KvidValidationError(
            field_name, value, "a collection of model names", problem="has the wrong type"
        )
    return frozenset(_check_model_name(field_name, name) for name in value)


class CreditPoolField(StrEnum):
    """The body field that names the credit pool a job is charged to."""

    PRODUCT_ID = "product_id"
    PRODUCT_CODE = "product_code"
    EMAIL = "email"


@dataclass(frozen=True)
class CreditPool:
    """The credit pool to charge (one revision requires one; the other resolves it from the key).

    The value is held like the API key: no repr, error text, log record or returned value shows
    it. Build it with ``CreditPool.of(field, value)``.
    """

    field: CreditPoolField
    value: Secret

    @classmethod
    def of(cls, field_name: CreditPoolField | str, value: str) -> CreditPool:
        pool_field = member(CreditPoolField, "credit_pool", field_name, "is no credit-pool field")
        # never echo the value: it is treated as a secret even when malformed
        if not isinstance(value, str) or not value or len(value) > MAX_MODEL_CHARS:
            raise KvidValidationError(
                "credit_pool",
                problem=f"has an unusable {pool_field} value",
                allowed=f"a string of 1–{MAX_MODEL_CHARS} characters",
            )
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
            raise KvidValidationError(
                "credit_pool",
                problem=f"has a {pool_field} value with spaces or control characters",
                allowed="printable characters",
            )
        return cls(pool_field, Secret(value))

    def body_fields(self) -> dict[str, str]:
        """What is added to a generate body, at send time only."""
        return {self.field.value: self.value.reveal()}


@dataclass(frozen=True)
class _GenerationBase:
    """Shared fields and behaviour; subclasses set the job kind and the ``_SPECS``."""

    prompt: str
    _: KW_ONLY
    model: str | None = None
    resolution: str = "720p"
    aspect_ratio: str = "16:9"
    duration: int | str | None = None  # None: DEFAULT_DURATION, unless num_frames is given
    seed: int | None = None
    negative_prompt: str | None = None
    num_frames: int | None = None
    frames_per_second: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    enable_safety_checker: bool | None = None
    enable_prompt_expansion: bool | None = None
    acceleration: str | None = None
    # models accepted besides GENERATION_MODELS: a setting, no part of the body or the hash
    extra_models: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    dialect: ClassVar[ApiDialect] = ApiDialect.GENERATION
    job_kind: ClassVar[JobKind]
    function: ClassVar[str]  # the body's "function", matching the endpoint
    _SPECS: ClassVar[Mapping[str, _Spec]]

    def __post_init__(self) -> None:
        check_fields(self, self._SPECS)
        object.__setattr__(self, "extra_models", model_names("extra_models", self.extra_models))
        self._check_model()
        self._check_v1_family()
        if self.num_frames is None:
            if self.duration is None:  # spelled out: the canonical form has no hidden default
                object.__setattr__(self, "duration", DEFAULT_DURATION)
        elif self.duration is not None:
            raise KvidValidationError(
                "num_frames",
                self.num_frames,
                "num_frames or duration, not both",
                problem="is an alternative to duration",
            )

    def _check_model(self) -> None:
        if self.model is None:
            return
        model = _check_model_name("model", self.model)
        known = GENERATION_MODELS | self.extra_models
        if model not in known:
            raise KvidValidationError(
                "model",
                model,
                ", ".join(sorted(known)) + " (or add it to the configured models)",
                problem="is not a generation-dialect model",
            )
        last = model.rsplit("/", 1)[-1]
        if "/" in model and last in set(JobKind) and last != self.job_kind:
            raise KvidValidationError(
                "model",
                model,
                f"a model for {self.job_kind}",
                problem=f"is a {last} model, not one for job {self.job_kind}",
            )

    def _check_v1_family(self) -> None:
        if is_v1_family(self.model):
            return
        for name in _V1_FAMILY_SPECS:
            value = getattr(self, name)
            if value is not None:
                model = "not set" if self.model is None else repr(self.model)
                raise KvidValidationError(
                    name,
                    value,
                    "only with a v1-family model (v1, wan or a wan model path)",
                    problem=f"is a self-hosted v1-family field, and the model is {model}",
                )

    @classmethod
    def describe(cls) -> str:
        return f"generation {cls.job_kind.value}"

    def _body(self, *, for_hash: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "function": self.function}
        if self.model is not None:
            body["model"] = self.model
        for name, spec in self._SPECS.items():
            value = getattr(self, name)
            if name == "prompt" or value is None or (spec.kind == "urls" and not value):
                continue  # not given: absent from the body, not null
            if spec.kind == "image":
                key, encoded = image_body(name, value, for_hash=for_hash)
                body[key] = encoded
            else:
                body[name] = list(value) if spec.kind == "urls" else value
        return body

    def to_body(self) -> dict[str, Any]:
        """The exact JSON body for ``generate`` (without the client's credit pool)."""
        return self._body(for_hash=False)

    def canonical_hash(self) -> str:
        """sha256 hex of the dialect and the canonical body (a local image by its sha256): never
        equal to a video-dialect request's, whatever the prompt."""
        payload = {"dialect": self.dialect.value, "body": self._body(for_hash=True)}
        return hashlib.sha256(canonical_json(payload)).hexdigest()

    def output_geometry(
        self, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """(width, height, fps, num_frames) of the video this request yields.

        ``aspect_ratio="auto"`` follows the input image (reference-to-video: the first image
        reference), so it needs ``image_size`` (w, h); ``duration="auto"`` follows the
        references, so it has no length to predict (a ValueError).
        """
        width, height = frame_size(self.resolution, self.aspect_ratio, image_size)
        fps = self.frames_per_second or GENERATION_FPS
        if self.num_frames is not None:
            return width, height, fps, self.num_frames
        if not isinstance(self.duration, int):
            raise ValueError("duration='auto' follows the references: its length is unknown")
        return width, height, fps, fps * self.duration


@dataclass(frozen=True)
class GenerationTextToVideo(_GenerationBase):
    """Generation-dialect text-to-video."""

    job_kind: ClassVar[JobKind] = JobKind.TEXT_TO_VIDEO
    function: ClassVar[str] = "txt2vid"
    _SPECS: ClassVar[Mapping[str, _Spec]] = _COMMON_SPECS


@dataclass(frozen=True)
class GenerationImageToVideo(_GenerationBase):
    """Generation-dialect image-to-video; ``image`` is an http(s) URL (sent as ``image_url``)
    or a local image file (sent as base64 ``image_file``)."""

    image: str | os.PathLike[str]
    _: KW_ONLY
    aspect_ratio: str = "auto"

    job_kind: ClassVar[JobKind] = JobKind.IMAGE_TO_VIDEO
    function: ClassVar[str] = "img2vid"
    _SPECS: ClassVar[Mapping[str, _Spec]] = {**_COMMON_SPECS, "image": _IMAGE}


@dataclass(frozen=True)
class GenerationReferenceToVideo(_GenerationBase):
    """Generation-dialect reference-to-video: up to 9 image, 3 video and 3 audio references
    (12 in all), each an http(s) URL; audio only beside an image or a video."""

    _: KW_ONLY
    image_urls: tuple[str, ...] = ()
    video_urls: tuple[str, ...] = ()
    audio_urls: tuple[str, ...] = ()
    generate_audio: bool = True

    job_kind: ClassVar[JobKind] = JobKind.REFERENCE_TO_VIDEO
    function: ClassVar[str] = "ref2vid"
    _SPECS: ClassVar[Mapping[str, _Spec]] = {
        **_COMMON_SPECS,
        "duration": _Spec("int", 4, 15, optional=True, auto=True),
        "image_urls": _Spec("urls", hi=9),
        "video_urls": _Spec("urls", hi=3),
        "audio_urls": _Spec("urls", hi=3),
        "generate_audio": _BOOL,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.image_urls or self.video_urls):
            name = "audio_urls" if self.audio_urls else "image_urls"
            raise KvidValidationError(
                name,
                getattr(self, name),
                "at least one image_urls or video_urls entry",
                problem="needs an image or video reference beside it"
                if self.audio_urls
                else "is empty: reference-to-video needs an image or video reference",
            )
        total = 0
        for name in URL_LISTS:
            total += len(getattr(self, name))
            if total > MAX_REFERENCES:
                raise KvidValidationError(
                    name,
                    getattr(self, name),
                    f"at most {MAX_REFERENCES} references in all",
                    problem=f"brings the references to {total}",
                )


GenerationRequest = GenerationTextToVideo | GenerationImageToVideo | GenerationReferenceToVideo

GENERATION_TYPES: dict[JobKind, type[GenerationRequest]] = {
    cls.job_kind: cls
    for cls in (GenerationTextToVideo, GenerationImageToVideo, GenerationReferenceToVideo)
}
GENERATION_FIELDS: frozenset[str] = frozenset(
    {"model", *(name for cls in GENERATION_TYPES.values() for name in cls._SPECS)}
)


def build_generation_request(
    prompt: Any,
    *,
    job: JobKind | str | None,
    model: str | None,
    image: Any,
    end_image: Any,
    base_dir: Path | None,
    models: Iterable[str],
    params: Mapping[str, Any],
    owners: Mapping[str, str],
) -> GenerationRequest:
    """``build_request`` for the generation dialect (see there); ``owners`` names where the
    fields this dialect lacks belong."""
    references = any(not is_blank(params.get(name)) for name in URL_LISTS)
    job_kind = resolve_job(
        job, image=image is not None, references=references, dialect=ApiDialect.GENERATION
    )
    cls = GENERATION_TYPES[job_kind]
    if end_image is not None:
        raise KvidValidationError(
            "end_image",
            end_image,
            "no end image in the generation dialect",
            problem="is a parameter of the video dialect (v2 image-to-video)",
        )
    kwargs = loose_kwargs(
        params, cls._SPECS, describe=cls.describe(), owners=owners, skip=("prompt", "image")
    )
    if not isinstance(prompt, str):
        raise _wrong_type("prompt", prompt, _PROMPT)
    resolved = job_image(job_kind, image, base_dir)
    if resolved is not None:
        kwargs["image"] = resolved
    if not is_blank(model):
        kwargs["model"] = model.strip() if isinstance(model, str) else model
    return cls(prompt, extra_models=model_names("models", models), **kwargs)
