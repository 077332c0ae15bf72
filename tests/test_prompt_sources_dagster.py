"""Prompt sources through Dagster: a table on S3 or in PostgreSQL, or an upstream asset's value,
is what ``kvid_prompts``, the submitting runs and the prompts sensor read.

- moving a table from a local CSV to Parquet on S3 to a PostgreSQL table pays nothing again;
- an upstream asset's DataFrame is the table: ``kvid_prompts`` depends on it and loads it
  through its own IO manager, and the prompts sensor reacts to its new materializations;
- a source that cannot be read (never materialized, S3 down, the database down) makes the
  sensor skip saying why, with nothing marked missing and nothing paid again;
- a table that loses rows never forgets, cancels or re-pays their jobs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from conftest import TEST_API_KEY
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    SensorResult,
    SkipReason,
    asset,
    build_sensor_context,
    materialize,
)
from faultkit import dagster_home, open_instance, run_prompts, run_submit

from kvid_dagster.core.project import KvidProject, PromptsSetting
from kvid_dagster.core.sources import SqlPromptSource
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.resources import KvidResource
from kvid_dagster.sensor_builder import PromptsCursor

ROWS = [
    {"prompt_id": "fox", "prompt": "A red fox in snow", "seed": 7, "campaign": "winter"},
    {"prompt_id": "owl", "prompt": "An owl at dusk", "seed": 8, "campaign": "winter"},
    {"prompt_id": "elk", "prompt": "An elk by a lake", "seed": 9, "campaign": "autumn"},
]
UPSTREAM = AssetKey("daily_prompts")


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        yield instance


def kvid_defs(emulator: KvidEmulator, prompts: PromptsSetting, data_dir: Path) -> Definitions:
    resource = KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url)
    return build_kvid_definitions(KvidProject(prompts, data_dir), resource=resource)


def prompts_tick(defs: Definitions, instance: DagsterInstance, cursor: str | None) -> Any:
    sensor = defs.resolve_sensor_def("kvid_prompts_sensor")
    with build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, sensor_name=sensor.name
    ) as context:
        return sensor(context)


def submit_everything(defs: Definitions, instance: DagsterInstance) -> None:
    assert run_prompts(defs, instance)
    keys = instance.get_dynamic_partitions("kvid_prompts")
    assert run_submit(defs, instance, keys[0], keys[-1])


def test_moving_the_table_from_a_csv_to_s3_to_postgresql_pays_nothing_again(
    emulator: KvidEmulator,
    instance: DagsterInstance,
    tmp_path: Path,
    s3: Any,
    bucket: str,
    postgres_url: str,
) -> None:
    frame = pd.DataFrame(ROWS)
    csv = tmp_path / "prompts.csv"
    frame.to_csv(csv, index=False)
    data_dir = tmp_path / "data"
    submit_everything(kvid_defs(emulator, csv, data_dir), instance)
    assert emulator.jobs_created == len(ROWS)
    first = {r.partition_key: r.request_hash for r in KvidProject(csv, data_dir).ledger().rows()}

    s3.put_object(Bucket=bucket, Key="team/prompts.parquet", Body=frame.to_parquet(index=False))
    on_s3 = f"s3://{bucket}/team/prompts.parquet"
    submit_everything(kvid_defs(emulator, on_s3, data_dir), instance)
    frame.to_sql("prompts", sa.create_engine(postgres_url), index=False)
    in_postgres = SqlPromptSource(postgres_url, table="prompts")
    submit_everything(kvid_defs(emulator, in_postgres, data_dir), instance)

    assert emulator.jobs_created == len(ROWS)  # the same requests: nothing paid again
    assert sorted(instance.get_dynamic_partitions("kvid_prompts")) == sorted(first)
    rows = KvidProject(in_postgres, data_dir).ledger().rows()
    assert {r.partition_key: r.request_hash for r in rows} == first
    assert {r.partition_key: r.user_columns["campaign"] for r in rows} == {
        r["prompt_id"]: r["campaign"] for r in ROWS
    }


def upstream_defs(emulator: KvidEmulator, data_dir: Path, rows: list[dict[str, Any]]) -> Any:
    """An upstream asset writing ``rows`` (its IO manager: Dagster's default, the instance's
    storage), and the kvid definitions reading it."""

    @asset(key=UPSTREAM)
    def daily_prompts() -> pd.DataFrame:
        return pd.DataFrame(rows)

    kvid = kvid_defs(emulator, UPSTREAM, data_dir)
    return Definitions.merge(kvid, Definitions(assets=[daily_prompts])), daily_prompts


def test_an_upstream_assets_dataframe_is_the_table_and_its_new_materializations_are_seen(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    defs, daily_prompts = upstream_defs(emulator, data_dir, ROWS[:2])
    graph = defs.resolve_asset_graph()
    assert UPSTREAM in graph.get(AssetKey("kvid_prompts")).parent_keys

    never = prompts_tick(defs, instance, None)
    assert isinstance(never, SkipReason), never
    assert "daily_prompts has never been materialized" in str(never.skip_message)

    assert materialize([daily_prompts], instance=instance).success
    first = prompts_tick(defs, instance, None)
    assert isinstance(first, SensorResult)
    [added] = first.dynamic_partitions_requests
    assert list(added.partition_keys or []) == ["fox", "owl"]
    assert [r.tags.get("dagster/asset_partition_range_start") for r in first.run_requests][1:] == [
        "fox"
    ]
    instance.add_dynamic_partitions("kvid_prompts", ["fox", "owl"])
    submit_everything(defs, instance)  # kvid_prompts and the submitting run load it themselves
    assert emulator.jobs_created == 2

    unchanged = prompts_tick(defs, instance, first.cursor)
    assert isinstance(unchanged, SkipReason)  # the same materialization: nothing read
    assert materialize([daily_prompts], instance=instance).success  # the same rows again
    again = prompts_tick(defs, instance, first.cursor)
    assert isinstance(again, SensorResult) and not again.run_requests
    assert (
        PromptsCursor.parse(again.cursor).fingerprint
        == PromptsCursor.parse(first.cursor).fingerprint
    )

    defs, daily_prompts = upstream_defs(emulator, data_dir, ROWS)  # tomorrow's rows: one more
    assert materialize([daily_prompts], instance=instance).success
    grown = prompts_tick(defs, instance, again.cursor)
    assert isinstance(grown, SensorResult)
    assert [list(r.partition_keys or []) for r in grown.dynamic_partitions_requests] == [["elk"]]
    instance.add_dynamic_partitions("kvid_prompts", ["elk"])
    submit_everything(defs, instance)
    assert emulator.jobs_created == 3  # only the new row was paid


def test_sources_that_cannot_be_read_skip_the_sensor_and_pay_nothing(
    emulator: KvidEmulator,
    instance: DagsterInstance,
    tmp_path: Path,
    s3: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = tmp_path / "data"
    s3.put_object(Bucket=bucket, Key="p.parquet", Body=pd.DataFrame(ROWS).to_parquet(index=False))
    defs = kvid_defs(emulator, f"s3://{bucket}/p.parquet", data_dir)
    seen = prompts_tick(defs, instance, None)
    assert isinstance(seen, SensorResult) and seen.run_requests
    with socket.socket() as probe:  # a port nothing listens on: S3 is down
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    down = prompts_tick(kvid_defs(emulator, f"s3://{bucket}/p.parquet", data_dir), instance, None)
    assert isinstance(down, SkipReason), down
    assert "the next tick tries again" in str(down.skip_message)
    assert bucket in str(down.skip_message)

    unreachable = SqlPromptSource(
        f"postgresql://kvid:secret-pw@127.0.0.1:{dead.rsplit(':', 1)[1]}/db", table="prompts"
    )
    skipped = prompts_tick(kvid_defs(emulator, unreachable, data_dir), instance, None)
    assert isinstance(skipped, SkipReason)
    assert "secret-pw" not in str(skipped.skip_message)
    assert emulator.jobs_created == 0


def test_a_table_that_loses_rows_keeps_their_partitions_and_jobs(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    csv = tmp_path / "prompts.csv"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    data_dir = tmp_path / "data"
    defs = kvid_defs(emulator, csv, data_dir)
    submit_everything(defs, instance)
    pd.DataFrame(ROWS[:1]).to_csv(csv, index=False)  # two rows gone
    assert run_prompts(defs, instance)
    tick = prompts_tick(defs, instance, None)
    assert isinstance(tick, SensorResult)
    assert not tick.dynamic_partitions_requests and len(tick.run_requests) == 1  # kvid_prompts
    assert sorted(instance.get_dynamic_partitions("kvid_prompts")) == ["elk", "fox", "owl"]
    ledger = KvidProject(csv, data_dir).ledger()
    kept = {s.partition_key: s for s in ledger.submissions()}
    assert set(kept) == {"fox", "owl", "elk"}
    assert all(s.request_id and s.status is not VideoStatus.CANCELED for s in kept.values())
    assert emulator.jobs_created == 3
