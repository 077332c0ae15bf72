"""Prompt sources: one table wherever it is held.

- the same table as a local CSV, as Parquet on S3 (moto's server), as a PostgreSQL table, as a
  SQLite table and as a DataFrame gives the same partition keys, request hashes and bodies,
  params, user columns and invalid rows; a relative image resolves beside the table, on S3 too;
- validation is the same from every source: a misspelt column or no ``prompt`` column stops
  the table (``PromptTableError``);
- change tokens: an unchanged source gives the same token without reading a row (requests to
  S3 and statements to the database are counted), changed rows and a table that lost rows a
  new one;
- faults: S3 down, a bucket or object missing, PostgreSQL down, a role refused, a table
  missing, a broken or writing query, a missing remote image: ``PromptSourceUnavailable`` or
  ``PromptTableError`` (or the row's INVALID) as ``sources.py`` documents, in one line, never
  showing a password.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from kvid_dagster.client import ImageToVideoV1
from kvid_dagster.core.prompts import PromptTable, PromptTableError, load_prompt_table
from kvid_dagster.core.sources import (
    FilePromptSource,
    FramePromptSource,
    PromptSource,
    PromptSourceUnavailable,
    SqlPromptSource,
    UrlPromptSource,
    image_cache_dir,
    prompt_source,
)

IMAGE = Path(__file__).resolve().parent.parent / "data" / "images" / "tiger.jpg"
COLUMNS = [
    "n", "prompt_id", "prompt", "model", "seed", "num_frames", "resolution", "image", "campaign",
]  # fmt: skip
ROWS = [
    (1, "lake", "A calm lake at dawn", "v1", 7, 81, "480p", None, "spring"),
    (2, "tiger", "A tiger in tall grass", "v1", 11, None, None, "images/tiger.jpg", "summer"),
    (3, None, "A red kite over green hills", "v2", None, None, "720p", None, "autumn"),
    (4, "bad-enum", "A fish", "v1", None, None, "1080p", None, "winter"),
]
INTEGERS = ("n", "seed", "num_frames")
KINDS = ("csv", "s3-parquet", "postgresql", "sqlite", "frame")
PASSWORD = "s3cret-pw-4711"


def frame(rows: list[tuple[Any, ...]] = ROWS, columns: list[str] = COLUMNS) -> pd.DataFrame:
    """The table as a DataFrame, integer columns as nullable integers (what a team's export or
    an upstream asset holds)."""
    data = pd.DataFrame(rows, columns=columns)
    for column in (c for c in INTEGERS if c in columns):
        data[column] = data[column].astype("Int64")
    return data


@dataclass
class Place:
    """Where a table is held, its source, and how to (re)write the table there."""

    kind: str
    source: PromptSource
    write: Callable[[pd.DataFrame], None]


def _python(value: Any) -> Any:
    """A frame's cell as the driver takes it: NULL for a missing one, numpy's as Python's."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def write_sql(url: str, data: pd.DataFrame) -> None:
    """``data`` as the table ``prompts``: integer columns INTEGER, the rest TEXT, ``n`` the
    primary key when there is one (the table is replaced, so its columns can change)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    metadata = sa.MetaData()
    table = sa.Table(
        "prompts",
        metadata,
        *(
            sa.Column(c, sa.BigInteger if c in INTEGERS else sa.Text, primary_key=c == "n")
            for c in data.columns
        ),
    )
    rows = [{c: _python(v) for c, v in row.items()} for row in data.to_dict(orient="records")]
    with engine.begin() as connection:
        metadata.drop_all(connection)
        metadata.create_all(connection)
        if rows:
            connection.execute(table.insert(), rows)
    engine.dispose()


@pytest.fixture
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Place]:
    """``place(kind)``: an empty place of that kind. The local folder and the S3 prefix hold
    ``images/tiger.jpg`` beside the table; the PostgreSQL table's images are on S3, the SQLite
    table's in the local folder."""
    local = tmp_path / "local"
    (local / "images").mkdir(parents=True)
    shutil.copy(IMAGE, local / "images" / "tiger.jpg")

    def s3_folder() -> str:
        bucket = request.getfixturevalue("bucket")
        s3 = request.getfixturevalue("s3")
        s3.put_object(Bucket=bucket, Key="team/images/tiger.jpg", Body=IMAGE.read_bytes())
        return f"s3://{bucket}/team"

    def make(kind: str) -> Place:
        if kind == "csv":
            path = local / "prompts.csv"
            return Place(kind, FilePromptSource(path), lambda d: d.to_csv(path, index=False))
        if kind == "s3-parquet":
            folder = s3_folder()
            s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")

            def put(data: pd.DataFrame) -> None:
                buffer = io.BytesIO()
                data.to_parquet(buffer, index=False)
                s3.put_object(Bucket=bucket, Key="team/prompts.parquet", Body=buffer.getvalue())

            return Place(kind, UrlPromptSource(f"{folder}/prompts.parquet"), put)
        if kind == "postgresql":
            url = request.getfixturevalue("postgres_url")
            source = SqlPromptSource(url, table="prompts", image_base=s3_folder())
            return Place(kind, source, lambda d: write_sql(url, d))
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'db' / 'prompts.db'}"
            (tmp_path / "db").mkdir(exist_ok=True)
            source = SqlPromptSource(url, table="prompts", image_base=local)
            return Place(kind, source, lambda d: write_sql(url, d))
        assert kind == "frame"
        held = FramePromptSource(frame(), image_base=local, name="the upstream frame")

        def hold(data: pd.DataFrame) -> None:
            held.frame = data

        return Place(kind, held, hold)

    return make


def summary(table: PromptTable) -> dict[str, Any]:
    """Everything a table means downstream: keys, row numbers, hashes, the bodies sent (an
    image's bytes included), params, user columns, invalid rows, warnings."""
    return {
        "rows": [
            (
                r.partition_key,
                r.row_number,
                r.request_hash,
                r.request.to_body(),
                dict(r.params),
                dict(r.user_columns),
            )
            for r in table.rows
        ],
        "invalid": [(i.row_number, i.partition_key, i.field, i.reason) for i in table.invalid],
        "user_columns": table.user_columns,
        "warnings": table.warnings,
    }


def test_the_same_table_from_every_source_is_the_same_requests(
    place: Callable[[str], Place],
) -> None:
    """Moving a table from a CSV file to Parquet on S3 to PostgreSQL, SQLite or a DataFrame
    pays nothing again: the same keys, request hashes and bodies, params and user columns."""
    tables: dict[str, PromptTable] = {}
    for kind in KINDS:
        where = place(kind)
        where.write(frame())
        tables[kind] = load_prompt_table(where.source)
        assert tables[kind].source == where.source.describe()
    expected = summary(tables["csv"])
    for kind, table in tables.items():
        assert summary(table) == expected, kind
    csv_table = tables["csv"]
    assert csv_table.partition_keys[:2] == ["lake", "tiger"]
    assert csv_table.partition_keys[2].startswith("p-")  # derived from the row's content
    assert [(i.row_number, i.partition_key, i.field) for i in csv_table.invalid] == [
        (4, "bad-enum", "resolution")
    ]
    assert csv_table.user_columns == ("n", "campaign")
    assert csv_table.by_key["lake"].request.seed == 7  # an INTEGER 7 is the CSV's "7"
    tiger = {kind: table.by_key["tiger"] for kind, table in tables.items()}
    assert all(isinstance(row.request, ImageToVideoV1) for row in tiger.values())
    assert all(row.params["image"] == "images/tiger.jpg" for row in tiger.values())
    # from S3 (beside the Parquet file, and the PostgreSQL table's image base) the image is a
    # local copy named by its content: the same bytes as the local file beside the CSV
    for kind in ("s3-parquet", "postgresql"):
        copy = Path(tiger[kind].request.image)
        assert copy.parent == image_cache_dir() and copy.read_bytes() == IMAGE.read_bytes()
    local = Path(tiger["csv"].request.image)
    assert local.is_absolute() and local.read_bytes() == IMAGE.read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_is_validated_the_same_way(kind: str, place: Callable[[str], Place]) -> None:
    where = place(kind)
    where.write(frame([("a", "A fox", 7)], ["prompt_id", "prompt", "seeds"]))
    with pytest.raises(PromptTableError) as raised:
        load_prompt_table(where.source)
    message = str(raised.value)
    assert "'seeds'" in message and "'seed'" in message and "No row of this table" in message
    assert where.source.describe() in message and "\n" not in message
    where.write(frame([("a", "A fox")], ["prompt_id", "title"]))
    with pytest.raises(PromptTableError, match="no 'prompt' column"):
        load_prompt_table(where.source)


# -- change tokens --------------------------------------------------------------------------


@contextlib.contextmanager
def counted(kind: str, source: PromptSource) -> Iterator[list[str]]:
    """What reaches the source meanwhile: each HTTP request sent to S3 (method and URL), each
    SQL statement sent to a database."""
    seen: list[str] = []
    if kind == "s3-parquet":
        assert isinstance(source, UrlPromptSource)
        events = source.path.fs.s3.meta.events

        def sent(request: Any, **_: Any) -> None:
            seen.append(f"{request.method} {request.url}")

        events.register("before-send.s3", sent)
        try:
            yield seen
        finally:
            events.unregister("before-send.s3", sent)
        return

    def statement(_c: Any, _cursor: Any, sql: str, *_: Any) -> None:
        seen.append(sql)

    sa.event.listen(sa.Engine, "before_cursor_execute", statement)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", statement)


@pytest.mark.parametrize("kind", ["csv", "s3-parquet", "postgresql", "sqlite"])
def test_a_change_token_is_cheap_and_changes_with_the_rows(
    kind: str, place: Callable[[str], Place]
) -> None:
    where = place(kind)
    source = where.source
    where.write(frame())
    fingerprint = source.read().fingerprint
    with counted(kind, source) as seen:
        first = source.change_token()
        again = source.change_token()
    assert first is not None and first == again
    # no row is read: one metadata request (S3), one statement that sends back a count and a
    # sum (PostgreSQL), none (a file's or a SQLite file's stat and headers)
    if kind == "s3-parquet":
        assert [s.split()[0] for s in seen] == ["HEAD", "HEAD"]
    elif kind == "postgresql":
        assert len(seen) == 2 and all("sum(hashtextextended" in s for s in seen)
    else:
        assert seen == []

    changed = frame()
    changed.loc[0, "prompt"] = "A calm lake at dusk, with mist"  # one cell, a longer text
    where.write(changed)
    second = source.change_token()
    assert second not in (None, first)
    assert source.read().fingerprint != fingerprint
    assert load_prompt_table(source).by_key["lake"].prompt == "A calm lake at dusk, with mist"

    where.write(changed.iloc[:2])  # the table loses two rows
    third = source.change_token()
    assert third not in (None, first, second)
    assert load_prompt_table(source).partition_keys == ["lake", "tiger"]


def test_a_frames_token_is_its_fingerprint_whatever_types_hold_the_same_rows() -> None:
    typed = frame()
    as_text = typed.astype(str).replace({"<NA>": "", "None": ""})
    source = FramePromptSource(typed)
    token = source.change_token()
    assert token == source.read().fingerprint == FramePromptSource(as_text).change_token()
    assert list(typed.columns) == COLUMNS and typed["seed"].dtype == "Int64"  # untouched
    changed = typed.copy()
    changed.loc[1, "seed"] = 12
    assert FramePromptSource(changed).change_token() != token


# -- faults ---------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_one_line(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert "\n" not in message and PASSWORD not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_s3_down_or_a_bucket_or_object_missing_is_unavailable(
    s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    missing = UrlPromptSource(f"s3://{bucket}/nowhere/prompts.csv")
    no_bucket = UrlPromptSource("s3://kvid-no-such-bucket/prompts.csv")
    for source in (missing, no_bucket):
        for call in (source.change_token, source.read, lambda s=source: load_prompt_table(s)):
            with pytest.raises(PromptSourceUnavailable) as raised:
                call()
            assert_one_line(raised.value, source.describe(), "does not exist")
    assert "bucket" in str(raised.value)  # the missing bucket is named as such

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    # botocore's own retries (about 10 s by default) are the user's setting, not the mapping's
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    down = UrlPromptSource(f"s3://{bucket}/team/prompts.csv")
    for call in (down.change_token, down.read):
        with pytest.raises(PromptSourceUnavailable) as raised:
            call()
        assert_one_line(raised.value, down.describe(), "cannot be reached")
    assert isinstance(raised.value, PromptTableError)  # every caller reports it in one line


def test_a_database_down_refused_or_missing_its_table_is_unavailable(postgres_url: str) -> None:
    url = sa.make_url(postgres_url)
    down = url.set(port=closed_port(), password=PASSWORD)
    refused = url.set(username="kvid_no_such_role", password=PASSWORD)
    no_database = url.set(database="kvid_no_such_database", password=PASSWORD)
    cases = {
        down: "Connection refused",
        refused: 'role "kvid_no_such_role" does not exist',
        no_database: 'database "kvid_no_such_database" does not exist',
    }
    for target, reason in cases.items():
        source = SqlPromptSource(target.render_as_string(hide_password=False), table="prompts")
        assert PASSWORD not in source.describe() and PASSWORD not in repr(source)
        for call in (source.change_token, source.read):
            with pytest.raises(PromptSourceUnavailable) as raised:
                call()
            assert_one_line(raised.value, source.describe(), "cannot be reached", reason)

    absent = SqlPromptSource(postgres_url, table="prompts")
    with pytest.raises(PromptSourceUnavailable) as raised:
        absent.read()
    assert_one_line(raised.value, "has no table 'prompts'")
    assert absent.change_token() is None  # cannot tell; read() says why


def test_a_query_that_fails_or_writes_is_the_tables_error_and_writes_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'prompts.db'}"
    for url in (postgres_url, sqlite_url):
        write_sql(url, frame())
        for query, needle in (
            ("SELECT * FROM no_such_table", "no_such_table"),
            ("SELEC prompt FROM prompts", "syntax error"),
            ("DELETE FROM prompts RETURNING *", "read"),  # read-only: PostgreSQL and SQLite
        ):
            source = SqlPromptSource(url, query=query)
            with pytest.raises(PromptTableError) as raised:
                source.read()
            assert not isinstance(raised.value, PromptSourceUnavailable)
            assert_one_line(raised.value, source.describe(), needle)
        assert len(SqlPromptSource(url, table="prompts").read().records) == len(ROWS)


def test_a_sqlite_source_never_creates_its_database(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    source = SqlPromptSource(f"sqlite:///{path}", table="prompts")
    for call in (source.change_token, source.read):
        with pytest.raises(PromptSourceUnavailable, match="database file does not exist"):
            call()
    assert not path.exists()


def test_a_missing_file_is_unavailable_and_still_a_table_error(tmp_path: Path) -> None:
    source = FilePromptSource(tmp_path / "later.csv")
    for call in (source.change_token, source.read):
        with pytest.raises(PromptSourceUnavailable) as raised:
            call()
        assert_one_line(raised.value, str(tmp_path / "later.csv"), "does not exist")


def test_a_missing_or_unusable_remote_image_is_that_rows_error(
    place: Callable[[str], Place],
) -> None:
    where = place("s3-parquet")
    folder = where.source.describe().rsplit("/", 1)[0]
    rows = [
        *ROWS[:3],
        (5, "ghost", "A ghost ship", "v1", None, None, None, "images/no.jpg", ""),
        (6, "text", "A text file", "v1", None, None, None, "prompts.parquet", ""),
        (7, "nobody", "A stranger", "v1", None, None, None, "~kvid-nobody/x.png", ""),
    ]
    where.write(frame(rows))
    table = load_prompt_table(where.source)
    assert table.partition_keys[:2] == ["lake", "tiger"] and len(table.rows) == 3
    invalid = {i.partition_key: i for i in table.invalid}
    assert [(i.row_number, i.field) for i in table.invalid] == [
        (4, "image"),
        (5, "image"),
        (6, "image"),
    ]
    assert invalid["ghost"].reason == f"{folder}/images/no.jpg does not exist"
    # fetched, then refused by the request's own rules: named by its URL, not its local copy
    assert f"{folder}/prompts.parquet" in invalid["text"].reason
    assert "not a known image format" in invalid["text"].reason
    assert str(image_cache_dir()) not in invalid["text"].reason
    assert "home directory" in invalid["nobody"].reason  # a home not there: still the row's


# -- the database's own ways ----------------------------------------------------------------


def test_a_query_keeps_its_order_and_its_percent_signs_and_colons(postgres_url: str) -> None:
    write_sql(postgres_url, frame())
    query = (
        "SELECT prompt_id, prompt || ' at 10:30' AS prompt, model, resolution FROM prompts "
        "WHERE prompt LIKE '%a%' AND prompt_id IS NOT NULL ORDER BY n DESC"
    )
    table = load_prompt_table(SqlPromptSource(postgres_url, query=query))
    assert table.partition_keys == ["tiger", "lake"]  # bad-enum is invalid, the kite has no id
    assert table.by_key["lake"].prompt == "A calm lake at dawn at 10:30"


def test_a_table_without_a_primary_key_is_read_in_the_order_of_its_columns(
    postgres_url: str,
) -> None:
    engine = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE SCHEMA team")
        connection.exec_driver_sql("CREATE TABLE team.prompts (prompt_id uuid, prompt text)")
        keys = sorted(uuid.uuid4() for _ in range(3))
        for key in reversed(keys):
            connection.execute(
                sa.text("INSERT INTO team.prompts VALUES (:k, :p)"), {"k": key, "p": f"A {key}"}
            )
    engine.dispose()
    table = load_prompt_table(SqlPromptSource(postgres_url, table="team.prompts"))
    assert table.partition_keys == [str(k) for k in keys]  # a uuid is its text form


def test_prompt_source_takes_a_path_a_url_or_a_frame(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    assert isinstance(prompt_source(path), FilePromptSource)
    assert isinstance(prompt_source(str(path)), FilePromptSource)
    assert prompt_source(path.as_uri()).describe() == str(path)
    assert isinstance(prompt_source("memory://team/prompts.parquet"), UrlPromptSource)
    assert isinstance(prompt_source(frame()), FramePromptSource)
    source = SqlPromptSource(f"sqlite:///{tmp_path / 'x.db'}", query="SELECT 1")
    assert prompt_source(source) is source
    with pytest.raises(PromptTableError, match=r"SqlPromptSource\(database_url") as raised:
        prompt_source(f"postgresql://kvid:{PASSWORD}@db.example/prompts")
    assert_one_line(raised.value)
    with pytest.raises(ValueError, match="exactly one of table= and query="):
        SqlPromptSource("sqlite://", table="prompts", query="SELECT 1")


def test_a_memory_url_is_read_like_a_file_and_its_token_follows_it() -> None:
    """Any fsspec filesystem, not only S3: ``memory://`` (what a test or a notebook holds)."""
    from upath import UPath

    target = UPath(f"memory://kvid-{uuid.uuid4().hex[:8]}/prompts.csv")
    target.write_text("prompt_id,prompt\na,A fox\n")
    source = UrlPromptSource(str(target))
    token = source.change_token()
    assert token is not None and token == source.change_token()
    assert load_prompt_table(source).partition_keys == ["a"]
    target.write_text("prompt_id,prompt\na,A fox\nb,An owl\n")
    assert source.change_token() != token
    assert load_prompt_table(source).partition_keys == ["a", "b"]
