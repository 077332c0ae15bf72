"""Whether a downloaded video is what its request asked for, and not broken content.

Three checks (``QualityCheck``), judged from figures the poller measures once per video, right
after its probe and in the same worker thread (``poll._verified``):

- ``matches_request``: the picture's size, fps, frames and duration are what the request asks
  for by the contract's rule (``output_geometry`` of the typed request, either dialect), within
  ``SIZE_TOLERANCE_PX`` a side (an encoder may round each side to a multiple of 16),
  ``FPS_TOLERANCE``, ``FRAMES_TOLERANCE`` and ``DURATION_TOLERANCE_S`` (the vendor states lengths
  in whole seconds). With aspect ratio ``auto`` the long side follows the input image: it is
  checked when the image is a local file that still holds the bytes the request was hashed by,
  else only the short side (the resolution's number) is. What a request leaves open (a
  reference-to-video's ``duration="auto"``) is not compared.
- ``not_blank``: not every sampled frame one flat colour (luma standard deviation at most
  ``FLAT_STDDEV``) or black (mean luma at most ``BLACK_MEAN``, whatever faint noise).
- ``not_frozen``: in some sampled frame more than ``FROZEN_CHANGED_PCT`` percent of the
  picture differs from the first frame by more than ``CHANGE_LEVELS`` luma levels (a share of
  changed pixels, not a mean difference: an encoder's drift over a still picture is spread thin
  over all of it, a blink is a large change of a small part).

The picture figures come from one decode of the clip (H.264 decodes a frame only after the
ones before it since a keyframe, so sampling cannot skip the decoding), with ``SAMPLED_FRAMES``
frames evenly spread from the first to the last read as luma at a quarter of each side: 30-65
ms per 480p or 720p clip of the emulator's (docs/BENCHMARKS.md). Luma is 0-255 (full range,
whatever range the stream declares).

A video failing a check is still ``COMPLETED``: it was paid for and delivered, and nothing pays
for it again by itself. Dagster-free: PyAV, numpy and the client's typed requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

import av
import numpy as np

from kvid_dagster.client import (
    GenerationRequest,
    JobKind,
    KvidError,
    KvidRequest,
    LocalImage,
    build_request,
)
from kvid_dagster.core.prompts import IMAGE_COLUMNS, ROW_COLUMNS
from kvid_dagster.ledger import Submission, VideoFile, VideoQuality
from kvid_dagster.media.probe import VideoProbe

#: frames the picture figures are read from, evenly spread from the first to the last
SAMPLED_FRAMES: Final = 16
#: the figures are of every ``_SCALE``-th pixel a side (1/16 of them): enough for a mean
_SCALE: Final = 4
#: frames decoded at most: a longer file's figures are of its beginning (a bound on the time)
MAX_DECODED_FRAMES: Final = 2_000
SIZE_TOLERANCE_PX: Final = 16  # an encoder may round each side to a multiple of 16
FPS_TOLERANCE: Final = 0.5
FRAMES_TOLERANCE: Final = 1  # an encoder may drop or repeat the last frame
DURATION_TOLERANCE_S: Final = 0.5  # the vendor states lengths in whole seconds
#: a frame whose luma varies less than this (standard deviation) is one flat colour; the
#: emulator's darkest scene (night) varies by ~20, a black or flat clip by < 1 even encoded
FLAT_STDDEV: Final = 4.0
#: a frame whose mean luma is at most this is black, whatever faint noise it has (the night
#: scene's mean is ~21)
BLACK_MEAN: Final = 4.0
#: a pixel whose luma moved by more than this from the first sampled frame has changed; an
#: encoder's drift over a repeated frame stays under it (x264 ultrafast at crf 45: 0.1% of the
#: picture over it, at crf 35 or better: none)
CHANGE_LEVELS: Final = 16
#: a clip none of whose sampled frames has more than this share of its picture changed from
#: the first (percent) is frozen; the emulator's stillest clips, a fixed camera, change 6-14%
FROZEN_CHANGED_PCT: Final = 0.5

# what an image-to-video request is rebuilt with when its own image is not at hand: the
# output's size depends on the image only through aspect ratio "auto"
_IMAGE_STAND_IN: Final = "https://image.invalid/stand-in.png"
# any image size: with an explicit aspect ratio the output's size does not depend on it
_ANY_IMAGE_SIZE: Final = (16, 9)


class QualityCheck(StrEnum):
    """The checks on each video, named as Dagster shows them on ``kvid_videos``."""

    MATCHES_REQUEST = "matches_request"
    NOT_BLANK = "not_blank"
    NOT_FROZEN = "not_frozen"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def advisory(self) -> bool:
        """A failure is a warning, not an error: a fixed camera on a still subject is close to
        frozen by request, while a wrong size or a blank picture never is what was asked."""
        return self is QualityCheck.NOT_FROZEN


_DESCRIPTIONS: Final = {
    QualityCheck.MATCHES_REQUEST: "The video's size, fps, frames and duration are what its "
    f"request asks for (±{SIZE_TOLERANCE_PX} px a side, ±{FPS_TOLERANCE:g} fps, "
    f"±{FRAMES_TOLERANCE} frame, ±{DURATION_TOLERANCE_S:g} s; aspect ratio auto: the input "
    "image's, else the short side alone).",
    QualityCheck.NOT_BLANK: f"Not every sampled frame ({SAMPLED_FRAMES}) is black or one flat "
    f"colour (luma mean ≤ {BLACK_MEAN:g} or standard deviation ≤ {FLAT_STDDEV:g}, 0-255).",
    QualityCheck.NOT_FROZEN: "The picture changes across the clip: in some sampled frame more "
    f"than {FROZEN_CHANGED_PCT:g}% of the picture differs from the first frame by more than "
    f"{CHANGE_LEVELS} luma levels.",
}


@dataclass(frozen=True)
class PictureFigures:
    """What the sampled frames show (see ``VideoQuality``, which stores them)."""

    sampled_frames: int
    luma_mean: float  # the brightest sampled frame's mean luma
    luma_stddev: float  # the largest luma standard deviation of a sampled frame
    changed_pct: float  # the largest share of a sampled frame changed from the first (percent)


@dataclass(frozen=True)
class ExpectedOutput:
    """The video a request yields by the contract's rule; None: the request does not say."""

    short_side: int | None = None
    width: int | None = None  # None with the short side alone known (aspect ratio auto)
    height: int | None = None
    fps: float | None = None
    frames: int | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class CheckOutcome:
    """One check's verdict on one video, with the figures it compared."""

    check: QualityCheck
    passed: bool
    description: str  # one line: what was found, against what is allowed
    measured: Mapping[str, int | float]
    expected: Mapping[str, int | float | None]  # None: the request does not determine it
    rule: str  # the tolerance or threshold


def measure_picture(path: str | os.PathLike[str], num_frames: int) -> PictureFigures:
    """The figures of ``SAMPLED_FRAMES`` frames evenly spread over the clip's ``num_frames``
    (its probe's count). Raises ``ValueError`` when no frame decodes, and PyAV's errors."""
    span = max(1, min(num_frames, MAX_DECODED_FRAMES))
    wanted = set(np.linspace(0, span - 1, min(SAMPLED_FRAMES, span)).round().astype(int).tolist())
    last = max(wanted)
    means: list[float] = []
    deviations: list[float] = []
    first: np.ndarray | None = None
    changed = 0.0
    with av.open(os.fspath(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                luma = frame.reformat(
                    width=max(1, frame.width // _SCALE),
                    height=max(1, frame.height // _SCALE),
                    format="gray",
                ).to_ndarray().astype(np.float32)  # fmt: skip
                means.append(float(luma.mean()))
                deviations.append(float(luma.std()))
                if first is None:
                    first = luma
                else:
                    moved = np.abs(luma - first) > CHANGE_LEVELS
                    changed = max(changed, 100.0 * float(moved.mean()))
            if index >= last:
                break
    if not means:
        raise ValueError("no frame decodes")
    return PictureFigures(
        sampled_frames=len(means),
        luma_mean=round(max(means), 3),
        luma_stddev=round(max(deviations), 3),
        changed_pct=round(changed, 3),
    )


def expected_output(sub: Submission, image_dir: Path | None = None) -> ExpectedOutput:
    """What ``sub``'s request yields by the contract's rule; ``image_dir`` is where the row's
    relative image path resolves (the prompt table's folder; None: the working directory)."""
    request = _rebuilt(sub, own_images=False)
    if request is None:
        return ExpectedOutput()  # a request this version cannot read: nothing to compare
    short = int(request.resolution.removesuffix("p"))
    image_size = None
    if request.aspect_ratio == "auto":
        own = _rebuilt(sub, own_images=True, image_dir=image_dir)
        image = getattr(own, "image", None)
        image_size = _image_size(image) if isinstance(image, LocalImage) else None
    try:
        width, height, fps, frames = request.output_geometry(image_size or _ANY_IMAGE_SIZE)
    except ValueError:  # a reference-to-video's duration "auto": its references decide
        return ExpectedOutput(short_side=short)
    timing = (float(fps), frames, round(frames / fps, 3))
    if request.aspect_ratio == "auto" and image_size is None:
        return ExpectedOutput(short, None, None, *timing)
    return ExpectedOutput(short, width, height, *timing)


def _rebuilt(
    sub: Submission, *, own_images: bool, image_dir: Path | None = None
) -> KvidRequest | GenerationRequest | None:
    """``sub``'s request rebuilt from its row's cells. Without ``own_images`` an
    image-to-video's image is a stand-in URL (the output's size depends on it only through
    aspect ratio ``auto``); with them, the rebuilt request is returned only when it has the
    job's hash: its local image still holds the bytes it was sent with."""
    cells = json.loads(sub.params_json)
    params = {k: v for k, v in cells.items() if k not in ROW_COLUMNS}
    images: dict[str, str | None] = {
        target: next((cells[c] for c in columns if cells.get(c)), None)
        for target, columns in IMAGE_COLUMNS.items()
    }
    if not own_images:
        images = {"image": _IMAGE_STAND_IN if sub.job_kind == JobKind.IMAGE_TO_VIDEO else None}
    try:
        request = build_request(
            sub.prompt, dialect=sub.dialect, job=sub.job_kind, model=sub.model or None,
            base_dir=image_dir, **images, **params,
        )  # fmt: skip
    except (KvidError, TypeError, ValueError, OSError):
        return None
    if own_images and request.canonical_hash() != sub.request_hash:
        return None  # moved, changed, or resolved elsewhere: not the image that was sent
    return request


def _image_size(image: LocalImage) -> tuple[int, int] | None:
    """(width, height) of a local image, as the service's decoder reads it."""
    try:
        with av.open(os.fspath(image)) as container:
            frame = next(container.decode(video=0))
            return frame.width, frame.height
    except (av.FFmpegError, OSError, StopIteration, IndexError):
        return None


def assess(probe: VideoProbe, figures: PictureFigures, expected: ExpectedOutput) -> VideoQuality:
    """The record the ledger keeps of a video: its figures, what was asked, the verdicts."""
    verdicts = {o.check: o.passed for o in _judge(probe, figures, expected)}
    return VideoQuality(
        sampled_frames=figures.sampled_frames,
        luma_mean=figures.luma_mean,
        luma_stddev=figures.luma_stddev,
        changed_pct=figures.changed_pct,
        expected_short_side=expected.short_side,
        expected_width=expected.width,
        expected_height=expected.height,
        expected_fps=expected.fps,
        expected_frames=expected.frames,
        expected_duration_s=expected.duration_s,
        matches_request=verdicts[QualityCheck.MATCHES_REQUEST],
        not_blank=verdicts[QualityCheck.NOT_BLANK],
        not_frozen=verdicts[QualityCheck.NOT_FROZEN],
    )


def outcomes(video: VideoFile) -> list[CheckOutcome]:
    """Each check's verdict on a stored video, with its figures; [] when it was never
    measured (not downloaded, or fetched before kvid-dagster measured videos)."""
    q = video.quality
    if q is None or video.width is None or video.height is None:
        return []
    probe = VideoProbe(
        width=video.width,
        height=video.height,
        fps=video.fps or 0.0,
        num_frames=video.num_frames or 0,
        duration_s=video.duration_s or 0.0,
        codec="",
    )
    figures = PictureFigures(q.sampled_frames, q.luma_mean, q.luma_stddev, q.changed_pct)
    expected = ExpectedOutput(
        q.expected_short_side, q.expected_width, q.expected_height, q.expected_fps,
        q.expected_frames, q.expected_duration_s,
    )  # fmt: skip
    return _judge(probe, figures, expected)


def _judge(
    probe: VideoProbe, figures: PictureFigures, expected: ExpectedOutput
) -> list[CheckOutcome]:
    return [_matches(probe, expected), _not_blank(figures), _not_frozen(figures)]


def _matches(probe: VideoProbe, expected: ExpectedOutput) -> CheckOutcome:
    problems: list[str] = []
    width, height = probe.width, probe.height
    if expected.width is not None and expected.height is not None:
        if max(abs(width - expected.width), abs(height - expected.height)) > SIZE_TOLERANCE_PX:
            problems.append(
                f"{width}x{height}, the request asks for {expected.width}x{expected.height}"
            )
    elif (
        expected.short_side is not None
        and abs(min(width, height) - expected.short_side) > SIZE_TOLERANCE_PX
    ):
        problems.append(
            f"{width}x{height}, the request asks for a short side of {expected.short_side} px "
            "(aspect ratio auto: the long side follows the input image, not at hand)"
        )
    for name, got, want, tolerance, unit in (
        ("fps", probe.fps, expected.fps, FPS_TOLERANCE, " fps"),
        ("frames", probe.num_frames, expected.frames, FRAMES_TOLERANCE, " frames"),
        ("duration", probe.duration_s, expected.duration_s, DURATION_TOLERANCE_S, " s"),
    ):
        if want is not None and abs(got - want) > tolerance:
            problems.append(f"{name} {got:g}{unit}, the request asks for {want:g}")
    found = (
        f"{width}x{height}, {probe.fps:g} fps, {probe.num_frames} frames, "
        f"{probe.duration_s:g} s: as the request asks"
    )
    return CheckOutcome(
        QualityCheck.MATCHES_REQUEST,
        passed=not problems,
        description="; ".join(problems) or found,
        measured={
            "width": width,
            "height": height,
            "fps": probe.fps,
            "num_frames": probe.num_frames,
            "duration_s": probe.duration_s,
        },
        expected={
            "short_side": expected.short_side,
            "width": expected.width,
            "height": expected.height,
            "fps": expected.fps,
            "num_frames": expected.frames,
            "duration_s": expected.duration_s,
        },
        rule=f"±{SIZE_TOLERANCE_PX} px a side, ±{FPS_TOLERANCE:g} fps, ±{FRAMES_TOLERANCE} "
        f"frame, ±{DURATION_TOLERANCE_S:g} s",
    )


def _not_blank(figures: PictureFigures) -> CheckOutcome:
    flat = figures.luma_stddev <= FLAT_STDDEV
    black = figures.luma_mean <= BLACK_MEAN
    if black:
        found = f"every sampled frame is black (the brightest: mean luma {figures.luma_mean:g})"
    elif flat:
        found = (
            f"every sampled frame is one flat colour (the most varied: luma standard deviation "
            f"{figures.luma_stddev:g})"
        )
    else:
        found = f"the picture varies (luma standard deviation up to {figures.luma_stddev:g})"
    return CheckOutcome(
        QualityCheck.NOT_BLANK,
        passed=not (flat or black),
        description=f"{found}, of {figures.sampled_frames} sampled frames",
        measured={
            "luma_mean": figures.luma_mean,
            "luma_stddev": figures.luma_stddev,
            "sampled_frames": figures.sampled_frames,
        },
        expected={"luma_mean": BLACK_MEAN, "luma_stddev": FLAT_STDDEV},
        rule=f"blank when every sampled frame has mean luma ≤ {BLACK_MEAN:g} or luma standard "
        f"deviation ≤ {FLAT_STDDEV:g} (0-255)",
    )


def _not_frozen(figures: PictureFigures) -> CheckOutcome:
    frozen = figures.changed_pct <= FROZEN_CHANGED_PCT
    found = (
        f"no change across the clip: at most {figures.changed_pct:g}% of the picture differs "
        "from the first frame"
        if frozen
        else f"the picture changes: up to {figures.changed_pct:g}% of it from the first frame"
    )
    return CheckOutcome(
        QualityCheck.NOT_FROZEN,
        passed=not frozen,
        description=f"{found}, of {figures.sampled_frames} sampled frames",
        measured={"changed_pct": figures.changed_pct, "sampled_frames": figures.sampled_frames},
        expected={"changed_pct": FROZEN_CHANGED_PCT},
        rule=f"frozen when no sampled frame has more than {FROZEN_CHANGED_PCT:g}% of its picture "
        f"differing from the first frame by more than {CHANGE_LEVELS} luma levels (0-255)",
    )
