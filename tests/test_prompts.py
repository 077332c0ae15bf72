"""The prompt table: valid rows become requests; each bad row is reported by row, key and field."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from kvid_dagster.client import ImageToVideoV1, ImageToVideoV2, TextToVideoV1, TextToVideoV2
from kvid_dagster.core.prompts import PromptTableError, load_prompt_table

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
    # an unsafe key names no row (it may be one no database stores): the reason shows it
    assert problems[(8, None)].field == "prompt_id"
    assert problems[(8, None)].message.startswith("row 8: prompt_id: '../escape' is not a safe")
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


# -- types never drift -----------------------------------------------------------------------

ORIGINAL = (
    "prompt_id,prompt,seed,num_frames,campaign\n"
    "1,A calm lake,7,81,spring\n"
    "2,A storm,,90,spring\n"
    "3,A desert,9007199254740993,,\n"
)


def _requests(path: Path) -> dict[str, str]:
    table = load_prompt_table(path)
    assert table.invalid == [], table.invalid
    return {row.partition_key: row.request_hash for row in table.rows}


def test_a_table_resaved_by_pandas_gives_the_same_keys_and_requests(tmp_path: Path) -> None:
    """pandas reads the blank cells as NaN, so the integer columns come back float64 (1.0,
    7.0, 81.0); saved again as CSV or Parquet, every row is still the same key and request."""
    original = write_csv(tmp_path, ORIGINAL)
    frame = pd.read_csv(original, dtype={"seed": "Int64"})  # the big seed exactly, as pandas can
    frame["prompt_id"] = frame["prompt_id"].astype("float64")
    frame["num_frames"] = frame["num_frames"].astype("float64")
    assert frame["prompt_id"].tolist() == [1.0, 2.0, 3.0]
    frame.to_csv(tmp_path / "resaved.csv", index=False)
    frame.to_parquet(tmp_path / "resaved.parquet")
    assert "1.0," in (tmp_path / "resaved.csv").read_text()  # what pandas writes
    expected = _requests(original)
    assert sorted(expected) == ["1", "2", "3"]
    assert _requests(tmp_path / "resaved.csv") == expected
    assert _requests(tmp_path / "resaved.parquet") == expected
    row = load_prompt_table(tmp_path / "resaved.parquet").by_key["1"]
    assert row.request.to_body()["seed"] == 7 and row.request.to_body()["num_frames"] == 81


@pytest.mark.parametrize(
    ("cell", "needle"),
    [
        ("7.5", "not a whole number"),
        ("1.2e+19", "beyond 2^53"),  # how pandas writes a float64 seed past 2^53
        ("seven", "not an integer"),
    ],
)
def test_an_integer_field_that_is_not_exactly_an_integer_is_that_rows_error(
    tmp_path: Path, cell: str, needle: str
) -> None:
    path = write_csv(tmp_path, f"prompt_id,prompt,seed\nbad,A fox,{cell}\ngood,A owl,3\n")
    table = load_prompt_table(path)
    assert [r.partition_key for r in table.rows] == ["good"]
    (problem,) = table.invalid
    assert (problem.partition_key, problem.field) == ("bad", "seed") and needle in problem.reason


def test_a_float_seed_beyond_2_53_in_parquet_is_refused_never_rounded(tmp_path: Path) -> None:
    frame = pd.DataFrame({"prompt_id": ["big", "ok"], "prompt": ["A", "B"], "seed": [2.0**60, 5.0]})
    frame.to_parquet(tmp_path / "p.parquet")
    table = load_prompt_table(tmp_path / "p.parquet")
    assert [r.partition_key for r in table.rows] == ["ok"]
    assert table.invalid[0].field == "seed" and "beyond 2^53" in table.invalid[0].reason


# -- the vendor's field names, short rows, misspelt and user columns ---------------------------


def test_the_vendors_image_field_names_are_columns_too(tmp_path: Path) -> None:
    shutil.copy(DATA / "images" / "tiger.jpg", tmp_path / "tiger.jpg")
    path = write_csv(
        tmp_path,
        "prompt_id,prompt,model,image_url,image_file,end_image_url\n"
        "by-url,A tiger,v1,https://example.com/tiger.jpg,,\n"
        "by-file,A tiger,v1,,tiger.jpg,\n"
        "both-ends,A tiger,v2,https://example.com/a.jpg,,https://example.com/b.jpg\n"
        "two-images,A tiger,v1,https://example.com/a.jpg,tiger.jpg,\n"
        "file-not-url,A tiger,v1,tiger.jpg,,\n",
    )
    table = load_prompt_table(path)
    by_url, by_file, both = (table.by_key[k].request for k in ("by-url", "by-file", "both-ends"))
    assert isinstance(by_url, ImageToVideoV1) and isinstance(by_file, ImageToVideoV1)
    assert by_url.to_body()["image_url"] == "https://example.com/tiger.jpg"
    assert by_file.to_body()["image_file"]  # the local file, sent as base64
    assert isinstance(both, ImageToVideoV2)
    assert both.to_body()["end_image_url"] == "https://example.com/b.jpg"
    problems = {p.partition_key: p for p in table.invalid}
    assert problems["two-images"].field == "image_file"
    assert "conflicts with image_url" in problems["two-images"].reason
    assert problems["file-not-url"].field == "image_url"


def test_a_row_with_too_few_cells_is_invalid_not_shifted(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "prompt_id,prompt,negative_prompt,resolution\n"
        "clip1,A lion yawns,,720p\n"
        "clip2,A tiger blinks,480p\n",
    )
    table = load_prompt_table(path)
    assert [r.partition_key for r in table.rows] == ["clip1"]
    (problem,) = table.invalid
    assert (problem.partition_key, problem.field) == ("clip2", "row")
    assert "3 cells" in problem.reason and "4 columns" in problem.reason


@pytest.mark.parametrize(
    ("column", "field"),
    [("num_frame", "num_frames"), ("seeds", "seed"), ("resolutions", "resolution"),
     ("Seed", "seed"), ("negativ_prompt", "negative_prompt"), ("imageurl", "image_url")],
)  # fmt: skip
def test_a_misspelt_parameter_column_stops_the_whole_table(
    tmp_path: Path, column: str, field: str
) -> None:
    path = write_csv(tmp_path, f"prompt,{column}\nA fox,90\nA owl,\n")
    with pytest.raises(PromptTableError) as raised:
        load_prompt_table(path)
    assert f"{column!r}" in str(raised.value) and f"{field!r}" in str(raised.value)
    assert "No row of this table is sent" in str(raised.value)


def test_the_users_own_columns_stay_with_the_row_and_are_never_sent(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        'prompt_id,prompt,campaign,owner,notes\nfox,A fox,spring,ana,"two, lines\nof notes"\n',
    )
    table = load_prompt_table(path)
    row = table.by_key["fox"]
    assert table.user_columns == ("campaign", "owner", "notes")
    assert row.user_columns == {
        "campaign": "spring",
        "owner": "ana",
        "notes": "two, lines\nof notes",
    }
    body = row.request.to_body()
    assert not {"campaign", "owner", "notes"} & set(body)
    assert table.warnings == []


def test_an_excel_crlf_table_with_multi_line_prompts_is_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(
        '\ufeffprompt_id,prompt\r\nfox,"A fox\r\nruns, then ""stops"""\r\nowl,An owl\r\n'.encode()
    )
    table = load_prompt_table(path)
    assert table.invalid == []
    assert table.by_key["fox"].prompt == 'A fox\nruns, then "stops"'
    assert table.by_key["owl"].prompt == "An owl"


# -- a table caught mid-write --------------------------------------------------------------------


def test_a_table_still_being_written_is_read_once_it_is_whole(tmp_path: Path) -> None:
    """A writer that flushes a partial last line (no newline yet) and finishes a moment later:
    the reader waits for the file to stop changing, and the fingerprint is of what it parsed."""
    path = tmp_path / "prompts.csv"
    whole = "prompt_id,prompt,seed\na,A fox,1\nb,A long prompt about an owl,12\n"
    path.write_text(whole[:-12])  # "b,A long prompt ab" and no newline

    def finish() -> None:
        time.sleep(0.3)
        path.write_text(whole[:-5])  # still changing, still no newline
        time.sleep(0.3)
        path.write_text(whole)

    writer = threading.Thread(target=finish)
    writer.start()
    table = load_prompt_table(path)
    writer.join()
    assert [(r.partition_key, r.prompt) for r in table.rows] == [
        ("a", "A fox"), ("b", "A long prompt about an owl"),
    ]  # fmt: skip
    assert table.invalid == []
    assert table.fingerprint == hashlib.sha256(whole.encode()).hexdigest()


def test_a_table_without_a_final_newline_that_does_not_change_is_read(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "prompt_id,prompt\na,A fox")
    table = load_prompt_table(path)
    assert [r.prompt for r in table.rows] == ["A fox"]
    assert table.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_defaults_fill_empty_cells_only_and_are_validated_in_each_row(tmp_path: Path) -> None:
    """A project's defaults are what an empty cell would have held: a row's own value wins,
    and a default a row cannot take makes that row (not the table) invalid, naming the field."""
    path = write_csv(
        tmp_path,
        "prompt_id,prompt,model,resolution,seed\n"
        "plain,A calm lake,,,\n"
        "own,A dog,v1,480p,3\n"
        "v2,A cat,v2,,\n",
    )
    table = load_prompt_table(path, defaults={"resolution": "580p", "seed": 7})
    rows = {r.partition_key: r for r in table.rows}
    assert (rows["plain"].request.resolution, rows["plain"].request.seed) == ("580p", 7)
    assert (rows["own"].request.resolution, rows["own"].request.seed) == ("480p", 3)
    # v2 has no 580p: that row is invalid and says why; the others go on
    assert [(p.partition_key, p.field) for p in table.invalid] == [("v2", "resolution")]
    # a default is part of the request: changing it is a new request, never the old one's video
    again = load_prompt_table(path, defaults={"resolution": "720p", "seed": 7})
    changed = {r.partition_key: r.request_hash for r in again.rows}
    assert changed["plain"] != rows["plain"].request_hash
    assert changed["own"] == rows["own"].request_hash
    assert load_prompt_table(path).by_key["plain"].request.seed is None


def test_a_default_that_is_no_kvid_parameter_is_refused_naming_it(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "prompt\nA calm lake\n")
    with pytest.raises(ValueError, match=r"'seeds' is not a kvid parameter \(did you mean 'seed'"):
        load_prompt_table(path, defaults={"seeds": 1})
    with pytest.raises(ValueError, match="'prompt' is not a kvid parameter"):
        load_prompt_table(path, defaults={"prompt": "every row the same"})
