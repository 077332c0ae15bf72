"""Property-based tests of the prompt table: whatever the file holds, the table never crashes.

- a file that cannot be a table raises ``PromptTableError`` and nothing else;
- otherwise every data row becomes exactly one valid row or one invalid row naming its row
  number and a field, and valid keys are unique and safe as file names;
- garbage rows never change the request of a valid row around them.
"""

from __future__ import annotations

import csv
import decimal
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kvid_dagster.core.poll import video_path
from kvid_dagster.core.prompts import (
    PARAM_COLUMNS,
    PROMPT_ID_PATTERN,
    ROW_COLUMNS,
    PromptRow,
    PromptTable,
    PromptTableError,
    find_misspelling,
    load_prompt_table,
    parse_rows,
)
from kvid_dagster.ledger import Submission, VideoFile, VideoStatus

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # tmp_path only names a folder, never written
    ],
)
KNOWN = [*ROW_COLUMNS, *PARAM_COLUMNS]

# cells that have broken parsers before: numbers in odd spellings, paths, keywords, huge text
TRICKY = [
    "", " ", "81", "101", "+81", "-1", "1e309", "nan", "NaN", "None", "NULL", "true", "FALSE",
    "480p", "1080p", "16:9", "5", "10", "v1", "v2", "text-to-video", "image-to-video",
    "bytedance/seedance/v1/lite/text-to-video", "../../etc/passwd", "/etc/passwd", "~nobody/x.png",
    "file:///etc/passwd", "javascript:alert(1)", "http://", "https://example.invalid/a.png",
    "C:\\Windows\\x.png", "a" * 70, "x" * 300, "٨١", "８１", "\u202e", "\x00", "\r", "a\r\nb",
    "😀", "\ufeffprompt", "CON", ".", "..", "-leading", "p-000000000000",
    "x" * 20_000,
]  # fmt: skip
cell_text = st.one_of(
    st.sampled_from(TRICKY),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
)
column_name = st.one_of(st.sampled_from(KNOWN), st.sampled_from(["", " ", "notes", "Prompt"]))


def check_table(table: PromptTable, data_rows: int, download_dir: Path) -> None:
    """The invariants every parsed table must satisfy."""
    numbers = sorted([r.row_number for r in table.rows] + [p.row_number for p in table.invalid])
    assert numbers == list(range(1, data_rows + 1))  # each row exactly once, valid or not
    for problem in table.invalid:
        assert problem.field and isinstance(problem.field, str)
        assert problem.reason
        assert problem.message.startswith(f"row {problem.row_number}")
        assert f": {problem.field}: " in problem.message
    keys = [row.partition_key for row in table.rows]
    assert len(keys) == len(set(keys))
    for row in table.rows:
        assert PROMPT_ID_PATTERN.fullmatch(row.partition_key)
        assert row.request_hash == row.request.canonical_hash()
        # each job of the row has its own file, inside download_dir
        paths = {video_path(download_dir, submission_of(row, attempt)) for attempt in (1, 2)}
        assert len(paths) == 2
        assert all(path.parent == download_dir.resolve() for path in paths)


def submission_of(row: PromptRow, attempt: int) -> Submission:
    """The ledger's record of an attempt at ``row``'s request (what names its video)."""
    return Submission(
        submission_id=attempt,
        request_hash=row.request_hash,
        attempt=attempt,
        partition_key=row.partition_key,
        prompt=row.prompt,
        job_kind=row.job_kind,
        model=row.model,
        params_json=row.params_json,
        status=VideoStatus.SUBMITTED,
        request_id=None,
        progress=None,
        video=VideoFile(),
        error=None,
        cost_credits=None,
        owner=None,
        claimed_at=None,
        heartbeat_at=None,
        submitted_at=None,
        completed_at=None,
        updated_at=None,
        version=0,
    )


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def load_bytes(data: bytes, suffix: str) -> PromptTable:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"prompts{suffix}"
        path.write_bytes(data)
        settled(path)
        return load_prompt_table(path)


def settled(path: Path) -> None:
    """Date the file a minute back: written earlier, not being written now (a CSV file without
    a final newline that changed within the last second is waited for)."""
    past = time.time() - 60
    os.utime(path, (past, past))


# ---------------------------------------------------------------------------------------------
# whole files


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".parquet", ".txt"]))
def test_any_bytes_are_a_table_or_a_prompt_table_error(data: bytes, suffix: str) -> None:
    try:
        table = load_bytes(data, suffix)
    except PromptTableError as exc:
        assert "prompt table" in str(exc)
        return
    assert isinstance(table, PromptTable)


@SETTINGS
@given(
    header=st.lists(column_name, min_size=1, max_size=6),
    rows=st.lists(st.lists(cell_text, max_size=8), max_size=8),
)
def test_csv_tables_of_anything(header: list[str], rows: list[list[str]], tmp_path: Path) -> None:
    # the reader skips blank lines: the first line with a cell is the header, the rest are rows
    lines = [line for line in [header, *rows] if any(cell.strip() for cell in line)]
    names = [h.strip() for h in lines[0]] if lines else ["prompt"]
    data = lines[1:]
    unusable = (
        "prompt" not in names
        or any(n > 1 for name, n in Counter(names).items() if name)
        or find_misspelling(names) is not None
    )
    try:
        table = load_bytes(csv_bytes(header, rows), ".csv")
    except PromptTableError:
        assert unusable  # only a whole-file problem may stop the table
        return
    assert not unusable
    check_table(table, len(data), tmp_path)
    # a row with cells beyond the header, or too few, is reported as such, never shifted
    for number, cells in enumerate(data, start=1):
        if len(cells) < len(names) or any(cell.strip() for cell in cells[len(names) :]):
            assert any(p.row_number == number and p.field == "row" for p in table.invalid)


def _column_values(kind: str, n: int) -> st.SearchStrategy[list[Any]]:
    values: dict[str, st.SearchStrategy[Any]] = {
        "text": st.none() | cell_text,
        "int": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(allow_nan=True, allow_infinity=True),
        "bool": st.booleans(),
        "list": st.none() | st.lists(st.integers(-5, 200), max_size=3),
        "bytes": st.none() | st.binary(max_size=8),
        "time": st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)),
    }
    return st.lists(values[kind], min_size=n, max_size=n)


@st.composite
def parquet_frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(0, 6))
    names = draw(st.lists(st.sampled_from([*KNOWN, "notes"]), min_size=1, max_size=6, unique=True))
    kinds = ["text", "int", "float", "bool", "list", "bytes", "time"]
    columns = {name: draw(_column_values(draw(st.sampled_from(kinds)), n)) for name in names}
    return pd.DataFrame(columns)


@SETTINGS
@given(frame=parquet_frames(), as_index=st.booleans())
def test_parquet_tables_of_anything(frame: pd.DataFrame, as_index: bool, tmp_path: Path) -> None:
    if as_index and "prompt_id" in frame.columns:
        frame = frame.set_index("prompt_id")  # a table saved with its keys as the index
    buffer = io.BytesIO()
    try:
        frame.to_parquet(buffer)
    except Exception:
        assume(False)
    try:
        table = load_bytes(buffer.getvalue(), ".parquet")
    except PromptTableError:
        assert "prompt" not in set(frame.columns) | set(frame.index.names)
        return
    check_table(table, len(frame), tmp_path)


# ---------------------------------------------------------------------------------------------
# records, as parse_rows sees them


odd_values = st.one_of(
    cell_text,
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=8),
    st.just(np.array([1, 2])),
    st.just(np.array([], dtype=np.int64)),
    st.just(np.float32("nan")),
    st.just(np.int64(81)),
    st.just(pd.NA),
    st.just(pd.NaT),
    st.just(decimal.Decimal("81")),
    st.just({"nested": [1]}),
    st.just(datetime(2026, 1, 1, tzinfo=UTC)),
)


@SETTINGS
@given(
    records=st.lists(
        st.dictionaries(st.sampled_from([*KNOWN, "junk"]), odd_values, max_size=8), max_size=8
    )
)
def test_parse_rows_takes_any_cell_values(records: list[dict[str, Any]], tmp_path: Path) -> None:
    table = parse_rows(records, base_dir=tmp_path)
    check_table(table, len(records), tmp_path)


# ---------------------------------------------------------------------------------------------
# good rows are unaffected by garbage around them

safe_prompt = st.text(
    st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=40
).filter(lambda s: s.strip() != "")


@st.composite
def valid_rows(draw: st.DrawFn) -> dict[str, str]:
    model = draw(st.sampled_from(["v1", "v2"]))
    row = {
        "prompt": draw(safe_prompt),
        "model": model,
        "resolution": draw(st.sampled_from(["480p", "720p"])),
        "seed": draw(st.sampled_from(["", "1", "42"])),
    }
    if model == "v1":
        row["num_frames"] = draw(st.sampled_from(["", "81", "100"]))
    else:
        row["duration"] = draw(st.sampled_from(["", "5", "10"]))
    return row


garbage_rows = st.dictionaries(
    st.sampled_from(["prompt", "model", "resolution", "seed", "num_frames", "duration", "job"]),
    cell_text,
    max_size=7,
)


@SETTINGS
@given(
    good=st.lists(valid_rows(), min_size=1, max_size=5, unique_by=lambda r: r["prompt"]),
    garbage=st.lists(garbage_rows, max_size=6),
    explicit_ids=st.booleans(),
    garbage_ids=st.lists(st.sampled_from(["", "../x", "a/b", " ", "x" * 70, "g-1", "g-2"])),
    seed=st.randoms(use_true_random=False),
    fmt=st.sampled_from(["csv", "parquet"]),
)
def test_valid_rows_are_the_same_with_or_without_garbage_around_them(
    good: list[dict[str, str]],
    garbage: list[dict[str, str]],
    explicit_ids: bool,
    garbage_ids: list[str],
    seed: Any,
    fmt: str,
) -> None:
    if explicit_ids:
        good = [{**row, "prompt_id": f"v{i}"} for i, row in enumerate(good)]
    garbage = [
        {**row, "prompt_id": garbage_ids[i % len(garbage_ids)]} if garbage_ids else row
        for i, row in enumerate(garbage)
    ]
    # garbage may repeat its own ids (then it is invalid), never a good row's id
    mixed = [*good, *garbage]
    seed.shuffle(mixed)
    clean_table = write_and_load(good, fmt)
    mixed_table = write_and_load(mixed, fmt)
    assert clean_table.invalid == [] and len(clean_table.rows) == len(good)
    for row in clean_table.rows:
        twin = mixed_table.by_key.get(row.partition_key)
        assert twin is not None, row.partition_key
        assert twin.request == row.request and twin.request_hash == row.request_hash


def write_and_load(rows: list[Mapping[str, str]], fmt: str) -> PromptTable:
    columns = sorted({name for row in rows for name in row} | {"prompt"})
    if fmt == "csv":
        data = csv_bytes(columns, [[row.get(c, "") for c in columns] for row in rows])
        return load_bytes(data, ".csv")
    buffer = io.BytesIO()
    pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns).astype(
        "object"
    ).to_parquet(buffer)
    return load_bytes(buffer.getvalue(), ".parquet")


# ---------------------------------------------------------------------------------------------
# examples hypothesis found or that must never regress


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("prompt_id,prompt\na,hello,extra\nb,ok\n", "row"),  # pandas shifted this into an index
        ("prompt_id,prompt,image\na,hi,~nobody-kvid/x.png\nb,ok,\n", "image"),
        ("prompt_id,prompt,image\na,hi," + "d/" * 3000 + "x.png\nb,ok,\n", "image"),
        ("prompt_id,prompt\na," + "x" * 200_000 + "\nb,ok\n", "prompt"),  # over csv's field limit
    ],
)
def test_one_broken_row_is_that_rows_error(text: str, field: str, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text, encoding="utf-8")
    table = load_prompt_table(path)
    assert [r.partition_key for r in table.rows] == ["b"]
    assert [(p.row_number, p.field) for p in table.invalid] == [(1, field)]


def test_repeated_csv_columns_are_a_table_error_not_a_renamed_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,prompt\nx,y\n", encoding="utf-8")
    with pytest.raises(PromptTableError, match="repeats columns: prompt"):
        load_prompt_table(path)


def test_a_parquet_table_indexed_by_prompt_id_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["One", "Two"]}).set_index(
        "prompt_id"
    ).to_parquet(path)
    assert load_prompt_table(path).partition_keys == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# the same table, whoever wrote it

PROMPT_CHARS = st.characters(
    codec="utf-8", exclude_categories=["Cs", "Cc", "Zl", "Zp"], include_characters="\n,\"' "
)


@st.composite
def canonical_tables(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows of a table as a person means them: a key (all integers or all names), a prompt
    with commas, quotes and line breaks, an optional seed and frame count, their own notes."""
    n = draw(st.integers(1, 6))
    if draw(st.booleans()):
        ids: list[Any] = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
    else:
        name = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
        ids = draw(st.lists(name, min_size=n, max_size=n, unique=True))
    return [
        {
            "prompt_id": ids[i],
            "prompt": draw(st.text(PROMPT_CHARS, min_size=1, max_size=40).filter(str.strip)),
            "seed": draw(st.none() | st.integers(0, 2**31)),
            "num_frames": draw(st.none() | st.integers(81, 100)),
            "notes": draw(st.none() | st.text(PROMPT_CHARS, min_size=1, max_size=12)),
        }
        for i in range(n)
    ]


def _csv_module(rows: list[dict[str, Any]], path: Path, crlf: bool, bom: bool, quote: int) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(
        buffer, fieldnames=list(rows[0]), quoting=quote, lineterminator="\r\n" if crlf else "\n"
    )
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    path.write_bytes((("\ufeff" if bom else "") + buffer.getvalue()).encode())


def _pandas_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """As pandas holds it after reading a table with a blank cell in each integer column:
    float64 (an integer key 1 becomes 1.0, a seed 7 becomes 7.0)."""
    frame = pd.DataFrame(rows).astype({c: "float64" for c in ("seed", "num_frames")})
    if pd.api.types.is_integer_dtype(frame["prompt_id"]):
        frame["prompt_id"] = frame["prompt_id"].astype("float64")
    return frame


WRITERS: dict[str, Any] = {
    "csv module": lambda rows, path, crlf, bom, quote: _csv_module(rows, path, crlf, bom, quote),
    "pandas csv": lambda rows, path, crlf, bom, quote: _pandas_frame(rows).to_csv(
        path, index=False, lineterminator="\r\n" if crlf else "\n",
        encoding="utf-8-sig" if bom else "utf-8", quoting=quote,
    ),
    "pandas parquet": lambda rows, path, *_: _pandas_frame(rows).to_parquet(path),
    "pyarrow parquet": lambda rows, path, *_: pq.write_table(pa.Table.from_pylist(rows), path),
}  # fmt: skip


@SETTINGS
@given(
    rows=canonical_tables(),
    crlf=st.booleans(),
    bom=st.booleans(),
    quote=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
)
# found by a run under load: a user's cell of only spaces is blank, like any other blank cell
@example(
    rows=[{"prompt_id": "a", "prompt": "0", "seed": None, "num_frames": None, "notes": " "}],
    crlf=False,
    bom=False,
    quote=csv.QUOTE_MINIMAL,
)
def test_every_writer_gives_the_same_keys_requests_and_user_columns(
    rows: list[dict[str, Any]], crlf: bool, bom: bool, quote: int, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, write in WRITERS.items():
            path = Path(folder) / f"{name.replace(' ', '-')}.{name.split()[-1]}"
            write(rows, path, crlf, bom, quote)
            settled(path)
            table = load_prompt_table(path)
            assert table.invalid == [], (name, table.invalid)
            seen[name] = {
                r.partition_key: (r.request_hash, r.prompt, dict(r.user_columns))
                for r in table.rows
            }
    expected = {  # a cell of only spaces is blank: not given, so not kept either
        str(row["prompt_id"]): (
            row["prompt"],
            {"notes": row["notes"]} if row["notes"] and row["notes"].strip() else {},
        )
        for row in rows
    }
    reference = seen["csv module"]
    assert {k: (v[1], v[2]) for k, v in reference.items()} == expected
    for name, found in seen.items():
        assert found == reference, name
