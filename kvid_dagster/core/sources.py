"""Prompt sources: the one place that knows where a prompt table's rows come from.

A :class:`PromptSource` is a local file (:class:`FilePromptSource`), a file at any fsspec URL
(:class:`UrlPromptSource`: ``s3://``, ``gs://``, ...), a database table or query through
SQLAlchemy (:class:`SqlPromptSource`), or a pandas DataFrame in memory
(:class:`FramePromptSource`, what an upstream asset gives). Each says what it is
(:meth:`~PromptSource.describe`), whether its rows may have changed without reading them
(:meth:`~PromptSource.change_token`), and reads them (:meth:`~PromptSource.read`) as
:class:`SourceRows`: column names, one mapping per row with the cells as the source holds them,
and a fingerprint of exactly what was read. Validation is not done here: ``prompts.py`` types
every cell by kvid's own rules, so the same rows give the same partition keys and request hashes
whichever source holds them.

Two errors, both one line naming the source and what to change:

- :class:`PromptTableError`: the table was reached and is wrong (not CSV or Parquet, no
  ``prompt`` column, a query that fails): it stays wrong until someone fixes it;
- :class:`PromptSourceUnavailable` (a :class:`PromptTableError` too, so that every caller that
  reports a table error reports this one): the rows cannot be had now and nothing is known of
  them. Unreachable (S3 or the database down, credentials refused), and also *missing* (the
  file, object, bucket or table is not there, or a CSV file is still being written): a missing
  table may be about to appear, and a caller that retries (the prompts sensor) must never take
  "missing" for "empty" and forget rows.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from upath import UPath

from kvid_dagster.client import MAX_IMAGE_BYTES
from kvid_dagster.core.prompt_cells import CellError, cell_text
from kvid_dagster.ledger import normalize_database_url, redact_url
from kvid_dagster.media.storage import StoragePath, filesystem, is_remote, storage_path

MAX_TABLE_BYTES = 256 * 1024 * 1024
# a CSV file without its last newline may be half written: read it once it stops changing
_SETTLE_S = 1.0
_SETTLE_MAX_S = 5.0
# a PostgreSQL server that does not answer (a dropped route) is unavailable after this long
_CONNECT_TIMEOUT_S = 10
# what an object store's info() may say of an object's version or content (gcsfs, s3fs, ...)
_VERSION_FIELDS = (
    "VersionId", "generation", "version_id", "ETag", "etag", "md5Hash",
    "size", "LastModified", "last_modified", "mtime", "updated", "created",
)  # fmt: skip
_SHOWN_QUERY_CHARS = 60


class PromptTableError(ValueError):
    """The table was reached and cannot be used as it is (rows are never reported this way)."""


class PromptSourceUnavailable(PromptTableError):
    """The rows cannot be had now (unreachable, or not there yet); nothing is known of them."""


class ImageUnavailable(OSError):
    """A row's remote image cannot be fetched: that row's problem, never the table's."""


# --- where relative image paths resolve ------------------------------------------------------


@dataclass(frozen=True)
class FetchedImage:
    """A remote image's local copy, named by its content, and the URL it came from."""

    path: Path
    url: str


class ImageBase:
    """Where a row's relative image path resolves: a local folder, a remote folder, or the
    working directory (``None``).

    A local (or absolute, or http) image is left to the request's own rules, as it always was.
    A relative image under a remote folder is fetched (at most ``MAX_IMAGE_BYTES``) into a local
    copy named by its sha256, which the request then carries: the same bytes, so the same
    request hash as the same row read from a local table beside a copy of the image. A copy
    named by its content never changes between the hash and the send.
    """

    def __init__(self, location: str | os.PathLike[str] | None = None) -> None:
        self.location: StoragePath | None = (
            None
            if location is None
            else storage_path(location)
            if isinstance(location, UPath) or "://" in os.fspath(location)
            else Path(location)  # as given: a local table's image paths are what they were
        )
        self._fetched: dict[str, FetchedImage] = {}

    def __repr__(self) -> str:
        return f"ImageBase({self.describe()!r})"

    def describe(self) -> str:
        return "the working directory" if self.location is None else _shown_url(str(self.location))

    @property
    def local_dir(self) -> Path | None:
        """The folder a relative local image path resolves against (None: the working
        directory, or a remote base: its images are fetched instead)."""
        return self.location if isinstance(self.location, Path) else None

    def fetch(self, value: str) -> FetchedImage | None:
        """The local copy of ``value`` when it is a relative path under a remote folder, else
        None (it resolves as it is). Raises :class:`ImageUnavailable` naming the URL."""
        remote = self.location
        if not isinstance(remote, UPath) or not is_remote(remote) or _is_absolute(value):
            return None
        if value in self._fetched:
            return self._fetched[value]
        key = posixpath.normpath(posixpath.join(remote.path, value.strip()))
        shown = _shown_url(f"{remote.protocol}://{key}")
        try:
            data = filesystem(remote).cat_file(key, start=0, end=MAX_IMAGE_BYTES + 1)
        except FileNotFoundError:
            raise ImageUnavailable(f"{shown} does not exist") from None
        except ImportError:
            raise
        except Exception as exc:  # any filesystem's errors: the row's, named
            raise ImageUnavailable(f"{shown} cannot be read: {type(exc).__name__}: {exc}") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageUnavailable(f"{shown} is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            copy = _cached(data, key)
        except OSError as exc:  # the temp dir full or not ours: still this row's problem
            raise ImageUnavailable(f"{shown} cannot be copied locally: {exc}") from None
        fetched = self._fetched[value] = FetchedImage(copy, shown)
        return fetched


def image_cache_dir() -> Path:
    """The local copies of remote images, one folder per user (only its owner writes it)."""
    return Path(tempfile.gettempdir()) / f"kvid-images-{os.getuid()}"


def _cached(data: bytes, key: str) -> Path:
    """``data`` in the image cache as ``<sha256><suffix>``: written whole, then renamed into
    place, so a reader never sees part of it."""
    folder = image_cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    suffix = posixpath.splitext(key)[1].lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
    target = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not (target.is_file() and target.stat().st_size == len(data)):
        partial = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


def _is_absolute(value: str) -> bool:
    """An image that does not resolve against the table's folder: a URL (or anything with a
    scheme, refused later by the request's rules), an absolute or home-relative path."""
    text = value.strip()
    first = text.split("/", 1)[0]
    return "://" in text or ":" in first or text.startswith("~") or Path(text).is_absolute()


# --- what a source reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRows:
    """A table as read: its columns, one mapping per row (cells as the source holds them: text
    from CSV, typed values from Parquet, a database or a DataFrame), the rows the reader found
    broken (row number -> (field, reason)), the sha256 of exactly what was read, and where the
    rows' relative image paths resolve."""

    columns: list[str]
    records: list[dict[str, Any]]
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)
    fingerprint: str = ""
    images: ImageBase = field(default_factory=ImageBase)


class PromptSource(ABC):
    """Where a prompt table's rows come from."""

    @abstractmethod
    def describe(self) -> str:
        """One short line for messages and the UI (a path, a URL, a database and table); never
        a password."""

    @abstractmethod
    def change_token(self) -> str | None:
        """A cheap token that changes whenever the rows may have changed (None: this source
        cannot tell without reading). Equal tokens mean the rows are as they were; a new
        token only that they may not be: compare ``read().fingerprint`` to know. Take it
        before reading, so that a change in between is seen on the next check. Raises
        :class:`PromptSourceUnavailable`, never :class:`PromptTableError` (a table that is
        wrong is what ``read()`` reports)."""

    @abstractmethod
    def read(self) -> SourceRows:
        """Every row. Raises :class:`PromptSourceUnavailable` or :class:`PromptTableError`."""

    @property
    def uri(self) -> str | None:
        """Where the table is stored, as a path or URL a reader can open (None: it is not a
        file, e.g. a database table): the ``dagster/uri`` of ``kvid_prompts``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


# --- a local file ----------------------------------------------------------------------------


class FilePromptSource(PromptSource):
    """A CSV or Parquet file on this machine (Parquet by its ``.parquet``/``.pq`` suffix).
    Relative image paths resolve against its folder. A CSV file that does not end in a newline
    and changed within the last second is read once it stops changing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()

    def describe(self) -> str:
        return str(self.path)

    @property
    def uri(self) -> str:
        return str(self.path)

    def change_token(self) -> str:
        """The file's identity, size and modification time (a stat, no read). An edit that
        keeps the size within the file system's clock tick (a few ms) is not seen until the
        next one."""
        with _file_errors(self.path):
            stat = self.path.stat()
        return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"

    def read(self) -> SourceRows:
        return _file_rows(self.describe(), self.path, _stable_bytes(self.path))


@contextlib.contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise PromptSourceUnavailable(f"prompt table {path} does not exist") from None
    except OSError as exc:
        raise PromptSourceUnavailable(f"prompt table {path} cannot be read: {exc}") from None


def _read_bytes(path: Path) -> bytes:
    with _file_errors(path):
        if path.exists() and not path.is_file():
            raise PromptTableError(f"prompt table {path} is not a file")
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise PromptTableError(f"prompt table {path} is larger than {MAX_TABLE_BYTES} bytes")
        return path.read_bytes()


def _stable_bytes(path: Path) -> bytes:
    """The file's bytes. A CSV file that does not end in a newline may be caught mid-write: it
    is read once it has not been modified for ``_SETTLE_S`` and reads the same twice (one that
    keeps changing is unavailable for now: the sensor tries again on its next tick)."""
    data = _read_bytes(path)
    deadline = time.monotonic() + _SETTLE_MAX_S
    while data and not _is_parquet(path.name) and not data.endswith((b"\n", b"\r")):
        with _file_errors(path):
            age = time.time() - path.stat().st_mtime
        if age >= _SETTLE_S:
            again = _read_bytes(path)
            if again == data:
                break
            data = again
            continue
        if time.monotonic() + _SETTLE_S - age > deadline:
            raise PromptSourceUnavailable(
                f"prompt table {path} is still being written (it does not end in a newline and "
                f"changed within {_SETTLE_S:.0f} s, for {_SETTLE_MAX_S:.0f} s); it is read once "
                "it stops changing"
            )
        time.sleep(_SETTLE_S - age)
        data = _read_bytes(path)
    return data


# --- a file at a URL -------------------------------------------------------------------------


class UrlPromptSource(PromptSource):
    """A CSV or Parquet file at an fsspec URL (``s3://bucket/prompts.parquet``, ``gs://...``),
    opened as ``KVID_STORAGE_URL`` is (S3: the ``AWS_*`` environment, ``AWS_ENDPOINT_URL``;
    ``storage_options`` for anything else). Relative image paths resolve against its folder
    there. An object store writes an object whole, so there is no mid-write rule."""

    def __init__(
        self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ) -> None:
        path = storage_path(url, **dict(storage_options or {}))
        if not isinstance(path, UPath) or not is_remote(path):
            raise ValueError(f"{url} is a local path: read it with FilePromptSource")
        self.path = path
        self._fs = filesystem(path)

    def describe(self) -> str:
        return _shown_url(str(self.path))

    @property
    def uri(self) -> str:
        return _shown_url(str(self.path))

    def change_token(self) -> str | None:
        """The object's version, ETag, size and modification time, as its store reports them
        in one metadata request (S3: a HEAD); None when the store reports only a size."""
        with self._errors():
            self._fs.invalidate_cache(self.path.path)  # a cached listing would hide a change
            info = self._fs.info(self.path.path)
        known = {k: str(info[k]) for k in _VERSION_FIELDS if info.get(k) not in (None, "")}
        return json.dumps(known, sort_keys=True) if set(known) - {"size"} else None

    def read(self) -> SourceRows:
        with self._errors():
            data = self._fs.cat_file(self.path.path, start=0, end=MAX_TABLE_BYTES + 1)
        if len(data) > MAX_TABLE_BYTES:
            raise PromptTableError(
                f"prompt table {self.describe()} is larger than {MAX_TABLE_BYTES} bytes"
            )
        return _file_rows(self.describe(), self.path, data)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        where = self.describe()
        try:
            yield
        except FileNotFoundError as exc:
            raise PromptSourceUnavailable(f"prompt table {where} does not exist ({exc})") from None
        except PermissionError as exc:
            raise PromptSourceUnavailable(
                f"prompt table {where}: access denied ({exc}); check the credentials"
            ) from None
        except (ImportError, PromptTableError):
            raise
        except Exception as exc:  # any filesystem's errors (botocore's, aiohttp's, ...)
            raise PromptSourceUnavailable(
                f"prompt table {where} cannot be reached: {type(exc).__name__}: {exc}"
            ) from None


def _shown_url(text: str) -> str:
    """``text`` without a password in its authority (``https://user:***@host/...``)."""
    parts = urlsplit(text)
    if not parts.password:
        return text
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# --- a database table or query ---------------------------------------------------------------


class SqlPromptSource(PromptSource):
    """A table or a SELECT in any database SQLAlchemy reaches (``postgresql://`` is psycopg 3,
    as for the ledger). Every column is read, each cell as the driver gives it (kvid types the
    cells by its own rules: an INTEGER seed 7 and a CSV ``7`` are the same request).

    Row order, which names rows in messages and keeps repeated rows' first one: a table is read
    ``ORDER BY`` its primary key, or by all its columns when it has none; a query keeps its own
    ``ORDER BY``. Read in a read-only transaction where the backend has one (PostgreSQL; SQLite
    is opened read-only), always rolled back. Relative image paths resolve against
    ``image_base`` (a folder or a URL), else the working directory.

    Change token: PostgreSQL sums a 64-bit hash of every row server side (no row is sent);
    a SQLite file is its size and modification time (and its WAL's); other backends cannot
    tell (None).
    """

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        query: str | None = None,
        image_base: str | os.PathLike[str] | None = None,
    ) -> None:
        if (table is None) == (query is None) or not (table or query or "").strip():
            raise ValueError("SqlPromptSource: give exactly one of table= and query=")
        self.table = (table or "").strip() or None
        self.query = (query or "").strip().rstrip(";").strip() or None
        self.image_base = image_base
        self._shown = redact_url(url)
        parsed = make_url(normalize_database_url(url))
        self._password = parsed.password
        self._sqlite_file = _sqlite_file(parsed)
        connect_args: dict[str, Any] = {}
        if self._sqlite_file is not None:  # read-only: a reader must never create or write it
            parsed = parsed.set(
                database=f"file:{self._sqlite_file}",
                query={**parsed.query, "mode": "ro", "uri": "true"},
            )
        elif parsed.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = _CONNECT_TIMEOUT_S
        # no pool: a sensor's connection is not held between ticks, nor across a fork
        self._engine = sa.create_engine(parsed, poolclass=sa.NullPool, connect_args=connect_args)

    def describe(self) -> str:
        if self.table is not None:
            return f"{self._shown}: table {self.table}"
        query = " ".join((self.query or "").split())
        cut = query if len(query) <= _SHOWN_QUERY_CHARS else query[: _SHOWN_QUERY_CHARS - 1] + "…"
        return f"{self._shown}: query {cut}"

    def change_token(self) -> str | None:
        if self._sqlite_file is not None:
            return _sqlite_token(self._sqlite_file, self.describe())
        if self._engine.dialect.name != "postgresql":
            return None
        # a 64-bit hash of each row's text, summed: order-free, and ~5x cheaper than md5 over
        # sorted rows (docs/BENCHMARKS.md); the count tells an emptied table from a changed one
        inner = self.query if self.query is not None else f"SELECT * FROM {self._quoted_table()}"
        row = "kvid_source_row"  # an alias no column is likely to be named (it would win)
        sql = f"SELECT count(*), sum(hashtextextended({row}::text, 0)) FROM ({inner}) AS {row}"
        with self._connection() as connection:
            try:
                count, total = connection.exec_driver_sql(self._escaped(sql)).one()
            except sa.exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise self._unavailable(exc) from None
                return None  # a missing table, a broken query: read() says which
        return f"{count}:{total}"

    def read(self) -> SourceRows:
        where = self.describe()
        with self._connection() as connection, self._statement_errors():
            if self.table is not None:
                result = connection.execute(self._table_select(connection))
            else:
                result = connection.exec_driver_sql(self._escaped(self.query or ""))
            columns = [str(name) for name in result.keys()]  # noqa: SIM118 - a Result
            _check_columns(where, columns)
            records = [dict(zip(columns, row, strict=True)) for row in result]
        return SourceRows(
            columns, records, {}, rows_fingerprint(columns, records), ImageBase(self.image_base)
        )

    def _split_table(self) -> tuple[str | None, str]:
        schema, _, name = (self.table or "").rpartition(".")
        return schema or None, name

    def _quoted_table(self) -> str:
        schema, name = self._split_table()
        preparer = self._engine.dialect.identifier_preparer
        return preparer.format_table(sa.table(name, schema=schema))

    def _table_select(self, connection: sa.Connection) -> sa.Select[Any]:
        schema, name = self._split_table()
        inspector = sa.inspect(connection)
        if not inspector.has_table(name, schema=schema):
            raise PromptSourceUnavailable(
                f"prompt table {self.describe()}: the database has no table {self.table!r}"
            )
        columns = [c["name"] for c in inspector.get_columns(name, schema=schema)]
        order = inspector.get_pk_constraint(name, schema=schema)["constrained_columns"] or columns
        table = sa.table(name, *(sa.column(c) for c in columns), schema=schema)
        return sa.select(table).order_by(*(table.c[c] for c in order))

    def _escaped(self, sql: str) -> str:
        """``sql`` for the driver as written: a driver whose placeholders are ``%s`` reads
        a ``%`` (``LIKE '%dawn%'``) as one unless it is doubled."""
        return (
            sql.replace("%", "%%")
            if self._engine.dialect.paramstyle in ("format", "pyformat")
            else sql
        )

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        """A connection in a transaction that is always rolled back (read-only where the
        backend has it); one that cannot be had is :class:`PromptSourceUnavailable`."""
        if self._sqlite_file is not None and not self._sqlite_file.is_file():
            raise PromptSourceUnavailable(
                f"prompt table {self.describe()}: the database file does not exist"
            )
        try:
            connection = self._engine.connect()
        except sa.exc.DBAPIError as exc:
            raise self._unavailable(exc) from None
        with connection:
            if self._engine.dialect.name == "postgresql":
                connection.execution_options(postgresql_readonly=True)
            transaction = connection.begin()
            try:
                yield connection
            finally:
                transaction.rollback()

    @contextlib.contextmanager
    def _statement_errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc) from None
            hint = ""
            if self.table is not None and "order" in self._reason(exc).lower():
                hint = (
                    " (a table without a primary key is read in the order of all its columns: "
                    "give it a primary key, or read it with a query and its own ORDER BY)"
                )
            raise PromptTableError(
                f"prompt table {self.describe()} cannot be read: {self._reason(exc)}{hint}"
            ) from None

    def _unavailable(self, exc: sa.exc.DBAPIError) -> PromptSourceUnavailable:
        return PromptSourceUnavailable(
            f"prompt table {self.describe()} cannot be reached: {self._reason(exc)}"
        )

    def _reason(self, exc: sa.exc.DBAPIError) -> str:
        """The driver's own first line (SQLAlchemy's adds the statement and a link), with the
        password taken out should a driver ever quote it."""
        lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        reason = lines[0].strip()
        return reason.replace(self._password, "***") if self._password else reason


def _sqlite_file(url: sa.URL) -> Path | None:
    """The SQLite database file of ``url`` (None: not SQLite, in memory, or a ``file:`` URI
    the user manages)."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or "uri" in url.query:
        return None
    return Path(database).resolve()


def _sqlite_token(path: Path, where: str) -> str:
    """What every commit changes, without reading a row: the database header's change counter
    (a commit in rollback-journal mode, a checkpoint in WAL mode), and the WAL's header (new
    salts when it restarts) and size (frames appended by each commit), with each file's
    identity and mtime. Reads 32 bytes of each file."""
    wal = path.with_name(path.name + "-wal")
    parts = []
    for file, header in ((path, slice(24, 28)), (wal, slice(0, 32))):
        try:
            with open(file, "rb") as handle:
                head, stat = handle.read(32), os.fstat(handle.fileno())
        except OSError as exc:
            if file != path:
                continue  # no WAL: nothing was committed to one
            missing = isinstance(exc, FileNotFoundError)
            reason = "does not exist" if missing else f"cannot be read: {exc}"
            raise PromptSourceUnavailable(
                f"prompt table {where}: the database file {reason}"
            ) from None
        if stat.st_size:  # a reader makes an empty WAL: nothing was committed to it
            parts.append(f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{head[header].hex()}")
    return ";".join(parts)


# --- a DataFrame -----------------------------------------------------------------------------


class FramePromptSource(PromptSource):
    """The rows of a pandas DataFrame (an upstream asset's value), read as a Parquet file's
    are. Its change token is its fingerprint: the rows are in memory already."""

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        image_base: str | os.PathLike[str] | None = None,
        name: str = "a DataFrame",
    ) -> None:
        self.frame = frame
        self.image_base = image_base
        self.name = name

    def describe(self) -> str:
        return self.name

    def change_token(self) -> str:
        return self.read().fingerprint

    def read(self) -> SourceRows:
        columns, records, problems = _frame_rows(self.name, self.frame)
        fingerprint = rows_fingerprint(columns, records)
        return SourceRows(columns, records, problems, fingerprint, ImageBase(self.image_base))


# --- choosing a source -----------------------------------------------------------------------


def prompt_source(value: PromptSource | pd.DataFrame | str | os.PathLike[str]) -> PromptSource:
    """``value`` as a source: a source as it is, a DataFrame, a local path (or ``file://``
    URL), or any other fsspec URL. A database needs a table or a query, so it is always an
    explicit :class:`SqlPromptSource`."""
    if isinstance(value, PromptSource):
        return value
    if isinstance(value, pd.DataFrame):
        return FramePromptSource(value)
    try:
        location = storage_path(value)
    except ValueError as exc:  # an unknown protocol: sqlite://, postgresql://, a typo
        raise PromptTableError(
            f"prompt table {_shown_url(os.fspath(value))} is neither a local path nor a URL "
            f"fsspec can open ({exc}); a database table is "
            "SqlPromptSource(database_url, table=... or query=...)"
        ) from None
    if isinstance(location, UPath):
        return UrlPromptSource(location)
    return FilePromptSource(location)


# --- bytes and frames into rows --------------------------------------------------------------

# (column names, one mapping per data row, {row number: (field, reason)} for rows already bad)
_Read = tuple[list[str], list[dict[str, Any]], dict[int, tuple[str, str]]]


def _is_parquet(name: str) -> bool:
    return name.lower().endswith((".parquet", ".pq"))


def _file_rows(where: str, path: StoragePath, data: bytes) -> SourceRows:
    """A whole file's bytes as rows (Parquet by its suffix, else CSV), fingerprinted by those
    bytes, its images beside it; anything that makes the *file* unusable is a PromptTableError
    naming ``where``."""
    read = _read_parquet if _is_parquet(path.name) else _read_csv
    columns, records, problems = read(where, data)
    fingerprint = hashlib.sha256(data).hexdigest()
    return SourceRows(columns, records, problems, fingerprint, ImageBase(path.parent))


def _read_parquet(where: str, data: bytes) -> _Read:
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises a zoo of types for a damaged or foreign file
        raise PromptTableError(
            f"prompt table {where} is not a readable Parquet file: {type(exc).__name__}: {exc}"
        ) from exc
    return _frame_rows(where, frame)


def _frame_rows(where: str, frame: pd.DataFrame) -> _Read:
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()  # a table saved with prompt_id as its index keeps its keys
    columns = [str(c).strip() for c in frame.columns]
    _check_columns(where, columns)
    frame = frame.set_axis(columns, axis=1)  # never renames the caller's own frame
    return columns, frame.to_dict(orient="records"), {}


def _read_csv(where: str, data: bytes) -> _Read:
    """Every cell as text (types are decided per field; an empty cell means the default).

    The csv module rather than pandas: a row with too many cells must be *that row's* error,
    not a silent shift of the first column into an index, and repeated column names must not
    be renamed ``prompt.1`` behind the user's back.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptTableError(
            f"prompt table {where} is not a readable UTF-8 CSV file: {exc}"
        ) from exc
    if csv.field_size_limit() < MAX_TABLE_BYTES:
        csv.field_size_limit(MAX_TABLE_BYTES)  # a huge cell is that row's error, not the file's
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[dict[str, Any]] = []
    problems: dict[int, tuple[str, str]] = {}
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or one of only delimiters: nothing to send
            if header is None:
                header = [cell.strip() for cell in cells]
                _check_columns(where, header)
                continue
            number = len(records) + 1
            if len(cells) < len(header) or any(cell.strip() for cell in cells[len(header) :]):
                hint = "an extra delimiter" if len(cells) > len(header) else "a missing delimiter"
                problems[number] = (
                    "row",
                    f"has {len(cells)} cells but the header names {len(header)} columns "
                    f"(a missing quote or {hint}?)",
                )
            records.append(
                {name: _lines(cell) for name, cell in zip(header, cells, strict=False) if name}
            )
    except csv.Error as exc:
        raise PromptTableError(
            f"prompt table {where} is not a readable CSV file (line {reader.line_num}): {exc}"
        ) from exc
    if header is None:
        return ["prompt"], [], {}  # an empty file is an empty table
    return header, records, problems


def _lines(cell: str) -> str:
    """A quoted cell's line breaks as the prompt's newlines, whatever the file's line ends
    (Excel on Windows writes CRLF inside quoted cells too)."""
    return cell.replace("\r\n", "\n").replace("\r", "\n") if "\r" in cell else cell


def _check_columns(where: str, columns: Sequence[str]) -> None:
    if "prompt" not in columns:
        shown = ", ".join(c for c in columns if c)[:500] or "none"
        raise PromptTableError(f"prompt table {where} has no 'prompt' column (columns: {shown})")
    duplicates = sorted(c for c, n in Counter(columns).items() if n > 1 and c)
    if duplicates:
        raise PromptTableError(f"prompt table {where} repeats columns: {', '.join(duplicates)}")


def rows_fingerprint(columns: Sequence[str], records: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of rows as kvid reads them: the columns, then each row's cells as the exact text
    they are typed from (a cell no text represents: by its type and repr). The same rows give
    the same fingerprint whatever types hold them (7, 7.0 and "7" alike)."""
    digest = hashlib.sha256(json.dumps(list(columns)).encode())
    for record in records:
        cells = [_canonical(record.get(column)) for column in columns]
        digest.update(b"\n" + json.dumps(cells).encode())
    return digest.hexdigest()


def _canonical(value: Any) -> str | None:
    try:
        return cell_text(value)
    except CellError:
        return f"{type(value).__name__}:{value!r}"
