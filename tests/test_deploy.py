"""Beyond one machine: Dagster on PostgreSQL with ``deploy/dagster.yaml``, the status sensor
evaluated by ``dagster-daemon`` on host A, the submitting runs executed on host B, videos and
catalogs in S3 (moto's server), the ledger in the same PostgreSQL database as Dagster.

The hosts are separate process trees on this machine, each with its own environment, Dagster
home, working directory, temp dir, data dir and copy of the prompt table. They share nothing but
PostgreSQL, the S3 API and the code: this repository and its virtualenv, read-only, as the image
both containers would run. Runs cross from A to B through the run storage (``hostkit``), as a
cluster's run launcher hands a run to a container of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from conftest import REPO_ROOT, TEST_API_KEY, fresh_postgres_database
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from faultkit import write_table

from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus

pytestmark = pytest.mark.timeout(900)

ROWS = 200
TESTS_DIR = Path(__file__).resolve().parent
DEPLOY_DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"


def dagster_pg_environment(url: str) -> dict[str, str]:
    """What ``deploy/dagster.yaml`` reads: the instance's PostgreSQL, field by field."""
    parts = sa.make_url(url)
    return {
        "DAGSTER_PG_HOST": parts.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_USERNAME": parts.username or "postgres",
        "DAGSTER_PG_PASSWORD": parts.password or "",
        "DAGSTER_PG_DB": parts.database or "postgres",
    }


def make_host(root: Path, shared: dict[str, str]) -> dict[str, str]:
    """A host's folders and environment: only ``shared`` (the database, S3 and the prompt
    table in it, the service) comes from outside; nothing of the test process's own Dagster,
    kvid or AWS settings leaks in, and no host holds a copy of the table."""
    for folder in ("home", "work", "tmp", "data"):
        (root / folder).mkdir(parents=True)
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("KVID_", "DAGSTER_", "AWS_"))
    }
    return (
        inherited
        | shared
        | {
            "DAGSTER_HOME": str(root / "home"),
            "TMPDIR": str(root / "tmp"),
            "KVID_DATA_DIR": str(root / "data"),
            "PYTHONPATH": str(TESTS_DIR),  # hostkit, as an image would install its launcher
            # the image's PATH: its `dagster` is what a run worker is started with
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "AWS_CONFIG_FILE": str(root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        }
    )


def write_instance_yaml(home: Path, extra: dict[str, Any] | None = None) -> None:
    config = yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text(encoding="utf-8"))
    (home / "dagster.yaml").write_text(yaml.safe_dump(config | (extra or {})), encoding="utf-8")


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # a process tree of its own, stopped as a whole
        )  # fmt: skip


def stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


def test_a_backfill_across_two_hosts_sharing_only_postgres_and_s3(
    tmp_path: Path,
    database: str,
    s3_endpoint: str,
    emulator_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # one shared render: what is tested is the orchestration across hosts, not the encoder
    emulator: KvidEmulator = emulator_factory(job_duration=0.5, reuse_renders=True)
    bucket = f"kvid-{secrets.token_hex(4)}"
    aws = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    keys = [f"clip{n:03d}" for n in range(ROWS)]
    # the one prompt table, in the bucket: what a marketing team's export would be
    table = write_table(tmp_path / "table.csv", keys)
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    s3.put_object(Bucket=bucket, Key="tables/prompts.parquet", Body=frame.to_parquet(index=False))
    shared = (
        dagster_pg_environment(database)
        | aws
        | {
            "KVID_DATABASE_URL": database,  # the ledger beside Dagster's tables, in one database
            "KVID_STORAGE_URL": f"s3://{bucket}/kvid",
            "KVID_PROMPTS": f"s3://{bucket}/tables/prompts.parquet",
            "KVID_BASE_URL": emulator.base_url,
            "KVID_API_KEY": TEST_API_KEY,
        }
    )
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    env_a = make_host(host_a, shared)
    env_b = make_host(host_b, shared)
    write_instance_yaml(
        host_a / "home", {"run_launcher": {"module": "hostkit", "class": "HandOffRunLauncher"}}
    )
    write_instance_yaml(host_b / "home")  # the worker never launches a run

    # the deploy step before anything starts: Dagster's schema made once (two processes
    # creating it at once on an empty database collide in CREATE TABLE)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "dagster"), "instance", "migrate"],
        env=env_a, cwd=host_a / "work", check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    daemon = start(
        [str(bin_dir / "dagster-daemon"), "run",
         "-w", str(REPO_ROOT / "workspace.yaml")],
        env_a, host_a / "work", host_a / "daemon.log",
    )  # fmt: skip
    agent = start(
        [sys.executable, str(TESTS_DIR / "hostkit.py"), str(host_b / "work")],
        env_b, host_b / "work", host_b / "agent.log",
    )  # fmt: skip
    for name, value in dagster_pg_environment(database).items():
        monkeypatch.setenv(name, value)  # the test reads the instance as a third process would
    ledger = Ledger(database)
    instance = DagsterInstance.from_config(str(host_a / "home"))
    try:
        # the prompts sensor (A) adds 200 partitions and requests their single-run backfill;
        # B's worker submits it; the status sensor (A) fetches every video into S3 and records
        # its materialization (the daemon stores a tick's events after the tick: wait for them)
        deadline = time.monotonic() + 600
        counts: dict[VideoStatus, int] = {}
        materialized: set[str] = set()
        while time.monotonic() < deadline:
            counts = ledger.counts_by_status()
            materialized = set(instance.get_materialized_partitions(AssetKey("kvid_videos")))
            if counts.get(VideoStatus.COMPLETED, 0) == ROWS and len(materialized) == ROWS:
                break
            for name, child in (("daemon", daemon), ("agent", agent)):
                assert child.poll() is None, f"the {name} died: {logs(host_a, host_b)}"
            assert not errors_logged(host_a, host_b), logs(host_a, host_b)  # fail fast
            time.sleep(1)
        assert counts.get(VideoStatus.COMPLETED, 0) == ROWS, (counts, logs(host_a, host_b))
        # each video's materialization recorded by A's status sensor in the PostgreSQL event log
        assert materialized == set(keys)
        catalog = wait_for_catalog(bucket, aws, deadline)
        runs = instance.get_runs()
    finally:
        stop(agent)
        stop(daemon)
        instance.dispose()
        ledger.close()

    assert emulator.jobs_created == ROWS  # every paid request exactly once
    videos = [k for k in bucket_keys(s3, bucket, "kvid/videos/") if k.endswith(".mp4")]
    assert len(videos) == ROWS
    # the catalog, read from S3 by a third process
    assert catalog["rows"] == ROWS and catalog["statuses"] == {"COMPLETED": ROWS}
    assert catalog["stored"] == sorted(f"s3://{bucket}/{key}" for key in videos)
    # every run ran on B and succeeded, the backfill of kvid_video_jobs among them; A only
    # evaluated the sensors
    assert any(AssetKey("kvid_video_jobs") in (r.asset_selection or ()) for r in runs), runs
    assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS] * len(runs)
    assert {p.name for p in (host_b / "work").glob("run-*.log")} == {
        f"run-{r.run_id}.log" for r in runs
    }
    assert not list((host_a / "work").glob("run-*.log"))
    # nothing landed on either host's disks: the table and videos in S3, the ledger in
    # PostgreSQL
    for host in (host_a, host_b):
        for folder in ("home", "work", "data"):  # tmp holds publications' staging meanwhile
            tables = [*(host / folder).rglob("*.csv"), *(host / folder).rglob("*.parquet")]
            assert tables == [], tables
        assert not list((host / "data").rglob("*.mp4"))
        assert not (host / "data" / "kvid.db").exists()
        assert not (host / "data" / "catalog").exists()


def wait_for_catalog(bucket: str, aws: dict[str, str], deadline: float) -> dict[str, Any]:
    """The published videos catalog as a separate process reads it with pandas from S3, once
    it lists every row COMPLETED (it is republished at the end of each status tick)."""
    script = (
        "import json, sys, pandas as pd\n"
        f"frame = pd.read_parquet('s3://{bucket}/kvid/catalog/videos')\n"
        "print(json.dumps({'rows': len(frame),"
        " 'statuses': frame['status'].astype(str).value_counts().to_dict(),"
        " 'stored': sorted(frame['local_path'].dropna())}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | aws
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode == 0:
            seen = json.loads(done.stdout)
            if seen["statuses"] == {"COMPLETED": ROWS}:
                return seen
        time.sleep(1)
    raise AssertionError(f"the catalog in S3 never listed every video: {seen}")


def bucket_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def host_logs(*hosts: Path) -> list[Path]:
    """Every log of the hosts (the daemon's, the agent's, a run worker's), their TMPDIRs left
    out: the status sensor's staging dirs come and go there while the walk runs."""
    found = []
    for host in hosts:
        for root, dirs, files in os.walk(host):
            dirs[:] = [d for d in dirs if Path(root, d) != host / "tmp"]
            found += [Path(root, name) for name in files if name.endswith(".log")]
    return sorted(found)


def errors_logged(*hosts: Path) -> bool:
    """An ERROR line in any log of the hosts: a clean backfill logs none."""
    return any("ERROR" in log.read_text(errors="replace") for log in host_logs(*hosts))


def logs(*hosts: Path) -> str:
    """The tail of every log of the hosts, for a failure's message."""
    return "\n".join(
        f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in host_logs(*hosts)
    )
