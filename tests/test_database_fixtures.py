"""The database fixtures: each backend really stores and returns rows, and every
``postgres_url`` is a database of its own, created empty."""

from __future__ import annotations

import sqlalchemy as sa
from conftest import fresh_postgres_database

metadata = sa.MetaData()
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
)


def test_database_url_round_trips_a_row(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as connection:
            metadata.create_all(connection)
            connection.execute(sa.insert(jobs), [{"id": 1, "status": "queued"}])
        with engine.connect() as connection:  # a new connection: the row was committed
            assert connection.execute(sa.select(jobs.c.id, jobs.c.status)).all() == [(1, "queued")]
    finally:
        engine.dispose()


def test_postgres_urls_are_distinct_empty_databases(postgres_url: str) -> None:
    with fresh_postgres_database() as other_url:  # what another test's postgres_url gets
        assert sa.make_url(postgres_url).database != sa.make_url(other_url).database
        engine, other = sa.create_engine(postgres_url), sa.create_engine(other_url)
        try:
            with engine.begin() as connection:
                assert sa.inspect(connection).get_table_names() == []
                metadata.create_all(connection)
            with other.connect() as connection:  # the table went to the first database only
                assert sa.inspect(connection).get_table_names() == []
        finally:
            engine.dispose()
            other.dispose()
