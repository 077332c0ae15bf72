"""Small previews of videos for the Dagster UI: a clip's poster (one still, small enough for the
UI to show inline) and animated WebP, a contact sheet of several clips' first frames.

Metadata lives in Dagster's event log, so every image is shrunk, rung by rung of a ladder,
until its base64 ``data:`` URI leaves room for the Markdown around it within
:data:`MAX_MARKDOWN_BYTES` (a poster: within :data:`INLINE_MARKDOWN_CHARS`). Dagster-free:
PyAV (whose wheel ships libwebp) and numpy only.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from io import BytesIO
from pathlib import Path
from typing import Final

import av
import numpy as np

from kvid_dagster.client._download import create_new_file
from kvid_dagster.media.probe import probe_video
from kvid_dagster.media.storage import StorageError, StoragePath, is_remote, put_bytes, storage_path

#: what one preview's Markdown may take in the event log
MAX_MARKDOWN_BYTES: Final = 64 * 1024
#: the image itself: base64 makes it 4/3 larger, leaving ~1 KiB for the alt text and caption
MAX_IMAGE_BYTES: Final = 47 * 1024
#: Dagster's UI (1.13) renders a Markdown metadata value in place only when it is shorter than
#: this many characters; a longer one waits behind a "[Show Markdown]" link
INLINE_MARKDOWN_CHARS: Final = 1000
POSTER_ALT: Final = "poster"
#: a poster's bytes: base64 makes them 4/3 larger, and its Markdown must stay inline
MAX_POSTER_BYTES: Final = (
    (INLINE_MARKDOWN_CHARS - 1 - len(f"![{POSTER_ALT}](data:image/webp;base64,)")) // 4 * 3
)
#: in the cache files' names, so a change of the ladders below encodes every preview again
CACHE_VERSION: Final = 1
_MS: Final = Fraction(1, 1000)  # WebP frame durations are whole milliseconds


@dataclass(frozen=True)
class Rung:
    """One size to try: ``frames`` at most, the long side at most ``size`` px, libwebp quality."""

    frames: int
    size: int
    quality: int


#: best first; the last is one small poster frame, which fits whatever the clip shows
CLIP_LADDER: Final = (
    Rung(24, 320, 60),
    Rung(16, 256, 50),
    Rung(10, 200, 40),
    Rung(6, 160, 30),
    Rung(1, 160, 30),
)
#: posters: the clip's middle frame, as large as the inline budget allows; the last always fits
POSTER_LADDER: Final = (
    Rung(1, 320, 20),
    Rung(1, 256, 15),
    Rung(1, 200, 10),
    Rung(1, 160, 5),
    Rung(1, 128, 5),
    Rung(1, 96, 5),
    Rung(1, 64, 5),
)
#: contact sheets: one frame per clip, ``size`` is a cell's long side
SHEET_LADDER: Final = (Rung(1, 200, 60), Rung(1, 160, 45), Rung(1, 120, 35), Rung(1, 80, 25))
SHEET_ASPECT: Final = Fraction(16, 9)  # cells are landscape; other clips are letterboxed


class PreviewError(Exception):
    """A video could not be read, or not even the smallest rung fits the budget."""


@dataclass(frozen=True)
class WebpImage:
    """An encoded WebP (animated when it holds several frames)."""

    data: bytes

    def data_uri(self) -> str:
        return "data:image/webp;base64," + base64.b64encode(self.data).decode("ascii")

    def markdown(self, alt: str) -> str:
        """A Markdown image: Dagster's UI renders ``data:`` images (and plays animated ones)."""
        return f"![{alt}]({self.data_uri()})"


class PreviewKind(StrEnum):
    """The images made of each clip; the value names its cache file."""

    ANIMATION = "preview"  # frames spread over the clip, behind the UI's "[Show Markdown]"
    POSTER = "poster"  # the middle frame, small enough for the UI to show in place


@dataclass(frozen=True)
class VideoPreviews:
    animation: WebpImage
    poster: WebpImage

    @classmethod
    def of(cls, data: Mapping[PreviewKind, bytes]) -> VideoPreviews:
        return cls(WebpImage(data[PreviewKind.ANIMATION]), WebpImage(data[PreviewKind.POSTER]))

    def by_kind(self) -> dict[PreviewKind, bytes]:
        return {PreviewKind.ANIMATION: self.animation.data, PreviewKind.POSTER: self.poster.data}

    def poster_markdown(self) -> str:
        """The poster as Markdown short enough for Dagster's UI to show it in place."""
        return self.poster.markdown(POSTER_ALT)


def video_previews(path: str | Path) -> VideoPreviews:
    """An animated WebP of frames spread over the clip, playing at the clip's pace, and a
    poster of its middle frame; both from one decoding of the clip.

    Cached beside the video as hidden ``.<name>.<kind>-v<N>.webp`` files: a re-report reads
    them back instead of decoding and encoding again. A video replaced since (a refetch) is
    newer than its caches, and is encoded again. ``path`` may be a remote URI
    (``s3://...``, see :mod:`kvid_dagster.media.storage`): its caches are objects beside it.
    """
    if is_remote(path):
        return _remote_previews(storage_path(path))
    video = Path(path)
    caches = {kind: cache_path(video, kind) for kind in PreviewKind}
    try:
        newest = video.stat().st_mtime_ns
        if all(cache.stat().st_mtime_ns >= newest for cache in caches.values()):
            return VideoPreviews.of({k: cache.read_bytes() for k, cache in caches.items()})
    except FileNotFoundError:
        pass
    previews = _encode_previews(video)
    for kind, data in previews.by_kind().items():
        _write_cache(caches[kind], data)
    return previews


def _remote_previews(video: StoragePath) -> VideoPreviews:
    """``video_previews`` of a stored object: the cached objects when they are not older than
    the video (the poller writes them right after the video), else made from a copy of the
    video in the system temp dir and cached (best effort)."""
    caches = {kind: cache_path(video, kind) for kind in PreviewKind}
    try:
        with contextlib.suppress(FileNotFoundError):
            newest = video.stat().st_mtime
            if all(cache.stat().st_mtime >= newest for cache in caches.values()):
                return VideoPreviews.of({k: cache.read_bytes() for k, cache in caches.items()})
    except OSError as exc:  # storage unreachable
        raise PreviewError(f"{video}: {type(exc).__name__}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="kvid-preview-") as scratch:
        previews = _encode_previews(_local_copy(video, Path(scratch)))
    with contextlib.suppress(StorageError):
        store_previews(previews, video)
    return previews


def store_previews(previews: VideoPreviews, video: StoragePath) -> None:
    """Put ``previews`` beside a stored ``video`` (raises :class:`StorageError`)."""
    for kind, data in previews.by_kind().items():
        put_bytes(data, cache_path(video, kind))


def cache_path(video: StoragePath, kind: PreviewKind = PreviewKind.ANIMATION) -> StoragePath:
    """Where ``video_previews`` keeps ``video``'s ``kind`` of preview: hidden, beside it."""
    return video.with_name(f".{video.name}.{kind.value}-v{CACHE_VERSION}.webp")


def _encode_previews(video: Path) -> VideoPreviews:
    frames, duration_s = _sample_frames(video, CLIP_LADDER[0].frames)
    middle = [frames[len(frames) // 2]]
    return VideoPreviews(
        animation=_fit_ladder(CLIP_LADDER, lambda rung: _clip_webp(frames, duration_s, rung)),
        poster=_fit_ladder(
            POSTER_LADDER, lambda rung: _clip_webp(middle, 0.0, rung), MAX_POSTER_BYTES
        ),
    )


def contact_sheet(paths: Sequence[str | Path], *, columns: int = 4) -> WebpImage:
    """One still WebP: each video's first frame in a grid cell, row by row in ``paths`` order
    (local paths or stored URIs)."""
    if not paths:
        raise PreviewError("no videos for a contact sheet")
    with tempfile.TemporaryDirectory(prefix="kvid-preview-") as scratch:
        firsts = [_sample_frames(_local_copy(p, Path(scratch)), 1)[0][0] for p in paths]
    return _fit_ladder(SHEET_LADDER, lambda rung: _sheet_webp(firsts, columns, rung))


def _local_copy(video: str | StoragePath, folder: Path) -> Path:
    """``video`` itself when it is a local file, else a copy of the stored object in
    ``folder`` (decoding reads all of it)."""
    if not is_remote(video):
        return Path(video)
    stored = storage_path(video)
    local = folder / f"{len(list(folder.iterdir()))}-{stored.name}"
    try:
        with stored.open("rb") as source, local.open("wb") as copy:
            shutil.copyfileobj(source, copy, 1024 * 1024)
    except OSError as exc:  # storage unreachable, the object gone
        raise PreviewError(f"{stored}: {type(exc).__name__}: {exc}") from exc
    return local


def _fit_ladder(
    ladder: Sequence[Rung], encode: Callable[[Rung], bytes], max_bytes: int = MAX_IMAGE_BYTES
) -> WebpImage:
    size = 0
    for rung in ladder:
        data = encode(rung)
        if len(data) <= max_bytes:
            return WebpImage(data)
        size = len(data)
    raise PreviewError(f"no preview fits {max_bytes} bytes (the smallest: {size})")


def _sample_frames(path: Path, count: int) -> tuple[list[av.VideoFrame], float]:
    """Up to ``count`` frames evenly spread from the first to the last (decoding stops after
    the last one wanted), at most the largest rung's size; and the clip's duration."""
    try:
        probe = probe_video(path)
        wanted = set(np.linspace(0, max(probe.num_frames - 1, 0), count).round().astype(int))
        width, height = _scaled(probe.width, probe.height, CLIP_LADDER[0].size)
        frames: list[av.VideoFrame] = []
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames.append(frame.reformat(width=width, height=height, format="yuv420p"))
                if index >= max(wanted):
                    break
    except (av.FFmpegError, OSError, IndexError) as exc:  # IndexError: no video stream
        raise PreviewError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if not frames:
        raise PreviewError(f"{path.name}: no frame decoded")
    return frames, probe.duration_s


def _scaled(width: int, height: int, size: int) -> tuple[int, int]:
    """Even dimensions (yuv420p) with the long side at most ``size``, never enlarged."""
    scale = min(1.0, size / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _clip_webp(frames: Sequence[av.VideoFrame], duration_s: float, rung: Rung) -> bytes:
    picks = np.linspace(0, len(frames) - 1, min(rung.frames, len(frames))).round().astype(int)
    width, height = _scaled(frames[0].width, frames[0].height, rung.size)
    chosen = [frames[i].reformat(width=width, height=height) for i in picks]
    frame_ms = max(20, round(1000 * duration_s / len(chosen)))  # browsers slow < 20 ms down
    return _encode_webp(chosen, frame_ms, rung.quality)


def _sheet_webp(firsts: Sequence[av.VideoFrame], columns: int, rung: Rung) -> bytes:
    cell_w, cell_h = rung.size, round(rung.size / SHEET_ASPECT / 2) * 2
    cols = min(columns, len(firsts))
    rows = math.ceil(len(firsts) / cols)
    sheet = np.zeros((rows * cell_h, cols * cell_w, 3), dtype=np.uint8)
    for i, frame in enumerate(firsts):
        scale = min(cell_w / frame.width, cell_h / frame.height)
        w, h = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
        pixels = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
        top = (i // cols) * cell_h + (cell_h - h) // 2
        left = (i % cols) * cell_w + (cell_w - w) // 2
        sheet[top : top + h, left : left + w] = pixels
    return _encode_webp([av.VideoFrame.from_ndarray(sheet, format="rgb24")], 0, rung.quality)


def _encode_webp(frames: Sequence[av.VideoFrame], frame_ms: int, quality: int) -> bytes:
    """libwebp_anim (looping forever) for several frames, libwebp for one."""
    buffer = BytesIO()
    codec = "libwebp_anim" if len(frames) > 1 else "libwebp"
    with av.open(buffer, "w", format="webp", options={"loop": "0"}) as container:
        stream = container.add_stream(codec, rate=Fraction(1000, max(frame_ms, 1)))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.codec_context.time_base = _MS
        stream.options = {"quality": str(quality)}
        for index, frame in enumerate(frames):
            out = frame.reformat(format="yuv420p")
            out.pts, out.time_base = index * frame_ms, _MS
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _write_cache(cache: Path, data: bytes) -> None:
    """Atomically (a reader never sees half a file). Best effort: a folder that cannot be
    written costs only the encoding again; the ``.part`` suffix lets the poller's sweep of
    leftovers remove a temp file a killed process left."""
    with contextlib.suppress(OSError):
        fd, tmp = create_new_file(cache.parent, prefix=f"{cache.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, cache)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
