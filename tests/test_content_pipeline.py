"""examples/content_pipeline under ``dagster-daemon``, against the emulator, for two days.

Each morning's run is launched as its schedule would launch it (the schedule evaluated for
that morning, its run request executed on the same instance); the daemon does the rest: the
prompts sensor registers and submits the day's rows, the status sensor records the videos, the
automation sensor makes their posters. Then the evening's publish writes the day's manifest.
Day two adds a topic: it pays for its own rows only, and each manifest lists exactly its day.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import av
import pytest
from conftest import REPO_ROOT, TEST_API_KEY, daemon_log
from dagster import AssetKey, DagsterInstance, Definitions, build_schedule_context
from dagster._core.storage.tags import AUTOMATION_CONDITION_TAG, SENSOR_NAME_TAG
from faultkit import dagster_home, open_instance

from kvid_dagster import KvidVideo
from kvid_dagster.core.project import KvidProject
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.media.videos import load_video

EXAMPLE = REPO_ROOT / "examples" / "content_pipeline"
DAY_ONE, DAY_TWO = "2026-03-14", "2026-03-15"
DAY_ONE_TOPICS = ["harbour", "market", "lighthouse"]
NEW_TOPIC = "orchard,An apple orchard in blossom with bees among the branches\n"
POSTER = AssetKey("poster")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_example() -> ModuleType:
    """The example's definitions.py, as ``dagster dev -f`` loads it (by path)."""
    spec = importlib.util.spec_from_file_location("content_pipeline", EXAMPLE / "definitions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the daemon's code location: the example with short sensor intervals
DAEMON_DEFINITIONS = """
import importlib.util
from pathlib import Path

from kvid_dagster.options import PromptsSensorOptions, StatusSensorOptions

spec = importlib.util.spec_from_file_location("content_pipeline", {example!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
defs = example.build_defs(
    {data_dir!r},
    Path({topics!r}),
    status_sensor=StatusSensorOptions(minimum_interval_seconds=1),
    prompts_sensor=PromptsSensorOptions(minimum_interval_seconds=1),
    automation_interval_seconds=1,
)
"""


def scheduled_run(defs: Definitions, instance: DagsterInstance, name: str, when: datetime) -> str:
    """The run the schedule ``name`` requests at ``when``, executed on ``instance``: its
    partition (the day)."""
    schedule = defs.resolve_schedule_def(name)
    context = build_schedule_context(instance=instance, scheduled_execution_time=when)
    [request] = schedule.evaluate_tick(context).run_requests or []
    assert request.partition_key is not None
    job = defs.resolve_job_def(schedule.job_name)
    result = job.execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=request.tags
    )
    assert result.success
    return request.partition_key


def at(day: str, hour: int) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def decoded_size(path: Path | KvidVideo) -> tuple[int, tuple[int, int]]:
    """Frames PyAV decodes from a video (or a PNG) and the first one's size."""
    opened = path.open() if isinstance(path, KvidVideo) else path.open("rb")
    with opened as file, av.open(file) as container:
        sizes = [(frame.width, frame.height) for frame in container.decode(video=0)]
    return len(sizes), sizes[0]


def read_manifest(data_dir: Path, day: str) -> dict[str, Any]:
    return json.loads((data_dir / "manifests" / f"{day}.json").read_text(encoding="utf-8"))


# two days under a daemon: ~80 s on an idle machine, ~120 s on a loaded one; the waits'
# deadline is there to report a stuck pipeline (with the daemon's log) before pytest's timeout
@pytest.mark.timeout(600)
def test_two_days_of_the_content_pipeline_under_the_daemon(
    emulator: KvidEmulator,
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    dagster_daemon: Callable[..., subprocess.Popen[bytes]],
) -> None:
    topics = tmp_path / "topics.csv"  # a copy: day two adds a topic
    shutil.copy(EXAMPLE / "topics.csv", topics)
    data_dir = tmp_path / "data"
    home = dagster_home(tmp_path / "home")
    source = DAEMON_DEFINITIONS.format(
        example=str(EXAMPLE / "definitions.py"), data_dir=str(data_dir), topics=str(topics)
    )
    daemon = dagster_daemon(
        home,
        source,
        prompts=topics,
        data_dir=data_dir,
        base_url=emulator.base_url,
        database_url=postgres_url,
    )
    # this process runs what the schedules launch: the same example, service and ledger
    monkeypatch.setenv("KVID_BASE_URL", emulator.base_url)
    monkeypatch.setenv("KVID_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("KVID_DATABASE_URL", postgres_url)
    defs = load_example().build_defs(data_dir, topics)
    ledger = KvidProject(AssetKey("daily_prompts"), data_dir).ledger()
    deadline = time.monotonic() + 480

    def wait(what: str, condition: Callable[[], Any]) -> None:
        while not condition():
            assert daemon.poll() is None, daemon_log(tmp_path)
            assert time.monotonic() < deadline, f"{what}\n{daemon_log(tmp_path)}"
            time.sleep(0.2)

    keys = {DAY_ONE: [f"{DAY_ONE}-{t}" for t in DAY_ONE_TOPICS]}
    keys[DAY_TWO] = [f"{DAY_TWO}-{t}" for t in [*DAY_ONE_TOPICS, "orchard"]]
    paid: dict[str, int] = {}
    manifests: dict[str, dict[str, Any]] = {}
    with open_instance(home) as instance:
        for day in [DAY_ONE, DAY_TWO]:
            if day == DAY_TWO:
                with topics.open("a", encoding="utf-8") as file:
                    file.write(NEW_TOPIC)
            before = emulator.jobs_created
            assert scheduled_run(defs, instance, "morning_prompts", at(day, 6)) == day
            # the daemon: prompts sensor -> submitting run -> status sensor -> poster runs
            wait(
                f"no posters of {day}",
                lambda day=day: set(keys[day]) <= instance.get_materialized_partitions(POSTER),
            )
            paid[day] = emulator.jobs_created - before
            assert scheduled_run(defs, instance, "evening_publish", at(day, 18)) == day
            manifests[day] = read_manifest(data_dir, day)

        # day one published again, once day two's videos exist: still day one's alone
        assert scheduled_run(defs, instance, "evening_publish", at(DAY_ONE, 18)) == DAY_ONE
        assert read_manifest(data_dir, DAY_ONE) == manifests[DAY_ONE]

        runs = instance.get_runs()
        submitting = [r for r in runs if r.asset_selection == {AssetKey("kvid_video_jobs")}]
        assert submitting
        assert all(r.tags.get(SENSOR_NAME_TAG) == "kvid_prompts_sensor" for r in submitting)
        posters = [r for r in runs if r.asset_selection == {POSTER}]
        assert sorted(r.tags["dagster/partition"] for r in posters) == sorted(
            keys[DAY_ONE] + keys[DAY_TWO]
        )  # one run per video, each launched by automation
        assert all(r.tags.get(AUTOMATION_CONDITION_TAG) == "true" for r in posters)
    assert daemon.poll() is None, daemon_log(tmp_path)

    # day two paid for its own four rows only; every prompt was sent once, on its day
    assert paid == {DAY_ONE: 3, DAY_TWO: 4}
    sent = Counter(job.body["prompt"] for job in emulator.jobs.values())
    rows = ledger.rows()
    assert sent == Counter(str(r.prompt) for r in rows)
    weekday = {DAY_ONE: "Saturday", DAY_TWO: "Sunday"}
    assert Counter(r.user_columns["day"] for r in rows) == {DAY_ONE: 3, DAY_TWO: 4}
    assert all(weekday[r.user_columns["day"]] in str(r.prompt) for r in rows)
    assert {r.status for r in rows} == {VideoStatus.COMPLETED}

    for day, manifest in manifests.items():
        assert manifest["day"] == day
        assert [entry["prompt_id"] for entry in manifest["videos"]] == keys[day]
        for entry in manifest["videos"]:
            video = load_video(ledger, entry["prompt_id"])
            assert entry["uri"] == video.uri
            frames, size = decoded_size(video)
            assert frames == video.num_frames > 0
            assert size == (video.width, video.height) == (entry["width"], entry["height"])
            poster = Path(entry["poster"])
            assert poster == data_dir / "posters" / f"{video.partition_key}.png"
            assert poster.read_bytes().startswith(PNG_SIGNATURE)
            assert decoded_size(poster) == (1, size)  # one image, the video's size
