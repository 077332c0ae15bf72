"""A prompt table of 100,000 rows (quick: 5,000) read and validated from each prompt source.

    python -m bench.prompt_sources --out F.json [--quick] [--rows N] [--repeat R]

The same table (``bench.common.write_prompts``' rows: ``prompt_id``, ``prompt``, ``resolution``)
held four ways: a local CSV file; Parquet on S3 (moto's server in its own process, as the
backfill's deployment column has it); a PostgreSQL table (a fresh database on the server at
``KVID_TEST_DATABASE_URL``, dropped afterwards) and a SQLite table, each with ``prompt_id`` as
its primary key. For each, in one run, the median of ``--repeat``:

- ``load_prompt_table(source)``: read and validated, every row a typed request with its hash;
  and ``source.read()`` alone (the rows as the source holds them, and their fingerprint);
- a plain pandas read of the same data, the floor: ``pd.read_csv``, ``pd.read_parquet`` of the
  ``s3://`` URL, ``pd.read_sql_query`` of the statement the source runs;
- ``source.change_token()`` on the unchanged source (the median of ``--tokens`` calls), and a
  whole prompts-sensor tick on it (``kvid_prompts_sensor`` of the project's definitions,
  evaluated as the daemon does, after a first tick set its cursor): what a tick pays when
  nothing changed, instead of a read and a validation;
- for comparison: the sha256 of the whole CSV file (the prompts sensor's check before change
  tokens), and on PostgreSQL the md5 of the sorted rows' md5s (the digest the token could
  have been: ``sum(hashtextextended(...))`` is what it is).

Every source must give the same partition keys and request hashes (``same_requests``; a
difference is a bug, reported, not a timing). An unreachable PostgreSQL makes its column
skipped; the rest still runs.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.common import (
    DatabaseUnavailable,
    fresh_postgres_database,
    phase_args,
    redacted,
    s3_storage,
    scratch,
    write_prompts,
    write_result,
)

#: the sources measured, in the table's order
SOURCES = ("csv", "s3-parquet", "postgresql", "sqlite")
ORDERED = "SELECT * FROM prompts ORDER BY prompt_id"  # what the table source runs
MD5_OF_SORTED_ROWS = (
    "SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))) "
    "FROM (SELECT * FROM prompts) AS t"
)


def _median_s(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _requests_digest(table: Any) -> str:
    """One hash of every (partition key, request hash): equal tables, equal digests."""
    pairs = "\n".join(f"{r.partition_key} {r.request_hash}" for r in table.rows)
    return hashlib.sha256(pairs.encode()).hexdigest()


def measure(source: Any, plain_read: Callable[[], Any], repeat: int, tokens: int) -> dict[str, Any]:
    from kvid_dagster.core.prompts import load_prompt_table

    table = load_prompt_table(source)  # once untimed: imports, the first connection
    figures: dict[str, Any] = {
        "describe": source.describe(),
        "valid_rows": len(table.rows),
        "invalid_rows": len(table.invalid),
        "requests_digest": _requests_digest(table),
        "load_s": _median_s(lambda: load_prompt_table(source), repeat),
        "read_s": _median_s(source.read, repeat),
        "pandas_s": _median_s(plain_read, repeat),
    }
    token = source.change_token()
    figures["token"] = token
    figures["token_ms"] = 1e3 * _median_s(source.change_token, tokens)
    figures["token_unchanged"] = source.change_token() == token
    figures["unchanged_tick_ms"] = 1e3 * _median_s(_unchanged_tick(source), tokens)
    return figures


def _unchanged_tick(source: Any) -> Callable[[], Any]:
    """One ``kvid_prompts_sensor`` tick on the unchanged ``source`` (a first tick, untimed,
    read the rows and set the cursor), on an ephemeral instance; it must skip."""
    import tempfile

    from dagster import DagsterInstance, SkipReason, build_sensor_context

    from kvid_dagster.core.project import KvidProject
    from kvid_dagster.definitions import build_kvid_definitions
    from kvid_dagster.resources import KvidResource

    resource = KvidResource(api_key="bench", base_url="http://127.0.0.1:9")  # never called
    project = KvidProject(source, tempfile.mkdtemp(prefix="kvid-bench-tick-"))
    defs = build_kvid_definitions(project, resource=resource)
    sensor = defs.resolve_sensor_def("kvid_prompts_sensor")
    instance = DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> Any:
        with build_sensor_context(
            instance=instance, cursor=cursor, definitions=defs, sensor_name=sensor.name
        ) as context:
            return sensor(context)

    cursor = tick(None).cursor

    def unchanged() -> None:
        result = tick(cursor)
        assert isinstance(result, SkipReason), result  # nothing read, nothing requested

    return unchanged


def table_in(url: str, frame: Any) -> None:
    """``frame`` as the table ``prompts`` (``prompt_id`` its primary key)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE prompts (prompt_id TEXT PRIMARY KEY, prompt TEXT, resolution TEXT)"
        )
    frame.to_sql("prompts", engine, if_exists="append", index=False, chunksize=10_000)
    engine.dispose()


def run(args: Any, tmp: Path) -> dict[str, Any]:
    import pandas as pd
    import sqlalchemy as sa

    from kvid_dagster.core.sources import FilePromptSource, SqlPromptSource, UrlPromptSource

    n = args.rows or (5_000 if args.quick else 100_000)
    repeat = args.repeat or (1 if args.quick else 3)
    tokens = 5 if args.quick else 20
    csv_path = tmp / "prompts.csv"
    write_prompts(csv_path, n)
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    results: dict[str, Any] = {}

    local = measure(FilePromptSource(csv_path), lambda: pd.read_csv(csv_path), repeat, tokens)
    local["file_sha256_ms"] = 1e3 * _median_s(
        lambda: hashlib.sha256(csv_path.read_bytes()).hexdigest(), tokens
    )
    local["file_mb"] = csv_path.stat().st_size / 2**20
    results["csv"] = local

    with s3_storage() as root:
        url = f"{root}/prompts.parquet"
        frame.to_parquet(url, index=False)
        results["s3-parquet"] = measure(
            UrlPromptSource(url), lambda: pd.read_parquet(url), repeat, tokens
        )

    def database(url: str) -> dict[str, Any]:
        table_in(url, frame)
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        figures = measure(
            SqlPromptSource(url, table="prompts"),
            lambda: pd.read_sql_query(sa.text(ORDERED), engine),
            repeat,
            tokens,
        )
        if engine.dialect.name == "postgresql":
            with engine.connect() as connection:
                figures["md5_sorted_ms"] = 1e3 * _median_s(
                    lambda: connection.exec_driver_sql(MD5_OF_SORTED_ROWS).one(), tokens
                )
        figures["database"] = redacted(url)
        engine.dispose()
        return figures

    try:
        with fresh_postgres_database() as url:
            results["postgresql"] = database(url)
    except DatabaseUnavailable as exc:
        results["postgresql"] = {"skipped": str(exc)}
    results["sqlite"] = database(f"sqlite:///{tmp / 'prompts.db'}")

    digests = {s["requests_digest"] for s in results.values() if "skipped" not in s}
    return {
        "rows": n,
        "repeat": repeat,
        "tokens": tokens,
        "same_requests": len(digests) == 1,
        "sources": results,
    }


def main() -> int:
    def add(parser: Any) -> None:
        parser.add_argument("--rows", type=int, default=None, help="rows (default 100000)")
        parser.add_argument("--repeat", type=int, default=None, help="timed loads (default 3)")

    args = phase_args(__doc__.splitlines()[0], add)
    with scratch(args.workdir, "kvid-bench-sources-") as tmp:
        figures = run(args, tmp)
    if not figures["same_requests"]:
        print("bench: the sources gave different requests for the same rows", file=sys.stderr)
    write_result(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
