"""Video previews: the animated WebP of a clip, its cache, the catalog's contact sheet, and both
in the metadata Dagster stores (a real instance, the emulator)."""

from __future__ import annotations

import base64
import io
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import EmulatorFactory
from dagster import AssetKey, AssetRecordsFilter, MarkdownMetadataValue, TextMetadataValue
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    tick_until_settled,
    write_table,
)

from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.emulator.render import RenderPlan, encode, text_frames
from kvid_dagster.ledger import Ledger
from kvid_dagster.media.preview import (
    CLIP_LADDER,
    INLINE_MARKDOWN_CHARS,
    MAX_IMAGE_BYTES,
    MAX_MARKDOWN_BYTES,
    POSTER_LADDER,
    PreviewError,
    PreviewKind,
    cache_path,
    contact_sheet,
    video_previews,
)
from kvid_dagster.translator import URI_KEY


@dataclass(frozen=True)
class Finished:
    """What :func:`finish_videos` made."""

    prompts: Path
    data_dir: Path
    home: Path  # the DAGSTER_HOME holding the materializations


def finish_videos(base_url: str, folder: Path, keys: Sequence[str]) -> Finished:
    """A table of ``keys``, submitted by a Dagster run and each video materialized by the
    status sensor's logic (as the daemon stores it), all in ``folder``."""
    prompts = write_table(folder / "prompts.csv", keys)
    finished = Finished(prompts, folder / "data", dagster_home(folder / "home"))
    defs = make_defs(base_url, prompts, finished.data_dir)
    with open_instance(finished.home) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, keys[0], keys[-1])
        tick_until_settled(defs, instance, Ledger.for_data_dir(finished.data_dir))
    return finished


DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/webp;base64,([A-Za-z0-9+/=]+)\)")


@dataclass(frozen=True)
class WebpFrame:
    width: int  # of the frame's own rectangle (an animation stores what changed)
    height: int
    duration_ms: int  # 0 for a still image
    pixels: np.ndarray  # the whole picture once this frame is drawn (RGB)


@dataclass(frozen=True)
class Webp:
    width: int
    height: int
    loops: int | None  # None for a still image; 0 is forever
    frames: list[WebpFrame]


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], 0
    while at + 8 <= len(data):
        tag, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        out.append((tag, data[at + 8 : at + 8 + size]))
        at += 8 + size + (size & 1)
    return out


def _chunk(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)


def _decode_still(chunks: bytes, width: int, height: int) -> np.ndarray:
    """RGBA of one image. PyAV's WebP decoder reads still images only, so an animation's
    frame (its VP8 data and maybe an ALPH chunk) is wrapped as one."""
    header = _chunk(b"VP8X", b"\x10\0\0\0" + (width - 1).to_bytes(3, "little")
                    + (height - 1).to_bytes(3, "little"))  # fmt: skip
    body = b"WEBP" + header + chunks
    with av.open(io.BytesIO(b"RIFF" + struct.pack("<I", len(body)) + body)) as container:
        rgba = next(container.decode(video=0)).to_ndarray(format="rgba")
    assert rgba.shape[:2] == (height, width)
    return rgba


def read_webp(data: bytes) -> Webp:
    """Parse a WebP's RIFF container, decode every frame and draw it as a browser would
    (alpha blending, disposal): a check of the file that needs no browser."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", data[:16]
    assert struct.unpack("<I", data[4:8])[0] + 8 == len(data)
    chunks = _chunks(data[12:])
    if chunks[0][0] == b"VP8 ":  # a simple still image
        with av.open(io.BytesIO(data)) as container:
            pixels = next(container.decode(video=0)).to_ndarray(format="rgb24")
        height, width = pixels.shape[:2]
        return Webp(width, height, None, [WebpFrame(width, height, 0, pixels)])
    assert chunks[0][0] == b"VP8X"
    header = chunks[0][1]
    width = int.from_bytes(header[4:7], "little") + 1
    height = int.from_bytes(header[7:10], "little") + 1
    loops = next(struct.unpack("<H", body[4:6])[0] for tag, body in chunks if tag == b"ANIM")
    canvas = np.zeros((height, width, 3), dtype=float)
    frames = []
    for tag, body in chunks:
        if tag != b"ANMF":
            continue
        x, y = 2 * int.from_bytes(body[0:3], "little"), 2 * int.from_bytes(body[3:6], "little")
        w, h = (int.from_bytes(body[i : i + 3], "little") + 1 for i in (6, 9))
        assert x + w <= width and y + h <= height
        rgba = _decode_still(body[16:], w, h).astype(float)
        alpha = rgba[..., 3:] / 255 if not body[15] & 2 else 1.0  # bit 1: do not blend
        area = canvas[y : y + h, x : x + w]
        area[:] = alpha * rgba[..., :3] + (1 - alpha) * area
        frames.append(WebpFrame(w, h, int.from_bytes(body[12:15], "little"), canvas.copy()))
        if body[15] & 1:  # dispose to the background after showing it
            area[:] = 0
    return Webp(width, height, loops, frames)


def image_of(markdown: str) -> bytes:
    match = DATA_URI.search(markdown)
    assert match, markdown[:200]
    return base64.b64decode(match.group(1), validate=True)


def render_scene(path: Path, prompt: str, *, resolution: str = "480p", frames: int = 81) -> Path:
    """What the emulator serves for a text-to-video job (a moving procedural scene)."""
    plan = RenderPlan(prompt, resolution, "16:9", 16, frames)
    geometry = plan.geometry()
    encode(path, geometry, text_frames(geometry, prompt, 7))
    return path


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: int = 16) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def solid(width: int, height: int, rgb: tuple[int, int, int], count: int = 8) -> list[np.ndarray]:
    return [np.full((height, width, 3), rgb, dtype=np.uint8)] * count


def moving(width: int, height: int, rgb: tuple[int, int, int], count: int = 8) -> list[np.ndarray]:
    """``rgb`` with a white bar that moves (an animation of identical frames is one still)."""
    frames = solid(width, height, rgb, count)
    for i, frame in enumerate(frames):
        frames[i] = frame.copy()
        frames[i][:, i * width // (2 * count) : i * width // (2 * count) + 4] = 255
    return frames


def test_a_clips_preview_is_a_looping_animated_webp_that_fits_and_plays_at_its_pace(
    tmp_path: Path,
) -> None:
    video = render_scene(tmp_path / "scene.mp4", "A sunset over the ocean")
    image = video_previews(video).animation
    assert len(image.data) <= MAX_IMAGE_BYTES
    markdown = image.markdown("preview of scene")
    assert len(markdown.encode()) <= MAX_MARKDOWN_BYTES
    assert image_of(markdown) == image.data
    webp = read_webp(image.data)
    best = CLIP_LADDER[0]
    assert webp.loops == 0  # forever
    assert (webp.width, webp.height) == (320, 180)  # 854x480 with its long side at 320
    assert len(webp.frames) == best.frames  # a normal clip fits the best rung
    assert (webp.frames[0].width, webp.frames[0].height) == (320, 180)  # then what changed
    # 24 frames over 81 at 16 fps: the preview lasts as long as the clip
    assert sum(f.duration_ms for f in webp.frames) == pytest.approx(81 / 16 * 1000, rel=0.02)
    # it moves: frames differ from one another (the scene's figures walk)
    first, last = webp.frames[0].pixels.astype(int), webp.frames[-1].pixels.astype(int)
    assert np.abs(first - last).mean() > 1.0


def test_a_clips_poster_is_its_middle_frame_small_enough_for_the_ui_to_show_in_place(
    tmp_path: Path,
) -> None:
    # red rises and blue falls through the clip: the poster shows the middle's mix
    frames = [
        np.full((480, 854, 3), (255 * i // 40, 0, 255 - 255 * i // 40), dtype=np.uint8)
        for i in range(41)
    ]
    previews = video_previews(write_mp4(tmp_path / "fade.mp4", frames))
    markdown = previews.poster_markdown()
    # Dagster's UI shows a Markdown value in place below 1000 characters, else behind a link
    assert len(markdown) < INLINE_MARKDOWN_CHARS == 1000
    assert image_of(markdown) == previews.poster.data
    poster = read_webp(previews.poster.data)
    assert poster.loops is None and len(poster.frames) == 1  # a still
    assert poster.width / poster.height == pytest.approx(854 / 480, 0.02)
    assert poster.width in {rung.size for rung in POSTER_LADDER}
    red, _, blue = poster.frames[0].pixels.mean(axis=(0, 1))
    # the middle of the 24 frames the clip is sampled at is its frame 21 of 41: (133, 0, 122)
    assert abs(red - 133) < 25 and abs(blue - 122) < 25, (red, blue)
    # the emulator's scene gets a poster as large as the budget allows
    scene = video_previews(render_scene(tmp_path / "scene.mp4", "A sunset over the ocean"))
    assert len(scene.poster_markdown()) < INLINE_MARKDOWN_CHARS
    assert read_webp(scene.poster.data).width >= 200


def test_a_busy_clip_is_shrunk_until_it_fits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (180, 320, 3), dtype=np.uint8) for _ in range(16)]
    previews = video_previews(write_mp4(tmp_path / "noise.mp4", noise))
    image = previews.animation
    assert len(image.data) <= MAX_IMAGE_BYTES
    webp = read_webp(image.data)
    # noise does not compress: the best rung would be far over, so a smaller one was chosen
    assert (webp.width, len(webp.frames)) != (320, 16)  # what the best rung would give
    assert (webp.frames[0].width, webp.frames[0].height) == (webp.width, webp.height)
    # its poster too: smaller, still in place in the UI
    assert len(previews.poster_markdown()) < INLINE_MARKDOWN_CHARS
    assert read_webp(previews.poster.data).width < POSTER_LADDER[0].size


def test_a_portrait_clip_keeps_its_shape_and_a_small_one_its_size(tmp_path: Path) -> None:
    tall = read_webp(
        video_previews(write_mp4(tmp_path / "t.mp4", moving(240, 426, (0, 0, 255)))).animation.data
    )
    assert (tall.width, tall.height) == (180, 320)  # the long side at 320
    assert len(tall.frames) == 8  # a clip of fewer frames than the rung shows each once
    small = video_previews(write_mp4(tmp_path / "s.mp4", solid(96, 64, (9, 9, 9))))
    for image in (small.animation, small.poster):
        assert (read_webp(image.data).width, read_webp(image.data).height) == (96, 64)  # as is


def test_the_previews_are_cached_beside_the_video_until_the_video_is_replaced(
    tmp_path: Path,
) -> None:
    video = write_mp4(tmp_path / "clip.mp4", solid(320, 180, (255, 0, 0)))
    first = video_previews(video)
    animation = tmp_path / ".clip.mp4.preview-v1.webp"
    poster = tmp_path / ".clip.mp4.poster-v1.webp"
    assert [cache_path(video, kind) for kind in PreviewKind] == [animation, poster]
    assert animation.read_bytes() == first.animation.data
    assert poster.read_bytes() == first.poster.data
    # no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == [poster.name, animation.name, "clip.mp4"]
    written = {cache: cache.stat().st_mtime_ns for cache in (animation, poster)}
    assert video_previews(video) == first  # read back, not encoded again
    assert {cache: cache.stat().st_mtime_ns for cache in written} == written
    # a cache of an earlier version (the animation alone): both are made again
    poster.unlink()
    assert video_previews(video) == first and poster.read_bytes() == first.poster.data
    # a refetch replaces the file (a newer mtime): encoded again, now green
    write_mp4(tmp_path / "new.mp4", solid(320, 180, (0, 255, 0)))
    os.replace(tmp_path / "new.mp4", video)
    later = max(written.values()) + 1_000_000_000
    os.utime(video, ns=(later, later))
    second = video_previews(video)
    assert second.animation != first.animation and animation.read_bytes() == second.animation.data
    assert second.poster != first.poster and poster.read_bytes() == second.poster.data
    red, green = (
        read_webp(i.data).frames[0].pixels.mean(axis=(0, 1)) for i in (first.poster, second.poster)
    )
    assert red[0] > 150 > red[1] and green[1] > 150 > green[0]


def test_a_file_that_is_not_a_video_is_a_preview_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"<html>an error page</html>" * 40)
    with pytest.raises(PreviewError, match=r"broken\.mp4"):
        video_previews(broken)
    with pytest.raises(PreviewError, match=r"missing\.mp4"):
        video_previews(tmp_path / "missing.mp4")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_contact_sheet_puts_each_first_frame_in_its_cell(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)]
    paths = [
        write_mp4(tmp_path / f"{i}.mp4", solid(*size, rgb))
        for i, (rgb, size) in enumerate(
            zip(colours, [(320, 180), (640, 360), (180, 320), (320, 180), (480, 480)], strict=True)
        )
    ]
    image = contact_sheet(paths, columns=4)
    assert len(image.data) <= MAX_IMAGE_BYTES
    webp = read_webp(image.data)
    assert webp.loops is None and len(webp.frames) == 1  # one still image
    cell_w, cell_h = webp.width // 4, webp.height // 2
    assert (webp.width, webp.height) == (4 * cell_w, 2 * cell_h) and cell_w > cell_h
    pixels = webp.frames[0].pixels.astype(int)

    def centre(index: int) -> np.ndarray:
        row, col = divmod(index, 4)
        return pixels[row * cell_h + cell_h // 2, col * cell_w + cell_w // 2]

    for index, rgb in enumerate(colours):
        assert np.abs(centre(index) - np.array(rgb)).max() < 40, (index, centre(index))
    assert centre(5).max() < 30 and centre(7).max() < 30  # empty cells stay black
    # the portrait clip is letterboxed: black beside it, its colour in the middle
    assert pixels[cell_h // 2, 2 * cell_w + 2].max() < 30
    with pytest.raises(PreviewError):
        contact_sheet([])


def test_each_video_materialization_and_the_catalog_carry_their_previews(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    emulator = emulator_factory()
    finished = finish_videos(emulator.base_url, tmp_path, ["a", "b", "c"])
    defs = make_defs(emulator.base_url, finished.prompts, finished.data_dir)
    ledger = Ledger.for_data_dir(finished.data_dir)
    with open_instance(finished.home) as instance:
        for key in ("a", "b", "c"):
            row = ledger.row(key)
            assert row is not None and row.video.local_path
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey("kvid_videos"), asset_partitions=[key]),
                limit=5,
            ).records
            assert records, key
            metadata = records[0].event_log_entry.asset_materialization.metadata
            # the video first, as the UI lists it: the poster (shown in place), the animation
            assert list(metadata)[:2] == ["poster", "preview"]
            poster = metadata["poster"]
            assert isinstance(poster, MarkdownMetadataValue)
            assert len(poster.value) < INLINE_MARKDOWN_CHARS
            assert read_webp(image_of(poster.value)).frames[0].width >= 200
            uri = metadata[URI_KEY]
            assert isinstance(uri, TextMetadataValue) and uri.value == row.video.local_path
            assert Path(uri.value).is_file()
            preview = metadata["preview"]
            assert isinstance(preview, MarkdownMetadataValue)
            assert len(preview.value.encode()) <= MAX_MARKDOWN_BYTES
            webp = read_webp(image_of(preview.value))
            assert len(webp.frames) > 1 and webp.loops == 0
            assert webp.width / webp.height == pytest.approx(
                row.video.width / row.video.height, 0.02
            )
            # today's numbers are still there beside it
            assert metadata["num_frames"].value == 81 and metadata["width"].value == row.video.width
            # the cache the re-reports read
            video = Path(row.video.local_path)
            assert (video.parent / f".{video.name}.preview-v1.webp").is_file()
        result = defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance)
        assert result.success
        catalog = instance.fetch_materializations(AssetKey("kvid_catalog"), limit=1).records
        sheet = catalog[0].event_log_entry.asset_materialization.metadata["contact_sheet"].value
        assert len(sheet.encode()) <= MAX_MARKDOWN_BYTES
        assert re.search(r"`[abc]`, `[abc]`, `[abc]`$", sheet), sheet[-100:]
        webp = read_webp(image_of(sheet))
        assert len(webp.frames) == 1 and webp.width > 3 * webp.height  # three cells in a row
