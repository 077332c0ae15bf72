"""The prompt table: valid rows become requests; each bad row is reported by row, key and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from kvid_dagster.client import ImageToVideoV1, ImageToVideoV2, TextToVideoV1, TextToVideoV2
from kvid_dagster.prompts import PromptTableError, load_prompt_table

DATA = Path(__file__).resolve().parent.parent / "data"


def write_csv(tmp_path: Path, text: str, name: str = "prompts.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_sample_table_is_all_valid_and_covers_every_job_kind_and_model() -> None:
    table = load_prompt_table(DATA / "prompts.csv")
    assert table.invalid == []
    assert len(table.rows) == 6
    kinds = {type(row.request) for row in table.rows}
    assert kinds == {TextToVideoV1, TextToVideoV2, ImageToVideoV1, ImageToVideoV2}
    salmon = table.by_key["salmon-promo"]
    assert salmon.request.to_body()["image_file"]  # a local image is sent as base64
    assert salmon.params["image"] == "images/salmon_dish.jpg"


def test_bad_rows_are_reported_by_row_key_and_field_and_good_rows_go_on(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "prompt_id,prompt,model,job,image,num_frames,duration,resolution,aspect_ratio\n"
        "ok-1,A calm lake,v1,,,81,,480p,\n"
        "no-prompt,,v1,,,,,,\n"
        "v2-field-on-v1,A dog,v1,,,,5,,\n"
        "v1-field-on-v2,A cat,v2,,,90,,,\n"
        "too-many-frames,A bird,v1,,,101,,,\n"
        "bad-enum,A fish,v1,,,,,1080p,\n"
        "i2v-no-image,A tree,v1,image-to-video,,,,,\n"
        "../escape,A path,v1,,,,,,\n"
        "dup,First,v1,,,,,,\n"
        "dup,Second,v1,,,,,,\n"
        "ok-2,A mountain,v2,,,,10,1080p,9:21\n",
    )
    table = load_prompt_table(path)
    assert [r.partition_key for r in table.rows] == ["ok-1", "ok-2"]
    problems = {(p.row_number, p.partition_key): p for p in table.invalid}
    assert problems[(2, "no-prompt")].field == "prompt"
    assert problems[(3, "v2-field-on-v1")].field == "duration"
    assert problems[(4, "v1-field-on-v2")].field == "num_frames"
    assert problems[(5, "too-many-frames")].field == "num_frames"
    assert "101" in problems[(5, "too-many-frames")].reason
    assert problems[(6, "bad-enum")].field == "resolution"
    assert "1080p" in problems[(6, "bad-enum")].reason
    assert problems[(7, "i2v-no-image")].field == "image"
    assert problems[(8, "../escape")].field == "prompt_id"
    assert problems[(9, "dup")].field == problems[(10, "dup")].field == "prompt_id"
    assert "rows 9, 10" in problems[(9, "dup")].reason
    # every message names the row and the key
    assert all(p.message.startswith(f"row {p.row_number}") for p in table.invalid)


def test_keys_are_derived_stably_from_content_when_absent(tmp_path: Path) -> None:
    text = "prompt,seed\nA red kite,1\nA red kite,2\nA red kite,1\n"
    first = load_prompt_table(write_csv(tmp_path, text))
    second = load_prompt_table(write_csv(tmp_path, text, "again.csv"))
    assert [r.partition_key for r in first.rows] == [r.partition_key for r in second.rows]
    assert len(first.rows) == 2 and all(k.startswith("p-") for k in first.partition_keys)
    # the third row repeats the first exactly: reported, not sent twice
    assert [(p.row_number, p.field) for p in first.invalid] == [(3, "prompt_id")]


def test_relative_image_paths_resolve_against_the_tables_folder(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    shutil.copy(DATA / "images" / "tiger.jpg", tmp_path / "pics" / "t.jpg")
    table = load_prompt_table(write_csv(tmp_path, "prompt,image\nA tiger,pics/t.jpg\n"))
    assert table.invalid == []
    assert isinstance(table.rows[0].request, ImageToVideoV1)
    missing = load_prompt_table(
        write_csv(tmp_path, "prompt,image\nA tiger,pics/none.jpg\n", "m.csv")
    )
    assert missing.rows == [] and missing.invalid[0].field == "image"


def test_parquet_tables_with_native_types(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["A storm", "A calm sea"],
            "model": ["v1", "v2"],
            "num_frames": [90, None],
            "camera_fixed": [None, True],
        }
    )
    path = tmp_path / "prompts.parquet"
    frame.to_parquet(path)
    table = load_prompt_table(path)
    assert table.invalid == []
    assert table.by_key["a"].request.to_body()["num_frames"] == 90
    assert table.by_key["b"].request.to_body()["camera_fixed"] is True


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", None),  # an empty file is an empty table
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a readable"),
        (b"title,notes\nx,y\n", "no 'prompt' column"),
    ],
)
def test_unreadable_tables_fail_clearly(tmp_path: Path, content: bytes, needle: str | None) -> None:
    path = tmp_path / "prompts.csv"
    path.write_bytes(content)
    if needle is None:
        table = load_prompt_table(path)
        assert table.rows == [] and table.invalid == []
        return
    with pytest.raises(PromptTableError, match=needle):
        load_prompt_table(path)


def test_missing_table_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PromptTableError, match="does not exist"):
        load_prompt_table(tmp_path / "nope.csv")


def test_unknown_columns_are_warned_about_not_fatal(tmp_path: Path) -> None:
    table = load_prompt_table(write_csv(tmp_path, "prompt,num_frame\nA fox,90\n"))
    assert len(table.rows) == 1
    assert any("num_frame" in w for w in table.warnings)
