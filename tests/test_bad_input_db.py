"""Bad input never stops the good rows, on either database.

PostgreSQL refuses what SQLite takes (a NUL in a text column, a key longer than its
VARCHAR(255)); one such value in one row used to fail the whole registration, so no row of the
table was sent. Whatever a table holds, each value reaches the database in a form it accepts:
cells the ledger cannot store make their row INVALID (naming the row and the field), unsafe keys
never become keys, and free text from outside (an invalid row's excerpt, a server's FAILED
message, a refused generate's error) is stored with U+FFFD for each character no backend stores.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import pytest
from dagster import instance_for_test
from faultkit import (
    make_defs,
    poll_until_settled,
    run_prompts,
    run_submit,
    submit,
    table_rows,
    write_table,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ledger import Row

from kvid_dagster.core.prompts import PROMPT_ID_PATTERN, PromptTable, load_prompt_table, parse_rows
from kvid_dagster.core.submit import invalid_entries, register_table
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    ClaimOwner,
    InvalidEntry,
    JobChange,
    Ledger,
    Submission,
    VideoFile,
    VideoStatus,
)
from kvid_dagster.ledger.tables import storable_text, unstorable_at

NUL = "\x00"
LONG_KEY = "k" * 300  # the key column is VARCHAR(255)


def bad_table(folder: Path) -> Path:
    """Two good rows around a NUL in a prompt, in a key and in the user's own column, and a
    key too long for the key column."""
    path = folder / "prompts.csv"
    path.write_text(
        "prompt_id,prompt,resolution,notes\n"
        "a,A lake at dawn,480p,first\n"
        f"nul,A fox{NUL} in snow,480p,\n"
        f"{LONG_KEY},A key too long for the column,480p,\n"
        f"k{NUL}ey,A key with a NUL,480p,\n"
        f"notes,A NUL in the user's own column,480p,x{NUL}y\n"
        "b,A quiet forest,480p,second\n",
        encoding="utf-8",
    )
    return path


def test_a_nul_and_an_overlong_key_make_their_rows_invalid_and_the_good_rows_are_sent(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    table = load_prompt_table(bad_table(tmp_path))
    assert [r.partition_key for r in table.rows] == ["a", "b"]
    fields = {p.row_number: p.field for p in table.invalid}
    assert fields == {2: "prompt", 3: "prompt_id", 4: "prompt_id", 5: "notes"}
    for problem in table.invalid:
        assert problem.message.startswith(f"row {problem.row_number}")
        assert "\n" not in problem.message and NUL not in problem.message
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    register_table(ledger, table)
    rows = ledger.rows_by_key()
    # a refused key is no key: its row is found by its number
    assert set(rows) == {"a", "b", "nul", "row-3", "row-4", "notes"}
    assert rows["nul"].prompt == "A fox\ufffd in snow"  # the excerpt, as stored
    assert rows["nul"].status is VideoStatus.INVALID
    assert "NUL character" in str(rows["row-4"].error)
    assert str(rows["row-3"].error).startswith("row 3: prompt_id: 'kkk")
    assert "notes: holds a NUL character" in str(rows["notes"].error)
    outcomes = submit(emulator.base_url, ledger, table.rows)
    assert sorted(o.partition_key for o in outcomes if o.request_id) == ["a", "b"]
    assert emulator.stats["generate"] == 2


def test_the_prompts_and_video_jobs_assets_send_the_good_rows_of_a_table_with_bad_ones(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    defs = make_defs(
        emulator.base_url, bad_table(tmp_path), tmp_path / "data", database_url=database_url
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as instance:
        assert run_prompts(defs, instance)
        assert instance.get_dynamic_partitions("kvid_prompts") == ["a", "b"]
        assert run_submit(defs, instance, "a", "b")
    assert emulator.stats["generate"] == 2


def test_server_text_with_a_nul_is_stored_wherever_it_goes(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    """A FAILED message (a real emulator job's), a refused generate's error, an uncertain
    one's, a video's file name: each may hold a NUL, and each is stored with U+FFFD for it."""
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a"]))
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    register_table(ledger, PromptTable(str(tmp_path), rows=rows))
    [outcome] = submit(emulator.base_url, ledger, rows)
    assert outcome.request_id is not None
    emulator.fail_job(outcome.request_id, f"worker{NUL}crashed")
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    failed = ledger.row("a")
    assert failed is not None and failed.status is VideoStatus.FAILED
    assert str(failed.error).endswith(": worker\ufffdcrashed")
    assert failed.error in [e["error"] for e in ledger.events()]

    owner = ClaimOwner.current("run-1")
    released, uncertain, named = (Row(k, k * 8) for k in ("r", "u", "n"))
    ledger.register([released, uncertain, named])
    claims = [ledger.claim(r, owner, cost_credits=1.0) for r in (released, uncertain, named)]
    assert all(isinstance(c, Submission) for c in claims)
    r_sub, u_sub, n_sub = cast(list[Submission], claims)
    ledger.release(r_sub, f"422: bad{NUL}field", invalid=True)
    ledger.mark_uncertain(u_sub, f"timed out{NUL}")
    ledger.record_submitted(n_sub, "rid-n")
    n_sub = cast(Submission, ledger.submission(n_sub.submission_id))
    ledger.apply([JobChange(n_sub.submission_id, n_sub.version, VideoStatus.COMPLETED,
                            video=VideoFile(name=f"v{NUL}.mp4"), completed=True)])  # fmt: skip
    by_key = ledger.rows_by_key()
    assert by_key["r"].status is VideoStatus.INVALID and by_key["r"].error == "422: bad\ufffdfield"
    assert by_key["u"].status is VideoStatus.UNCERTAIN and by_key["u"].error == "timed out\ufffd"
    assert by_key["n"].video.name == "v\ufffd.mp4"


def test_a_key_the_database_cannot_hold_is_refused_before_anything_is_written(
    database_url: str,
) -> None:
    """The validator never hands out such a key; a caller of the ledger's API that does gets
    the same clear error on both backends (SQLite would store it, PostgreSQL fail the batch)."""
    with Ledger(database_url) as ledger:
        for entry in (InvalidEntry(LONG_KEY, "p", "r"), InvalidEntry(f"k{NUL}", "p", "r")):
            with pytest.raises(ValueError, match=r"partition_key .* cannot be stored"):
                ledger.register([Row("ok", "h")], [entry])
        assert ledger.rows() == []


# -- the property: any table registers, and only what the validator accepts is valid ----------

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ANY_TEXT = st.text(st.characters(), max_size=12)  # NULs, controls, lone surrogates included
CELL = st.one_of(
    ANY_TEXT,
    st.sampled_from(["", NUL, "a\x00b", "\ud800", "\x1b[0m", "\r\n", "480p", "81", "v2", "7"]),
    st.just("x" * 5_000),
)
KEY = st.one_of(
    st.from_regex(r"[a-z][a-z0-9._-]{0,10}", fullmatch=True),
    st.text(st.characters(), min_size=1, max_size=8),
    st.integers(240, 320).map(lambda n: "k" * n),
    st.just(f"k{NUL}"),
)
KVID_COLUMNS = ["prompt", "negative_prompt", "seed", "resolution", "model", "num_frames"]


@st.composite
def any_table(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows, each the user's columns (named anything) and some of kvid's, half of them with
    cells that make sense so that valid rows sit among the bad ones."""
    user = draw(st.lists(ANY_TEXT.filter(lambda n: n not in KVID_COLUMNS), max_size=2))
    records = []
    for _ in range(draw(st.integers(1, 6))):
        record: dict[str, Any] = {"prompt_id": draw(KEY)}
        if draw(st.booleans()):
            record["prompt"] = draw(st.from_regex(r"[A-Za-z ]{1,30}", fullmatch=True))
        for column in draw(st.lists(st.sampled_from([*KVID_COLUMNS, *user]), unique=True)):
            record[column] = draw(CELL)
        records.append(record)
    return records


counter = itertools.count()


@SETTINGS
@given(records=any_table())
def test_any_table_registers_and_its_valid_rows_are_exactly_the_validators(
    database_url: str, records: list[dict[str, Any]]
) -> None:
    table = parse_rows(records, base_dir=None)
    with Ledger(database_url, table_prefix=f"p{next(counter)}_") as ledger:
        register_table(ledger, table)  # never raises, whatever the table holds
        rows = ledger.rows_by_key()
    for row in table.rows:
        got = rows[row.partition_key]
        assert got.status is VideoStatus.PENDING
        assert (got.prompt, got.params_json, got.user_columns_json) == (
            row.prompt, row.params_json, row.user_columns_json,
        )  # fmt: skip
    entries = invalid_entries(table)
    assert set(rows) == {r.partition_key for r in table.rows} | {e.partition_key for e in entries}
    messages: dict[str, set[str]] = {}
    for entry in entries:
        messages.setdefault(entry.partition_key, set()).add(storable_text(entry.reason))
    for key, reasons in messages.items():
        assert rows[key].status is VideoStatus.INVALID and rows[key].error in reasons
    for problem in table.invalid:
        record = records[problem.row_number - 1]
        assert problem.field in {*record, "row", "prompt"}  # the field is named
        assert problem.message.startswith(f"row {problem.row_number}")
        assert "\n" not in problem.message
        assert problem.partition_key is None or PROMPT_ID_PATTERN.fullmatch(problem.partition_key)
    for number, record in enumerate(records, start=1):
        if any(isinstance(v, str) and unstorable_at(v) is not None for v in record.values()):
            assert number in {p.row_number for p in table.invalid}
