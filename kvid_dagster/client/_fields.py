"""The vocabulary and the field rules both dialects' requests are built from.

``requests.py`` (the video dialect) and ``generation_requests.py`` (the generation dialect) each
declare their fields as a table of ``_Spec``; this module holds what a spec means: the strict
check a dataclass runs in ``__post_init__``, and the loose coercion ``build_request`` applies to a
table cell first. One rule per kind of field, whichever dialect uses it.
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
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from .errors import KvidValidationError

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_CHARS",
    "ApiDialect",
    "JobKind",
    "LocalImage",
    "canonical_json",
]


E = TypeVar("E", bound=StrEnum)


class JobKind(StrEnum):
    TEXT_TO_VIDEO = "text-to-video"
    IMAGE_TO_VIDEO = "image-to-video"
    REFERENCE_TO_VIDEO = "reference-to-video"  # the generation dialect only


class ApiDialect(StrEnum):
    """Which of the vendor's two APIs a request or a client speaks (``shared/kvid-api.md``)."""

    VIDEO = "video"  # /ai/video/<kind>/generate, request_id
    GENERATION = "generation"  # /ai/generation/<kind>/generate-async, jobId


MAX_PROMPT_CHARS = 10_000
# base64 grows an image by a third: 14 MiB of image is a body under 20 MiB, the request size
# servers commonly accept (the emulator's limit too). Refusing here is free; a 413 is not.
MAX_IMAGE_BYTES = 14 * 1024 * 1024
MAX_URL_CHARS = 2048
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


SpecKind = Literal[
    "prompt", "text", "int", "seed", "number", "choice", "bool", "image", "url", "urls"
]


@dataclass(frozen=True)
class _Spec:
    """One field's rule: strict for the dataclasses (``check``), loose for tables (``coerce``)."""

    kind: SpecKind
    lo: int | None = None  # int, number: the range; urls: unused
    hi: int | None = None  # urls: the most URLs in the list
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed (None: not sent, or JSON null where the body has it)
    auto: bool = False  # int: the string "auto" is allowed too

    def allowed(self) -> str:
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "seed":
            return "an integer or null"
        if self.kind in ("int", "number"):
            what = "an integer" if self.kind == "int" else "a number"
            if self.hi is not None:
                text = f"{self.lo}–{self.hi}"
            elif self.lo is not None:
                text = f"{what} ≥ {self.lo}"
            else:
                text = what
            return f"{text} or auto" if self.auto else text
        if self.kind == "bool":
            return "true or false"
        if self.kind == "prompt":
            return f"a non-empty string of at most {MAX_PROMPT_CHARS} characters"
        if self.kind == "text":
            return f"a string of at most {MAX_PROMPT_CHARS} characters"
        if self.kind == "image":
            return f"an http(s) URL or an existing image file of at most {MAX_IMAGE_BYTES} bytes"
        if self.kind == "urls":
            return f"a list of at most {self.hi} http(s) URLs"
        return "an http(s) URL" + (" or null" if self.optional else "")

    def check(self, field: str, value: Any) -> Any:
        """Strict check of a dataclass field; returns the value in its canonical form (a float
        for a number, a tuple for a list of URLs). Images are checked by ``resolve_image``."""
        if value is None and (self.optional or self.kind == "seed"):
            return None
        if self.kind in ("prompt", "text"):
            _check_text(field, value, self, required=self.kind == "prompt")
        elif self.kind in ("int", "seed", "number"):
            return self._check_number(field, value)
        elif self.kind == "choice":
            if not isinstance(value, str):
                raise _wrong_type(field, value, self)
            if value not in self.choices:
                raise KvidValidationError(field, value, self.allowed(), problem="is not allowed")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise _wrong_type(field, value, self)
        elif self.kind == "url":
            check_url(field, value, self)
        elif self.kind == "urls":
            return self._check_urls(field, value)
        return value

    def _check_number(self, field: str, value: Any) -> Any:
        if self.auto and value == "auto":
            return value
        if self.kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _wrong_type(field, value, self)
            if not math.isfinite(value):
                raise KvidValidationError(field, value, self.allowed(), problem="is not finite")
            value = float(value)  # 5 and 5.0 are one request
        elif not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(field, value, self)
        lo, hi = _SEED_RANGE if self.kind == "seed" else (self.lo, self.hi)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise KvidValidationError(field, value, self.allowed(), problem="is out of range")
        return value

    def _check_urls(self, field: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _wrong_type(field, value, self)
        if self.hi is not None and len(value) > self.hi:
            raise KvidValidationError(
                field, value, self.allowed(), problem=f"has too many URLs ({len(value)})"
            )
        for index, url in enumerate(value):
            check_url(f"{field}[{index}]", url, _URL)
        return tuple(value)

    def coerce(self, field: str, value: Any) -> Any:
        """Loose normalisation of a table cell to the strict type (blank cells never get here)."""
        if self.kind in ("int", "seed"):
            if self.auto and isinstance(value, str) and value.strip().lower() == "auto":
                return "auto"
            return _coerce_int(field, value, self)
        if self.kind == "number":
            return _coerce_number(field, value, self)
        if self.kind == "bool":
            return _coerce_bool(field, value, self)
        if self.kind == "urls":
            return _coerce_urls(field, value, self)
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


_PROMPT = _Spec("prompt")
_TEXT = _Spec("text")
_BOOL = _Spec("bool")
_SEED = _Spec("seed")
_IMAGE = _Spec("image")
_URL = _Spec("url")


def check_fields(request: object, specs: Mapping[str, _Spec]) -> None:
    """Validate every field of a frozen request in place, each set to its canonical form."""
    for name, spec in specs.items():
        value = getattr(request, name)
        if spec.kind == "image":
            # normalise so a later chdir cannot change what the request means
            object.__setattr__(request, name, resolve_image(name, value, spec))
        else:
            object.__setattr__(request, name, spec.check(name, value))


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


def _coerce_number(field: str, value: Any, spec: _Spec) -> float:
    if _is_boolish(value):
        raise _wrong_type(field, value, spec)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _wrong_type(field, value, spec)


def _coerce_bool(field: str, value: Any, spec: _Spec) -> bool:
    if _is_boolish(value):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _wrong_type(field, value, spec)


def _coerce_urls(field: str, value: Any, spec: _Spec) -> list[Any]:
    """A list cell: a list (or a Parquet list column's array), a JSON array, or ``a|b|c``."""
    items: Any = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(items, str):
        text = items.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise KvidValidationError(
                    field, value, spec.allowed(), problem="is not a valid JSON array"
                ) from None
        else:
            items = text.split("|")
    if not isinstance(items, list | tuple):
        raise _wrong_type(field, value, spec)
    return [item.strip() if isinstance(item, str) else item for item in items if not is_blank(item)]


def check_url(field: str, value: Any, spec: _Spec = _URL) -> str:
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


@dataclass(frozen=True)
class LocalImage(os.PathLike[str]):
    """A local image file as it was when its request was made: the absolute path, and the
    size and sha256 of the bytes read then.

    The request's hash counts the image by that sha256, and its body is built only from a file
    that still has those bytes (``data``): what is sent is exactly what was hashed. Without
    this, an image replaced while a run waits would be sent under the old image's hash, and the
    next read of the table, hashing the new image, would find no job and send it again.
    A path-like, so code that opens it as a file keeps working.
    """

    path: Path
    sha256: str
    size: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def data(self, field: str) -> bytes:
        """The file's bytes, if they are still the ones hashed; else an error naming ``field``
        (nothing may be sent: the request no longer says what the file holds)."""
        try:
            with self.path.open("rb") as handle:
                data = handle.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise KvidValidationError(
                field,
                str(self.path),
                problem=f"can no longer be read ({type(exc).__name__}: "
                f"{exc.strerror or exc}): not sent",
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != self.size or digest != self.sha256:
            raise KvidValidationError(
                field,
                str(self.path),
                problem="changed since its request was made, when the table was read "
                f"({self.size} bytes, sha256 {self.sha256[:12]}… then; {len(data)} bytes, "
                f"sha256 {digest[:12]}… now): not sent; the next read of the table makes a new "
                "request of the new image",
            )
        return data


def resolve_image(
    field: str, value: Any, spec: _Spec = _IMAGE, base_dir: Path | None = None
) -> str | LocalImage:
    """An image is an http(s) URL (kept as str) or a local image file, read once here into a
    ``LocalImage`` (one already made is kept: it holds the bytes its request was made of)."""
    if isinstance(value, LocalImage):
        return value
    if isinstance(value, str) and _looks_like_url(value):
        return check_url(field, value, spec)
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
    with path.open("rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)
    if not data or len(data) > MAX_IMAGE_BYTES:
        size = path.stat().st_size
        raise KvidValidationError(
            field, str(path), spec.allowed(), problem=f"has an unusable size ({size} bytes)"
        )
    if not any(data[offset : offset + len(magic)] == magic for offset, magic in _IMAGE_MAGIC):
        raise KvidValidationError(
            field, str(path), "PNG, JPEG, WebP, GIF or BMP", problem="is not a known image format"
        )
    return LocalImage(path, hashlib.sha256(data).hexdigest(), len(data))


def image_body(field: str, value: str | LocalImage, *, for_hash: bool) -> tuple[str, str]:
    """The body field of a resolved image: ``image_url``, or ``image_file`` as base64 (in the
    hash input, the sha256 of the bytes instead: the same image is the same request)."""
    if not isinstance(value, LocalImage):
        return "image_url", value
    if for_hash:
        return "image_file", "sha256:" + value.sha256
    return "image_file", base64.b64encode(value.data(field)).decode("ascii")


def _round_even(value: Fraction) -> int:
    """Nearest even integer, halves rounded up (the emulator's rule for the long side)."""
    return 2 * math.floor(value / 2 + Fraction(1, 2))


def frame_size(
    resolution: str, aspect_ratio: str, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    """(width, height): the short side is the resolution's number, the long side follows the
    aspect ratio; ``auto`` follows the input image, so it needs ``image_size`` (w, h)."""
    if aspect_ratio == "auto":
        if image_size is None:
            raise ValueError("aspect_ratio='auto' follows the input image: pass image_size")
        width, height = image_size
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 < height):
            raise ValueError(f"image_size must be two positive ints, got {image_size!r}")
        ratio = Fraction(width, height)
    else:
        ratio_w, _, ratio_h = aspect_ratio.partition(":")
        ratio = Fraction(int(ratio_w), int(ratio_h))
    short = int(resolution.removesuffix("p"))
    if ratio >= 1:
        return _round_even(short * ratio), short
    return short, _round_even(short / ratio)


def is_blank(value: Any) -> bool:
    """A table cell meaning "not given": None, '', whitespace, NaN, pandas NA."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def member(kind: type[E], field: str, value: Any, problem: str, *, lookup: Any = None) -> E:
    """The member of ``kind`` that ``lookup`` (default: ``value``) names, or an error naming
    ``field``, ``value`` and every member."""
    try:
        return kind(value if lookup is None else lookup)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise KvidValidationError(field, value, allowed, problem=problem) from None


def parse_dialect(value: ApiDialect | str) -> ApiDialect:
    """An ``ApiDialect`` from its name (``KVID_API_DIALECT``: any case, spaces around)."""
    text = value.strip().lower() if isinstance(value, str) else value
    return member(ApiDialect, "dialect", value, "is not an API dialect", lookup=text)


DIALECT_JOB_KINDS: Mapping[ApiDialect, tuple[JobKind, ...]] = {
    ApiDialect.VIDEO: (JobKind.TEXT_TO_VIDEO, JobKind.IMAGE_TO_VIDEO),
    ApiDialect.GENERATION: tuple(JobKind),
}


def check_job_kind(field: str, value: Any, dialect: ApiDialect) -> JobKind:
    """A job kind of ``dialect``; anything else is an error naming ``field``."""
    kinds = DIALECT_JOB_KINDS[dialect]
    allowed = ", ".join(kinds)
    try:
        kind = JobKind(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise KvidValidationError(field, value, allowed, problem="is not a job kind") from None
    if kind not in kinds:
        raise KvidValidationError(
            field,
            value,
            allowed,
            problem=f"is not a job kind of the {dialect} dialect (it is one of the generation "
            "dialect's)",
        )
    return kind


def resolve_job(job: Any, *, image: bool, references: bool, dialect: ApiDialect) -> JobKind:
    """The job kind a loose row asks for; blank: by what it carries (references, an image)."""
    if is_blank(job):
        if references:
            return JobKind.REFERENCE_TO_VIDEO
        return JobKind.IMAGE_TO_VIDEO if image else JobKind.TEXT_TO_VIDEO
    return check_job_kind("job", job, dialect)


def job_image(job_kind: JobKind, image: Any, base_dir: Path | None) -> str | LocalImage | None:
    """The resolved image of an image-to-video row: required there, refused elsewhere."""
    if job_kind is JobKind.IMAGE_TO_VIDEO:
        if image is None:
            raise KvidValidationError(
                "image", None, _IMAGE.allowed(), problem="is required for image-to-video"
            )
        return resolve_image("image", image, _IMAGE, base_dir)
    if image is not None:
        hint = " (references go in image_urls)" if job_kind is JobKind.REFERENCE_TO_VIDEO else ""
        raise KvidValidationError(
            "image", image, "no image", problem=f"is not allowed for {job_kind}{hint}"
        )
    return None


def loose_kwargs(
    params: Mapping[str, Any],
    specs: Mapping[str, _Spec],
    *,
    describe: str,
    owners: Mapping[str, str],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The set cells of ``params`` coerced by ``specs``; blank cells are the API default.

    A name outside ``specs`` is an error naming it and, from ``owners`` (field -> where it
    belongs), which model or dialect has it; such a column left blank in this row is fine.
    ``skip`` are names the caller handles itself (images).
    """
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name in specs and name not in skip:
            if not is_blank(value):
                kwargs[name] = specs[name].coerce(name, value)
            continue
        if name in owners and name not in skip and is_blank(value):
            continue  # another model's or dialect's column, left empty in this row
        problem = f"is not a parameter of {describe}"
        if name in owners:
            problem += f" (it belongs to {owners[name]})"
        allowed = ", ".join(n for n in specs if n not in skip)
        raise KvidValidationError(name, value, allowed, problem=problem)
    return kwargs
