"""A daily content pipeline: the day's prompts, a kvid video each, a poster per video, and in
the evening a manifest of the day's videos (see README.md).

    daily_prompts (06:00) -> kvid_prompts -> kvid_video_jobs -> kvid_videos -> poster
    -> publish (18:00)

Load it with ``dagster dev -f definitions.py`` (or ``kvid-dagster dev --data-dir .data`` in
this folder, which starts a local kvid emulator too). ``KVID_DATA_DIR`` is where the ledger,
videos, posters and manifests go (default ``.data/`` here); ``KVID_API_KEY`` and
``KVID_BASE_URL`` are the service.
"""

# no `from __future__ import annotations`: Dagster reads the inputs' annotations as types
import json
import os
from datetime import date
from pathlib import Path

import av
import pandas as pd
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DailyPartitionsDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    asset,
    build_schedule_from_partitioned_job,
    define_asset_job,
)

from kvid_dagster import KvidProject, KvidVideo, build_kvid_definitions
from kvid_dagster.options import PromptsSensorOptions, StatusSensorOptions

HERE = Path(__file__).resolve().parent
# end_offset=1: a day's partition exists from its midnight, so the 06:00 run is for today
DAYS = DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)


def write_atomically(path: Path, data: bytes) -> None:
    """Readers (publish, a CDN sync) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def first_frame_png(video: KvidVideo) -> tuple[bytes, int, int]:
    """The video's first frame as a PNG, and its width and height."""
    with video.open() as file, av.open(file) as clip:
        frame = next(clip.decode(video=0))
    png = av.CodecContext.create("png", "w")
    png.width, png.height, png.pix_fmt = frame.width, frame.height, "rgb24"
    packets = png.encode(frame.reformat(format="rgb24")) + png.encode(None)
    return b"".join(bytes(p) for p in packets), frame.width, frame.height


def build_defs(
    data_dir: str | Path,
    topics_csv: Path = HERE / "topics.csv",
    *,
    status_sensor: StatusSensorOptions = StatusSensorOptions(),
    prompts_sensor: PromptsSensorOptions = PromptsSensorOptions(),
    automation_interval_seconds: int = 30,
) -> Definitions:
    """The pipeline, writing under ``data_dir``, its topics from ``topics_csv``; the sensors'
    options and the automation sensor's interval say how often they tick (tests shorten them)."""
    project = KvidProject(
        AssetKey("daily_prompts"), data_dir, param_defaults={"resolution": "480p"}
    )
    posters = project.data_dir / "posters"
    manifests = project.data_dir / "manifests"

    @asset(partitions_def=DAYS)
    def daily_prompts(context: AssetExecutionContext) -> pd.DataFrame:
        """The day's prompt table: the template filled in for each topic. Its prompt ids carry
        the day, so each day's rows are new partitions (and new videos)."""
        day = context.partition_key
        template = (HERE / "prompt_template.txt").read_text(encoding="utf-8").strip()
        weekday = date.fromisoformat(day).strftime("%A")
        topics = pd.read_csv(topics_csv, dtype=str)
        return pd.DataFrame(
            {
                "prompt_id": [f"{day}-{topic}" for topic in topics["topic"]],
                "prompt": [template.format(subject=s, weekday=weekday) for s in topics["subject"]],
                # our own columns: kept with each video (KvidVideo.user_columns), never sent
                "day": day,
                "topic": topics["topic"],
            }
        )

    kvid = build_kvid_definitions(
        project, status_sensor=status_sensor, prompts_sensor=prompts_sensor
    )

    @asset(partitions_def=project.partitions_def, automation_condition=AutomationCondition.eager())
    def poster(kvid_videos: KvidVideo) -> MaterializeResult:
        """A PNG of the video's first frame, made as soon as the video is recorded."""
        png, width, height = first_frame_png(kvid_videos)
        path = posters / f"{kvid_videos.partition_key}.png"
        write_atomically(path, png)
        return MaterializeResult(
            metadata={"path": MetadataValue.path(str(path)), "width": width, "height": height}
        )

    every_partition = AllPartitionMapping()

    @asset(
        partitions_def=DAYS,
        ins={"videos": AssetIn("kvid_videos", partition_mapping=every_partition)},
        deps=[AssetDep(poster, partition_mapping=every_partition)],
    )
    def publish(context: AssetExecutionContext, videos: dict[str, KvidVideo]) -> MaterializeResult:
        """The day's manifest: every video of its prompts that is finished, with its poster.
        A video that finishes late is in the manifest when the day is published again."""
        day = context.partition_key
        entries = []
        for video in videos.values():  # every COMPLETED video, in table order: keep the day's
            if video.user_columns.get("day") != day:
                continue
            image = posters / f"{video.partition_key}.png"
            entries.append(
                {
                    "prompt_id": video.partition_key,
                    "topic": video.user_columns.get("topic"),
                    "uri": video.uri,
                    "poster": str(image) if image.is_file() else None,
                    "width": video.width,
                    "height": video.height,
                    "duration_s": video.duration_s,
                    "sha256": video.sha256,
                }
            )
        path = manifests / f"{day}.json"
        manifest = {"day": day, "videos": entries}
        write_atomically(path, json.dumps(manifest, indent=2).encode())
        return MaterializeResult(
            metadata={"path": MetadataValue.path(str(path)), "videos": len(entries)}
        )

    # Stopped until switched on (the Automation tab), like kvid's own schedule: they lead to
    # spending credits. Publishing has its own evening schedule: the service makes the videos
    # asynchronously, and a run waiting on them would hold a run slot for hours.
    morning = build_schedule_from_partitioned_job(
        define_asset_job("daily_prompts_job", selection=[daily_prompts]),
        hour_of_day=6,
        name="morning_prompts",
        default_status=DefaultScheduleStatus.STOPPED,
    )
    evening = build_schedule_from_partitioned_job(
        define_asset_job("publish_job", selection=[publish]),
        hour_of_day=18,
        name="evening_publish",
        default_status=DefaultScheduleStatus.STOPPED,
    )
    # Dagster 1.13's default automation sensor starts stopped: this one runs poster's condition
    automation = AutomationConditionSensorDefinition(
        "content_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=automation_interval_seconds,
    )
    return Definitions.merge(
        kvid,
        Definitions(
            assets=[daily_prompts, poster, publish],
            schedules=[morning, evening],
            sensors=[automation],
        ),
    )


defs = build_defs(os.environ.get("KVID_DATA_DIR") or HERE / ".data")
