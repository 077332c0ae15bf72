"""The checks that each video is what was asked and not broken content
(``kvid_dagster.media.quality``):

- end to end: the emulator's marked prompts (``[[kvid:wrong-size]]``, ``[[kvid:black]]``,
  ``[[kvid:frozen]]``) -> the status sensor's poll -> the ledger (SQLite and PostgreSQL) -> the
  published catalog -> each check's result on a real Dagster instance, runless and in a run;
  a video failing a check is COMPLETED and never paid for again;
- each check's figures on real encoded clips, around its thresholds, and what a request of
  each dialect and kind is expected to yield (``auto``: the input image, when it is at hand).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, EmulatorFactory
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    Definitions,
    define_asset_job,
)
from faultkit import (
    check_verdicts,
    dagster_home,
    make_client,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    statuses,
    submit,
    tick_until_settled,
    waiting,
    write_table,
)

from kvid_dagster.core.poll import PollConfig, poll_pending
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.emulator import FAIL_MARKER, Defect, KvidEmulator
from kvid_dagster.emulator import render as emulator_render
from kvid_dagster.ledger import ClaimOwner, Ledger, Submission
from kvid_dagster.media.probe import VideoProbe
from kvid_dagster.media.quality import (
    ExpectedOutput,
    PictureFigures,
    QualityCheck,
    assess,
    expected_output,
    measure_picture,
)
from kvid_dagster.options import StatusSensorOptions

VIDEOS = AssetKey("kvid_videos")
#: each row's prompt marker, and what each check says of its video
MARKED = {
    "fine": "",
    "wrong": Defect.WRONG_SIZE.marker,
    "black": Defect.BLACK.marker,
    "frozen": Defect.FROZEN.marker,
}
VERDICTS = {
    "matches_request": {"fine": True, "wrong": False, "black": True, "frozen": True},
    "not_blank": {"fine": True, "wrong": True, "black": False, "frozen": True},
    "not_frozen": {"fine": True, "wrong": True, "black": False, "frozen": False},
}


def marked_table(path: Path, keys: Sequence[str]) -> Path:
    return write_table(path, keys, lambda key: f"A lake at dawn {MARKED[key]}".strip())


def latest_evaluation(instance: Any, check: str, partition: str) -> AssetCheckEvaluation:
    """The latest result of ``check`` on a ``kvid_videos`` partition."""
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(VIDEOS, check), limit=100
    )  # newest first
    found = [r.evaluation for r in history if r.evaluation and r.evaluation.partition == partition]
    assert found, f"no {check} result for {partition}"
    return found[0]


def checks_in_a_run(
    defs: Definitions, instance: Any, partition: str
) -> dict[str, AssetCheckEvaluation]:
    """Every check on ``kvid_videos`` executed in a run of one partition (as the UI's "Execute"
    launches it: a run tagged with the partition); the result of each."""
    job = define_asset_job(
        "kvid_video_checks", selection=AssetSelection.checks_for_assets(VIDEOS)
    )  # fmt: skip
    result = (
        Definitions.merge(defs, Definitions(jobs=[job]))
        .resolve_job_def("kvid_video_checks")
        .execute_in_process(instance=instance, tags={"dagster/partition": partition})
    )
    evaluations = result.get_asset_check_evaluations()
    assert {e.partition for e in evaluations} == {partition}
    return {e.check_name: e for e in evaluations}


def verdicts_in_a_run(defs: Definitions, instance: Any, partition: str) -> dict[str, bool]:
    return {name: e.passed for name, e in checks_in_a_run(defs, instance, partition).items()}


def test_each_broken_video_is_completed_and_fails_its_own_check_with_what_was_measured(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    keys = list(MARKED)
    prompts = marked_table(tmp_path / "prompts.csv", keys)
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, prompts, data_dir, database_url=database_url)
    ledger = Ledger.for_data_dir(data_dir, database_url)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance) and run_submit(defs, instance, keys[0], keys[-1])
        tick_until_settled(defs, instance, ledger)

        # delivered, paid for and kept: every video COMPLETED and materialized
        assert statuses(ledger) == dict.fromkeys(keys, "COMPLETED")
        assert instance.get_materialized_partitions(VIDEOS) == set(keys)
        assert check_verdicts(instance, keys) == dict.fromkeys(keys, True)  # video_ok
        for check, verdicts in VERDICTS.items():
            assert check_verdicts(instance, keys, check) == verdicts, check

        # each failure shows what was measured beside what was expected
        wrong = latest_evaluation(instance, "matches_request", "wrong")
        assert wrong.severity is AssetCheckSeverity.ERROR
        assert "428x240, the request asks for 854x480" in str(wrong.metadata["result"].value)
        shown = {k: wrong.metadata[k].value for k in ("width", "expected_width", "num_frames")}
        assert shown == {"width": 428, "expected_width": 854, "num_frames": 81}
        assert wrong.metadata["expected_num_frames"].value == 81
        black = latest_evaluation(instance, "not_blank", "black")
        assert black.severity is AssetCheckSeverity.ERROR and black.description is not None
        assert "black" in black.description
        assert black.metadata["luma_stddev"].value == 0.0
        assert black.metadata["expected_luma_stddev"].value == 4.0
        frozen = latest_evaluation(instance, "not_frozen", "frozen")
        assert frozen.severity is AssetCheckSeverity.WARN  # advisory: a still shot may be asked
        assert frozen.metadata["changed_pct"].value <= frozen.metadata["expected_changed_pct"].value
        fine = latest_evaluation(instance, "not_frozen", "fine")
        assert fine.metadata["changed_pct"].value > 5.0

        # the catalog the sensor published has the figures and the verdicts
        published = pd.read_parquet(data_dir / "catalog" / "videos").set_index("partition_key")
        for check, verdicts in VERDICTS.items():
            assert published[check].to_dict() == verdicts, check
        figures = ["width", "expected_width", "height", "expected_height", "sampled_frames"]
        assert published.loc["wrong", figures].tolist() == [428, 854, 240, 480, 16]
        assert published.loc["black", "luma_mean"] == 0.0

        # executing the checks in a run gives the same verdicts, from the ledger
        assert verdicts_in_a_run(defs, instance, "black") == {
            "video_ok": True, "matches_request": True, "not_blank": False, "not_frozen": False,
        }  # fmt: skip
        assert verdicts_in_a_run(defs, instance, "wrong")["matches_request"] is False

        # never paid for again by itself: the range submitted again and more ticks send nothing
        assert run_submit(defs, instance, keys[0], keys[-1])
        tick_until_settled(defs, instance, ledger)
    assert emulator.jobs_created == len(keys)


def test_a_partition_retried_into_a_broken_video_gets_its_quality_results(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """Dagster 1.13 keeps one runless result per check and partition: the first job FAILED
    (``video_ok`` failed, no quality result: there was no video), the forced second one
    delivered a black video; its quality checks report it, each a first result of its own."""
    prompts = marked_table(tmp_path / "prompts.csv", ["black"])
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, prompts, data_dir)
    ledger = Ledger.for_data_dir(data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        emulator.fail_next_jobs(1, "GPU out of memory")
        assert run_prompts(defs, instance) and run_submit(defs, instance, "black", "black")
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"black": "FAILED"}
        assert check_verdicts(instance, ["black"]) == {"black": False}
        assert all(check_verdicts(instance, ["black"], c.value) == {} for c in QualityCheck)

        forced = {"ops": {"kvid_video_jobs": {"config": {"force": True}}}}
        assert run_submit(defs, instance, "black", "black", run_config=forced)
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"black": "COMPLETED"}
        assert check_verdicts(instance, ["black"], "not_blank") == {"black": False}
        assert check_verdicts(instance, ["black"], "matches_request") == {"black": True}
        # video_ok keeps its first result (the known limit); a run reads the ledger's verdict
        assert check_verdicts(instance, ["black"]) == {"black": False}
        assert verdicts_in_a_run(defs, instance, "black")["video_ok"] is True
    assert emulator.jobs_created == 2


def test_a_partition_without_a_measured_video_says_why_in_a_run(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """A FAILED job has no video; a video not downloaded (``download=False``) was never
    measured: the sensor reports no quality result for either, and a run executing the checks
    fails them as warnings saying why (never a pass on a video nobody looked at)."""
    prompts = write_table(
        tmp_path / "prompts.csv", ["kept", "bad"], lambda k: f"A lake {FAIL_MARKER * (k == 'bad')}"
    )
    data_dir = tmp_path / "data"
    defs = make_defs(
        emulator.base_url, prompts, data_dir, status_sensor=StatusSensorOptions(download=False)
    )
    ledger = Ledger.for_data_dir(data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance) and run_submit(defs, instance, "kept", "bad")
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"kept": "COMPLETED", "bad": "FAILED"}
        assert check_verdicts(instance, ["kept", "bad"]) == {"kept": True, "bad": False}
        for check in QualityCheck:
            assert check_verdicts(instance, ["kept", "bad"], check.value) == {}
        for key, why in (("kept", "not measured: the video was not downloaded"),
                         ("bad", "no video to check: the job is FAILED: ")):  # fmt: skip
            results = checks_in_a_run(defs, instance, key)
            for check in QualityCheck:
                result = results[check.value]
                assert not result.passed and result.severity is AssetCheckSeverity.WARN
                assert result.description is not None and result.description.startswith(why)


def settle(emulator: KvidEmulator, ledger: Ledger, videos: Path, dialect: str) -> None:
    """Poll ticks of a client of ``dialect`` until none of its jobs waits."""

    async def tick() -> None:
        async with make_client(emulator.base_url, dialect=dialect) as client:
            await poll_pending(client, ledger, PollConfig(videos))

    for _ in range(200):
        asyncio.run(tick())
        if not ledger.jobs_to_poll(dialect):
            return
        time.sleep(0.05)
    raise AssertionError(f"jobs never settled: {waiting(ledger)}")


def test_the_generation_dialects_broken_videos_fail_by_its_own_rules(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """24 fps times the duration asked (10 s here), unless a Wan model's frames are given."""
    table = tmp_path / "prompts.csv"
    table.write_text(
        "prompt_id,prompt,resolution,aspect_ratio,duration,model,num_frames,frames_per_second\n"
        "ten,A harbour at noon,480p,1:1,10,,,\n"
        f"ten-small,A harbour at noon {Defect.WRONG_SIZE.marker},480p,1:1,10,,,\n"
        f"wan-black,A harbour at dusk {Defect.BLACK.marker},480p,16:9,,wan,90,18\n",
        encoding="utf-8",
    )
    rows = load_prompt_table(table, dialect="generation").rows
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    submit(emulator.base_url, ledger, rows, dialect="generation")
    settle(emulator, ledger, tmp_path / "videos", "generation")
    assert statuses(ledger) == dict.fromkeys(["ten", "ten-small", "wan-black"], "COMPLETED")
    quality = {r.partition_key: r.video.quality for r in ledger.rows()}
    assert all(q is not None for q in quality.values())
    ten, small, wan = quality["ten"], quality["ten-small"], quality["wan-black"]
    assert ten is not None and small is not None and wan is not None
    assert (ten.expected_width, ten.expected_fps, ten.expected_frames) == (480, 24.0, 240)
    assert ten.matches_request and ten.not_blank and ten.not_frozen
    assert not small.matches_request and small.not_blank
    assert (wan.expected_fps, wan.expected_frames, wan.expected_width) == (18.0, 90, 854)
    assert wan.matches_request and not wan.not_blank


# --- the figures and the thresholds, on real encoded clips --------------------------------------


def encode(
    path: Path,
    frames: Sequence[np.ndarray],
    fps: int = 16,
    crf: int = 26,
    preset: str = "ultrafast",
) -> Path:
    """RGB frames as H.264 in MP4 (``crf``: how coarse)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def tiger() -> np.ndarray:
    """The vendor's tiger photo (480x600), cover-fitted to 480p 16:9."""
    image = emulator_render.decode_image((REPO_ROOT / "data/images/tiger.jpg").read_bytes())
    fitted = next(
        emulator_render.image_frames(
            emulator_render.Geometry(854, 480, 16, 1), image, camera_fixed=True
        )
    )
    assert isinstance(fitted, np.ndarray)
    return fitted


@pytest.fixture
def clips(tmp_path: Path, tiger: np.ndarray) -> dict[str, Path]:
    geometry = emulator_render.Geometry(854, 480, 16, 33)
    night = list(emulator_render.text_frames(geometry, "A lake at night", 1, camera_fixed=True))
    noise = np.random.default_rng(0).integers(0, 6, size=(33, 480, 854, 1), dtype=np.uint8)
    blink = [tiger.copy() for _ in range(33)]
    for frame in blink[12:20]:  # the eyes: 2% of the picture, much brighter for half a second
        frame[200:250, 400:480] = np.clip(frame[200:250, 400:480].astype(int) + 80, 0, 255)
    return {
        "night": encode(tmp_path / "night.mp4", night),  # dark, a fixed camera
        "grey": encode(tmp_path / "grey.mp4", [np.full((480, 854, 3), 128, np.uint8)] * 33),
        "dark-noise": encode(tmp_path / "noise.mp4", list(np.repeat(noise, 3, axis=3))),
        # a repeated frame a fast, coarse encoder drifts on (every P-frame refines it)
        "drifting": encode(tmp_path / "drift.mp4", [tiger] * 33, crf=45),
        "blink": encode(tmp_path / "blink.mp4", blink),
    }


def verdicts_of(path: Path) -> tuple[PictureFigures, dict[QualityCheck, bool]]:
    figures = measure_picture(path, 33)
    probe = VideoProbe(854, 480, 16.0, 33, 2.062, "h264")
    quality = assess(probe, figures, ExpectedOutput())
    return figures, {
        QualityCheck.NOT_BLANK: quality.not_blank,
        QualityCheck.NOT_FROZEN: quality.not_frozen,
    }


def test_blank_and_frozen_clips_fail_and_still_or_dark_ones_pass(clips: dict[str, Path]) -> None:
    night, night_verdicts = verdicts_of(clips["night"])
    assert night.sampled_frames == 16 and night.luma_mean > 4.0 and night.luma_stddev > 4.0
    assert all(night_verdicts.values())  # a dark scene shot still is neither blank nor frozen
    grey, grey_verdicts = verdicts_of(clips["grey"])
    assert grey.luma_stddev <= 4.0 < grey.luma_mean  # one flat colour, not black
    assert not grey_verdicts[QualityCheck.NOT_BLANK]
    noisy, noisy_verdicts = verdicts_of(clips["dark-noise"])
    assert noisy.luma_mean <= 4.0  # black, whatever its faint noise
    assert not noisy_verdicts[QualityCheck.NOT_BLANK]
    drifting, drifting_verdicts = verdicts_of(clips["drifting"])
    assert drifting.changed_pct <= 0.5, drifting  # the encoder's drift is no change
    assert drifting_verdicts == {QualityCheck.NOT_BLANK: True, QualityCheck.NOT_FROZEN: False}
    blink, blink_verdicts = verdicts_of(clips["blink"])
    assert 1.0 < blink.changed_pct < 5.0, blink  # a small part, changed a lot: not frozen
    assert all(blink_verdicts.values())


@pytest.mark.parametrize(
    ("probe", "passed"),
    [
        (VideoProbe(854, 480, 16.0, 81, 5.062, "h264"), True),
        (VideoProbe(870, 464, 16.5, 82, 5.5, "h264"), True),  # every figure at its tolerance
        (VideoProbe(871, 480, 16.0, 81, 5.062, "h264"), False),  # 17 px wide of the mark
        (VideoProbe(854, 480, 16.6, 81, 5.062, "h264"), False),
        (VideoProbe(854, 480, 16.0, 83, 5.062, "h264"), False),
        (VideoProbe(854, 480, 16.0, 81, 5.6, "h264"), False),
    ],
)
def test_matches_request_allows_an_encoders_rounding_and_no_more(
    probe: VideoProbe, passed: bool
) -> None:
    expected = ExpectedOutput(480, 854, 480, 16.0, 81, 5.062)
    figures = PictureFigures(16, 80.0, 30.0, 10.0)
    assert assess(probe, figures, expected).matches_request is passed


def submissions(table: Path, dialect: str = "video") -> dict[str, Submission]:
    """Each row of ``table`` claimed (nothing sent): the jobs the poller would measure."""
    loaded = load_prompt_table(table, dialect=dialect)
    assert loaded.invalid == [], loaded.invalid
    ledger = Ledger.for_data_dir(table.parent / "data")
    ledger.register(loaded.rows)
    claims = {
        r.partition_key: ledger.claim(r, ClaimOwner.current(), cost_credits=1.0)
        for r in loaded.rows
    }
    assert all(isinstance(c, Submission) for c in claims.values())
    return claims  # type: ignore[return-value]


def test_what_each_dialect_and_kind_is_expected_to_yield(tmp_path: Path, image_server: str) -> None:
    table = tmp_path / "video.csv"
    table.write_text(
        "prompt_id,prompt,model,image,resolution,aspect_ratio,num_frames,frames_per_second,duration\n"
        "v1,A lake,v1,,480p,9:16,100,20,\n"
        "v2,A lake,v2,,720p,4:3,,,10\n"
        f"url-auto,The tiger,v1,{image_server}/tiger.jpg,480p,auto,81,16,\n",
        encoding="utf-8",
    )
    subs = submissions(table)
    assert expected_output(subs["v1"]) == ExpectedOutput(480, 480, 854, 20.0, 100, 5.0)
    assert expected_output(subs["v2"]) == ExpectedOutput(720, 960, 720, 24.0, 240, 10.0)
    # auto with an image at a URL: the image is not at hand, only the short side is known
    assert expected_output(subs["url-auto"]) == ExpectedOutput(480, None, None, 16.0, 81, 5.062)

    generation = tmp_path / "generation.csv"
    generation.write_text(
        "prompt_id,job,prompt,model,resolution,aspect_ratio,duration,num_frames,image_urls\n"
        "t2v,,A lake,,720p,16:9,7,,\n"
        "wan,,A lake,wan,480p,1:1,,90,\n"
        f"ref-auto,reference-to-video,A lake,,480p,16:9,auto,,{image_server}/tiger.jpg\n",
        encoding="utf-8",
    )
    subs = submissions(generation, dialect="generation")
    assert expected_output(subs["t2v"]) == ExpectedOutput(720, 1280, 720, 24.0, 168, 7.0)
    assert expected_output(subs["wan"]) == ExpectedOutput(480, 480, 480, 24.0, 90, 3.75)
    # a reference-to-video of duration auto: its references decide the length
    assert expected_output(subs["ref-auto"]) == ExpectedOutput(short_side=480)


def test_auto_follows_a_local_input_image_only_while_it_holds_the_bytes_that_were_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiger (480x600) at 480p with aspect ratio auto is 480x600: known when the image
    resolves against the table's folder and still hashes as it did when sent."""
    folder = tmp_path / "project"
    (folder / "images").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "data/images/tiger.jpg", folder / "images" / "tiger.jpg")
    table = folder / "prompts.csv"
    table.write_text(
        "prompt_id,prompt,image,resolution,aspect_ratio,num_frames\n"
        "tiger,The tiger blinks,images/tiger.jpg,480p,auto,81\n",
        encoding="utf-8",
    )
    sub = submissions(table)["tiger"]
    short_side_only = ExpectedOutput(480, None, None, 16.0, 81, 5.062)
    assert expected_output(sub, folder) == ExpectedOutput(480, 480, 600, 16.0, 81, 5.062)
    monkeypatch.chdir(tmp_path)  # relative to the working directory: no such image
    assert expected_output(sub) == short_side_only
    # the image changed since it was sent: its size no longer says what the service got
    shutil.copy(REPO_ROOT / "data/images/salmon_dish.jpg", folder / "images" / "tiger.jpg")
    assert expected_output(sub, folder) == short_side_only


def test_the_emulators_broken_renders_are_what_their_markers_say(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """Each marker in both dialects, measured as the poller measures every video; with renders
    reused, a broken video is shared only with the same breakage (a fine job never gets a
    black one)."""
    emulator = emulator_factory(reuse_renders=True)
    keys = list(MARKED)
    rows = load_prompt_table(marked_table(tmp_path / "prompts.csv", keys)).rows
    generation_table = tmp_path / "generation.csv"
    generation_table.write_text(
        "prompt_id,prompt,resolution,aspect_ratio,duration\n"
        + "".join(f"g-{k},A lake at dawn {m},480p,16:9,5\n" for k, m in MARKED.items()),
        encoding="utf-8",
    )
    generation_rows = load_prompt_table(generation_table, dialect="generation").rows
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register([*rows, *generation_rows])
    submit(emulator.base_url, ledger, rows)
    submit(emulator.base_url, ledger, generation_rows, dialect="generation")
    for dialect in ("video", "generation"):
        settle(emulator, ledger, tmp_path / "videos", dialect)
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    for prefix in ("", "g-"):
        found = {k: ledger.row(prefix + k).video for k in keys}  # type: ignore[union-attr]
        sizes = {k: (v.width, v.height) for k, v in found.items()}
        assert sizes == {"fine": (854, 480), "wrong": (428, 240), "black": (854, 480),
                         "frozen": (854, 480)}  # fmt: skip
        measured = {k: v.quality for k, v in found.items()}
        assert all(q is not None for q in measured.values())
        fine, black, frozen = measured["fine"], measured["black"], measured["frozen"]
        assert fine is not None and black is not None and frozen is not None
        assert (black.luma_mean, black.luma_stddev, black.changed_pct) == (0.0, 0.0, 0.0)
        assert frozen.changed_pct == 0.0 and frozen.luma_stddev > 4.0
        assert fine.changed_pct > 5.0 and fine.luma_stddev > 4.0
    assert emulator.jobs_created == 8
