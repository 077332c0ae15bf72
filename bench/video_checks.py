"""What the video checks add to each fetched video: the poller's verification with them, beside
the probe alone (what it was before them).

    python -m bench.video_checks --out F.json [--quick] [--repeat R]

Clips: the emulator's typical ones, rendered by its own renderer (``emulator.render``: the text
scene, H.264 ultrafast crf 26): v1 (Wan) 480p and 720p, 81 frames at 16 fps, and v2 (Seedance)
480p and 720p, 120 frames at 24 fps, all 16:9. For each, the median of ``--repeat`` runs of:

- ``probe_video``: the probe alone (container and stream headers; no frame decoded);
- ``poll._verified``: what the poller runs in its worker thread on each download now: the probe,
  one decode with ``SAMPLED_FRAMES`` frames' luma figures (``quality.measure_picture``), the
  request's expected output (``quality.expected_output``) and the verdicts;
- ``video_previews`` (its caches removed each time): the poster and animated WebP the poller
  already makes of each video in the same tick, for scale.

The figures are CPU time of one thread: the poller runs one such thread per video it fetches
(within its concurrency), so on a busy machine they stretch with the load.

Then what the checks add to Dagster's event storage: the runless events the status sensor
emits for ``--partitions`` completed, measured videos (``sensors.video_events``: a
materialization with its preview, ``video_ok``, and one result per quality check), each stored
with ``report_runless_asset_event`` as the sensor daemon stores them, in a fresh SQLite Dagster
instance; the time of the events there were before the checks beside the checks' own.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.common import phase_args, scratch, write_result

if TYPE_CHECKING:
    from kvid_dagster.ledger import VideoRow

#: name -> (model, resolution, frames, fps): the emulator's typical clips
CLIPS: dict[str, tuple[str, str, int, int]] = {
    "v1-480p": ("v1", "480p", 81, 16),
    "v1-720p": ("v1", "720p", 81, 16),
    "v2-480p": ("v2", "480p", 120, 24),
    "v2-720p": ("v2", "720p", 120, 24),
}


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # once untimed: imports, first allocations, the file in the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    args = phase_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument("--repeat", type=int, default=None, help="runs per figure"),
            p.add_argument("--partitions", type=int, default=None, help="videos reported"),
        ),
    )
    repeat = args.repeat or (5 if args.quick else 21)
    partitions = args.partitions or (10 if args.quick else 50)

    from kvid_dagster.core.poll import _verified
    from kvid_dagster.core.prompts import load_prompt_table
    from kvid_dagster.emulator import render
    from kvid_dagster.ledger import (
        ClaimOwner,
        JobChange,
        Ledger,
        Submission,
        VideoFile,
        VideoStatus,
    )
    from kvid_dagster.media.preview import PreviewKind, cache_path, video_previews
    from kvid_dagster.media.probe import probe_video

    figures: dict[str, Any] = {"repeat": repeat, "clips": {}}
    with scratch(args.workdir, "kvid-bench-checks-") as tmp:
        table = tmp / "prompts.csv"
        table.write_text(
            "prompt_id,prompt,model,resolution,aspect_ratio,num_frames,frames_per_second,duration\n"
            + "".join(
                f"{name},A man hiking with a backpack,{model},{resolution},16:9,"
                + (f"{frames},{fps}," if model == "v1" else f",,{frames // fps}")
                + "\n"
                for name, (model, resolution, frames, fps) in CLIPS.items()
            ),
            encoding="utf-8",
        )
        rows = load_prompt_table(table).rows
        ledger = Ledger.for_data_dir(tmp / "data")
        ledger.register(rows)
        for row in rows:
            name = row.partition_key
            _, resolution, frames, fps = CLIPS[name]
            width, height = render.frame_size(resolution, "16:9")
            geometry = render.Geometry(width, height, fps, frames)
            path = tmp / f"{name}.mp4"
            render.encode(path, geometry, render.text_frames(geometry, row.prompt, 7))
            sub = ledger.claim(row, ClaimOwner.current(), cost_credits=0.0)
            assert isinstance(sub, Submission)
            probe, quality = _verified(path, sub, None)
            assert quality.matches_request and quality.not_blank and quality.not_frozen
            ledger.record_submitted(sub, f"req-{name}")
            video = VideoFile(local_path=str(path), width=probe.width, height=probe.height,
                              fps=probe.fps, num_frames=probe.num_frames,
                              duration_s=probe.duration_s, quality=quality)  # fmt: skip
            submitted = ledger.submission(sub.submission_id)
            assert submitted is not None
            change = JobChange(sub.submission_id, submitted.version, VideoStatus.COMPLETED,
                               video=video, completed=True)  # fmt: skip
            assert ledger.apply([change])

            def preview(path: Path = path) -> None:
                for kind in PreviewKind:
                    cache_path(path, kind).unlink(missing_ok=True)
                video_previews(path)

            probe_ms = _median_ms(lambda path=path: probe_video(path), repeat)
            verified_ms = _median_ms(lambda path=path, sub=sub: _verified(path, sub, None), repeat)
            figures["clips"][name] = {
                "width": width,
                "height": height,
                "frames": frames,
                "fps": fps,
                "size_kb": round(path.stat().st_size / 1024),
                "probe_ms": probe_ms,
                "verified_ms": verified_ms,
                "added_ms": verified_ms - probe_ms,
                "ratio": verified_ms / probe_ms,
                "preview_ms": _median_ms(preview, repeat),
            }
            print(f"{name}: {figures['clips'][name]}", file=sys.stderr)
        row = ledger.row(rows[0].partition_key)
        assert row is not None and row.video.quality is not None
        figures["events"] = store_events(row, partitions, tmp / "dagster")
        print(f"events: {figures['events']}", file=sys.stderr)
    write_result(args.out, figures)


def store_events(row: VideoRow, partitions: int, home: Path) -> dict[str, Any]:
    """The status sensor's runless events for ``partitions`` copies of ``row`` (COMPLETED,
    measured), stored one by one as the sensor daemon stores them; seconds by kind."""
    from dataclasses import replace

    from dagster import AssetCheckEvaluation, AssetKey, DagsterInstance

    from kvid_dagster.core.poll import VideoEvent
    from kvid_dagster.core.reporting import VIDEO_CHECK_NAME
    from kvid_dagster.sensor_builder import video_events
    from kvid_dagster.translator import KvidTranslator

    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    keys = [f"p{i}" for i in range(partitions)]
    instance.add_dynamic_partitions("kvid_prompts", keys)
    copies = [VideoEvent(k, replace(row, partition_key=k)) for k in keys]
    events = video_events(copies, KvidTranslator(), AssetKey("kvid_videos"))
    spent = {"before": 0.0, "checks": 0.0}
    for event in events:
        checks = isinstance(event, AssetCheckEvaluation) and event.check_name != VIDEO_CHECK_NAME
        t0 = time.perf_counter()
        instance.report_runless_asset_event(event)
        spent["checks" if checks else "before"] += time.perf_counter() - t0
    instance.dispose()
    added = len(events) - 2 * partitions
    return {
        "partitions": partitions,
        "events_before": 2 * partitions,
        "events_added": added,
        "before_ms_per_video": 1000 * spent["before"] / partitions,
        "added_ms_per_video": 1000 * spent["checks"] / partitions,
        "ms_per_added_event": 1000 * spent["checks"] / added,
    }


if __name__ == "__main__":
    main()
