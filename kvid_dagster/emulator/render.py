"""Real H.264 MP4s for emulated jobs, rendered with PyAV from frames made in numpy.

Text-to-video draws a procedural scene (sky, hills, a sun, moving figures) whose colours, shapes
and motion derive from sha256(seed, prompt): the same prompt and seed give the same pixels.
Image-to-video moves a camera over the input image (a slow zoom and pan, "Ken Burns"), so the
video visibly shows the input, and cross-fades to ``end_image_url`` when one is given;
reference-to-video does the same over its first reference (an image, or a video's first frame).

A prompt may ask for a broken video, the way a real model sometimes delivers one (``Defect``):
``[[kvid:wrong-size]]`` renders half the contract's size, ``[[kvid:black]]`` every frame black,
``[[kvid:frozen]]`` the first frame throughout. The job completes as any other.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import av
import httpx
import numpy as np

RESOLUTION_SHORT_SIDE: Final = {"480p": 480, "580p": 580, "720p": 720, "1080p": 1080}
V2_FPS: Final = 24
MAX_IMAGE_PIXELS: Final = 64_000_000


class Defect(StrEnum):
    """A broken video a prompt asks for with the marker ``[[kvid:<value>]]``."""

    WRONG_SIZE = "wrong-size"  # half the width and height the contract says
    BLACK = "black"  # every frame black
    FROZEN = "frozen"  # the first frame, repeated for the whole clip

    @property
    def marker(self) -> str:
        return f"[[kvid:{self.value}]]"


def defects_in(prompt: str) -> frozenset[Defect]:
    """The defects whose markers ``prompt`` holds."""
    return frozenset(d for d in Defect if d.marker in prompt)


class RenderCancelled(Exception):
    """The emulator is stopping; the half-written video is discarded."""


class ImageError(Exception):
    """The input image could not be fetched or decoded; the job ends FAILED with this reason."""


@dataclass(frozen=True)
class Geometry:
    """What the output video is, per the contract's rule."""

    width: int
    height: int
    fps: int
    frames: int


def _round_even(value: Fraction) -> int:
    # round half up to an even integer, exactly (Fractions: 720 * 21 / 9 is 1680, not 1679.99)
    return math.floor(value / 2 + Fraction(1, 2)) * 2


def frame_size(
    resolution: str, aspect_ratio: str, image_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(width, height): short side = the resolution's number, long side by the aspect ratio.

    ``auto`` takes the input image's ratio (``image_size`` = (width, height)).
    """
    short = RESOLUTION_SHORT_SIDE[resolution]
    if aspect_ratio == "auto":
        if image_size is None:
            raise ValueError("aspect_ratio 'auto' needs the input image's size")
        ratio = Fraction(image_size[0], image_size[1])
    else:
        num, den = (int(p) for p in aspect_ratio.split(":"))
        ratio = Fraction(num, den)
    if ratio >= 1:
        return _round_even(short * ratio), short
    return short, _round_even(short / ratio)


def timing(model: str, params: Mapping[str, Any]) -> tuple[int, int]:
    """(fps, frames): v1 ``num_frames`` at ``frames_per_second``; v2 24 fps x ``duration`` s."""
    if model == "v1":
        return int(params["frames_per_second"]), int(params["num_frames"])
    return V2_FPS, V2_FPS * int(params["duration"])


@dataclass(frozen=True)
class RenderPlan:
    """What a job's video is made from and its size, whichever dialect asked for it."""

    prompt: str
    resolution: str
    aspect_ratio: str  # "auto": the input image's ratio
    fps: int
    frames: int
    camera_fixed: bool = False
    image_bytes: bytes | None = None  # the input image, sent inline...
    image_url: str | None = None  # ...or where it is (an image, or a video: its first frame)
    end_image_url: str | None = None  # cross-faded to at the end

    @property
    def animates_image(self) -> bool:
        """A camera move over an input image (else a procedural scene from the prompt)."""
        return self.image_bytes is not None or self.image_url is not None

    @property
    def defects(self) -> frozenset[Defect]:
        return defects_in(self.prompt)

    def geometry(self, image_size: tuple[int, int] | None = None) -> Geometry:
        """The output per the contract's rule (``image_size`` (w, h) decides ``auto``), but
        half of it each side when the prompt asks for ``Defect.WRONG_SIZE``."""
        width, height = frame_size(self.resolution, self.aspect_ratio, image_size)
        if Defect.WRONG_SIZE in self.defects:
            width, height = _round_even(Fraction(width, 2)), _round_even(Fraction(height, 2))
        return Geometry(width, height, self.fps, self.frames)


def with_defects(
    frames: Iterable[np.ndarray | av.VideoFrame], defects: frozenset[Defect]
) -> Iterator[np.ndarray | av.VideoFrame]:
    """``frames`` broken as ``defects`` say: each one black, or each one the first."""
    if not defects & {Defect.BLACK, Defect.FROZEN}:
        yield from frames
        return
    first: np.ndarray | None = None
    for frame in frames:  # each is still made: the clip keeps its length
        if first is None:
            first = frame if isinstance(frame, np.ndarray) else frame.to_ndarray(format="rgb24")
            if Defect.BLACK in defects:
                first = np.zeros_like(first)
        yield first


def video_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video file, as a decoder reads it."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.width, stream.codec_context.height


# --- input images ----------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image (JPEG, PNG, WebP, ... anything FFmpeg reads) to an RGB uint8 array."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            if frame.width * frame.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image too large: {frame.width}x{frame.height}")
            rgb = frame.to_ndarray(format="rgb24")
    except ImageError:
        raise
    except Exception as exc:  # any decoder complaint means "not an image we can use"
        raise ImageError(f"could not decode the image: {type(exc).__name__}: {exc}") from exc
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageError(f"image too small: {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def fetch_image(client: httpx.Client, url: str, *, timeout: float, max_bytes: int) -> bytes:
    """GET an image with a deadline and a size cap (http/https only, redirects followed)."""
    deadline = time.monotonic() + timeout
    try:
        with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ImageError(f"could not fetch {url}: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"image at {url} is larger than {max_bytes} bytes")
            buf = bytearray()
            for chunk in response.iter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise ImageError(f"image at {url} is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageError(f"could not fetch {url}: timed out after {timeout} s")
            return bytes(buf)
    except httpx.HTTPError as exc:
        raise ImageError(f"could not fetch {url}: {type(exc).__name__}") from exc


# --- encoding --------------------------------------------------------------------------------


def encode(
    path: Path,
    geometry: Geometry,
    frames: Iterable[np.ndarray | av.VideoFrame],
    cancel: threading.Event | None = None,
) -> int:
    """Encode frames (RGB arrays or VideoFrames) to H.264/yuv420p MP4; return the file size.

    Written to a ``.part`` file and renamed, so a served file is always complete.
    """
    tmp = path.with_name(path.name + ".part")
    time_base = Fraction(1, geometry.fps)
    count = 0
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=geometry.fps)
            stream.width, stream.height = geometry.width, geometry.height
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "26"}
            for item in frames:
                if cancel is not None and cancel.is_set():
                    raise RenderCancelled
                frame = (
                    item
                    if isinstance(item, av.VideoFrame)
                    else av.VideoFrame.from_ndarray(item, format="rgb24")
                )
                frame.pts, frame.time_base = count, time_base
                container.mux(stream.encode(frame))
                count += 1
            container.mux(stream.encode(None))
        if count != geometry.frames:
            raise RuntimeError(f"rendered {count} frames, expected {geometry.frames}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


# --- text-to-video: a procedural scene -------------------------------------------------------

# (keywords, sky top, sky at the horizon, hills) — the prompt picks the mood, the seed varies it
_PALETTES: Final[
    list[tuple[tuple[str, ...], tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]]
] = [
    (("sunset", "sunrise", "dusk", "dawn"), (70, 40, 120), (250, 140, 60), (60, 40, 50)),
    (("night", "moon", "star", "dark"), (5, 10, 35), (45, 55, 100), (15, 20, 30)),
    (("snow", "winter", "ice"), (150, 180, 220), (230, 235, 245), (235, 240, 250)),
    (("desert", "sand", "dune"), (90, 150, 220), (240, 215, 170), (210, 170, 110)),
    (
        ("ocean", "sea", "water", "lake", "pond", "river", "beach"),
        (40, 110, 200),
        (170, 210, 240),
        (30, 90, 140),
    ),
    (
        ("forest", "park", "tree", "mountain", "hiking", "garden", "lotus"),
        (70, 140, 220),
        (190, 220, 240),
        (50, 120, 50),
    ),
    (
        ("room", "indoor", "vacuum", "kitchen", "house", "office"),
        (200, 190, 170),
        (230, 220, 200),
        (140, 100, 70),
    ),
]


def _scene_rng(prompt: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return np.random.default_rng(list(digest))


def _palette(prompt: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    text = prompt.lower()
    for words, top, horizon, hills in _PALETTES:
        if any(word in text for word in words):
            base = np.array([top, horizon, hills], dtype=np.float32)
            break
    else:
        base = rng.uniform(20, 235, size=(3, 3)).astype(np.float32)
    jitter = rng.uniform(-25, 25, size=(3, 3)).astype(np.float32)
    top, horizon, hills = np.clip(base + jitter, 0, 255)
    return top, horizon, hills


def _draw_ellipse(
    frame: np.ndarray, cx: float, cy: float, rx: float, ry: float, color: np.ndarray
) -> None:
    """Anti-aliased filled ellipse, computed only over its bounding box."""
    height, width = frame.shape[:2]
    x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, width)
    y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, height)
    if x0 >= x1 or y0 >= y1:
        return
    xs = (np.arange(x0, x1, dtype=np.float32) - cx) / rx
    ys = (np.arange(y0, y1, dtype=np.float32) - cy) / ry
    dist = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2)
    alpha = np.clip((1.0 - dist) * min(rx, ry), 0.0, 1.0)[..., None]
    box = frame[y0:y1, x0:x1]
    box[...] = (box * (1.0 - alpha) + color * alpha + 0.5).astype(np.uint8)


def text_frames(
    geometry: Geometry, prompt: str, seed: int, *, camera_fixed: bool = False
) -> Iterator[np.ndarray]:
    """Frames of a scene derived from prompt and seed: deterministic, vectorised."""
    rng = _scene_rng(prompt, seed)
    text = prompt.lower()
    width, height, count = geometry.width, geometry.height, geometry.frames
    short = min(width, height)
    top, horizon, hills = _palette(prompt, rng)

    # camera directions, best effort (as the vendor says of its own model)
    low_angle = "low angle" in text or "low-angle" in text
    close_up = "close-up" in text or "close up" in text
    slow = "slow" in text

    pan = 0 if camera_fixed else round(width * 0.2)
    pano_width = width + pan
    rows = np.arange(height, dtype=np.float32)[:, None]
    grad = rows / max(height - 1, 1)
    sky = top * (1.0 - grad) + horizon * grad  # (height, 3)
    pano = np.empty((height, pano_width, 3), dtype=np.float32)
    pano[...] = sky[:, None, :]
    xs = np.arange(pano_width, dtype=np.float32) / pano_width
    horizon_frac = 0.72 if low_angle else 0.58
    for layer, (depth, shade) in enumerate(((0.0, 0.75), (0.12, 1.0))):
        profile = np.full(pano_width, (horizon_frac + depth) * height, dtype=np.float32)
        for _ in range(3):
            cycles = int(rng.integers(1, 5)) * (layer + 1)
            amp = rng.uniform(0.02, 0.07) * height
            profile += amp * np.sin(2 * np.pi * cycles * xs + rng.uniform(0, 2 * np.pi))
        color = hills * shade
        shaded = color * (0.75 + 0.35 * grad)  # (height, 3): lighter towards the viewer
        mask = rows >= profile[None, :]
        pano = np.where(mask[..., None], shaded[:, None, :], pano)
    pano_u8 = np.ascontiguousarray(pano.round().astype(np.uint8))

    sun_color = np.array([255, 235, 150] if "night" not in text else [235, 235, 255], np.float32)
    sun_r = short * rng.uniform(0.05, 0.09)
    sun_x0, sun_x1 = rng.uniform(0.1, 0.4) * width, rng.uniform(0.6, 0.9) * width
    if rng.random() < 0.5:
        sun_x0, sun_x1 = sun_x1, sun_x0

    movers = []
    for _ in range(int(rng.integers(2, 5))):
        size = short * rng.uniform(0.04, 0.09) * (1.8 if close_up else 1.0)
        speed = rng.uniform(0.2, 0.6) * width / max(count, 1) * (0.5 if slow else 1.0)
        movers.append(
            (
                rng.uniform(0, width),  # start x
                speed * (1 if rng.random() < 0.5 else -1),
                rng.uniform(horizon_frac + 0.1, 0.93) * height,  # ground line
                size * rng.uniform(0.8, 1.6),  # rx
                size,  # ry
                rng.uniform(0.02, 0.06) * height,  # bob amplitude
                rng.uniform(2, 6),  # bobs per clip
                rng.uniform(30, 250, size=3).astype(np.float32),
            )
        )
    pan_right = rng.random() < 0.5

    for i in range(count):
        t = i / max(count - 1, 1)
        offset = round(pan * (t if pan_right else 1.0 - t))
        frame = pano_u8[:, offset : offset + width].copy()
        sun_x = sun_x0 + (sun_x1 - sun_x0) * t
        sun_y = height * (0.32 - 0.12 * math.sin(math.pi * t))
        _draw_ellipse(frame, sun_x, sun_y, sun_r, sun_r, sun_color)
        for x0, vx, ground, rx, ry, bob, bobs, color in movers:
            span = width + 2 * rx
            x = (x0 + vx * i) % span - rx
            y = ground - abs(math.sin(math.pi * bobs * t)) * bob
            _draw_ellipse(frame, x, y, rx, ry, color)
        yield frame


# --- image-to-video: a camera move over the input ---------------------------------------------


def _cover_box(src_w: int, src_h: int, ratio: float) -> tuple[float, float]:
    """The largest box of aspect ``ratio`` (w/h) that fits inside the source."""
    if src_w / src_h > ratio:
        return src_h * ratio, float(src_h)
    return float(src_w), src_w / ratio


def _crop_resize(
    image: np.ndarray, cx: float, cy: float, w: float, h: float, out: Geometry, fmt: str
) -> av.VideoFrame:
    src_h, src_w = image.shape[:2]
    cw, ch = max(2, min(src_w, round(w))), max(2, min(src_h, round(h)))
    x0 = min(max(round(cx - cw / 2), 0), src_w - cw)
    y0 = min(max(round(cy - ch / 2), 0), src_h - ch)
    crop = np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw])
    frame = av.VideoFrame.from_ndarray(crop, format="rgb24")
    return frame.reformat(width=out.width, height=out.height, format=fmt, interpolation="BILINEAR")


def _fit(image: np.ndarray, out: Geometry) -> np.ndarray:
    """The image cover-fitted (centre crop, then scale) to the output size, as RGB."""
    src_h, src_w = image.shape[:2]
    w, h = _cover_box(src_w, src_h, out.width / out.height)
    frame = _crop_resize(image, src_w / 2, src_h / 2, w, h, out, "rgb24")
    return frame.to_ndarray(format="rgb24")


def image_frames(
    geometry: Geometry,
    image: np.ndarray,
    *,
    end_image: np.ndarray | None = None,
    seed: int = 0,
    prompt: str = "",
    camera_fixed: bool = False,
) -> Iterator[np.ndarray | av.VideoFrame]:
    """Frames that move a camera over ``image`` and cross-fade to ``end_image`` at the end."""
    rng = np.random.default_rng(seed & 0xFFFF_FFFF_FFFF_FFFF)
    src_h, src_w = image.shape[:2]
    count = geometry.frames
    base_w, base_h = _cover_box(src_w, src_h, geometry.width / geometry.height)
    zoom_in = "zoom out" not in prompt.lower()
    angle = rng.uniform(0, 2 * math.pi)
    dir_x, dir_y = math.cos(angle), math.sin(angle)
    end_rgb = _fit(end_image, geometry) if end_image is not None else None
    fade_from = 0.7  # the last 30% cross-fades to the end image

    still: np.ndarray | None = None
    columns = np.arange(geometry.width, dtype=np.float32)
    for i in range(count):
        t = i / max(count - 1, 1)
        ease = t * t * (3 - 2 * t)
        weight = 0
        if end_rgb is not None and t > fade_from:
            weight = round(256 * (t - fade_from) / (1 - fade_from))
        frame: np.ndarray | av.VideoFrame
        if camera_fixed:
            # a fixed camera: the light moves instead, a soft bright band sweeping across
            if still is None:
                still = _fit(image, geometry)
            centre = (-0.2 + 1.4 * t) * geometry.width
            gain = 1.0 + 0.18 * np.exp(-(((columns - centre) / (0.15 * geometry.width)) ** 2))
            frame = np.clip(still * gain[None, :, None], 0, 255).astype(np.uint8)
        else:
            zoom = 1.0 + 0.2 * (ease if zoom_in else 1.0 - ease)
            w, h = base_w / zoom, base_h / zoom
            cx = src_w / 2 + dir_x * ease * (src_w - w) / 2 * 0.9
            cy = src_h / 2 + dir_y * ease * (src_h - h) / 2 * 0.9
            # straight to yuv420p when nothing is blended: the encoder then converts nothing
            frame = _crop_resize(image, cx, cy, w, h, geometry, "rgb24" if weight else "yuv420p")
        if weight and end_rgb is not None:
            start = frame if isinstance(frame, np.ndarray) else frame.to_ndarray(format="rgb24")
            mixed = start.astype(np.uint16) * (256 - weight) + end_rgb.astype(np.uint16) * weight
            frame = (mixed >> 8).astype(np.uint8)
        yield frame
