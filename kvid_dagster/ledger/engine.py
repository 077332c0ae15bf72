"""Opening the ledger's database: URLs, the engine (SQLite pragmas or PostgreSQL), clocks, locks.

Kept apart from :class:`~kvid_dagster.ledger.store.Ledger` so that what a database needs to be
safe for many writer processes is read in one place.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

_SQLITE_BUSY_TIMEOUT_SECONDS = 60.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalize_database_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the ``[postgres]`` extra)."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def create_ledger_engine(url: str) -> Engine:
    """An engine tuned for many writer processes: SQLite in WAL mode with a busy timeout and
    write transactions that take the write lock up front (``BEGIN IMMEDIATE``: a deferred one
    that upgrades later fails at once with "database is locked", whatever the timeout)."""
    url = normalize_database_url(url)
    if not make_url(url).drivername.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed request_id survives power loss
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("kvid_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def advisory_lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for ``name``."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)
