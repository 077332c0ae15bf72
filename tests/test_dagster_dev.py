"""`dagster dev` through `kvid-dagster dev`, and the declarative-automation alternative."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import REPO_ROOT
from dagster import AssetKey, AutomationCondition, evaluate_automation_conditions, instance_for_test

from kvid_dagster.definitions import PROMPTS_JOB, build_kvid_definitions
from kvid_dagster.project import KvidProject
from kvid_dagster.resource import KvidResource


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_automation_condition_requests_new_partitions(tmp_path: Path) -> None:
    table = tmp_path / "p.csv"
    table.write_text("prompt_id,prompt,resolution\na,One,480p\nb,Two,480p\n", encoding="utf-8")
    defs = build_kvid_definitions(
        KvidProject(table, tmp_path / "data"),
        resource=KvidResource(api_key="unused", base_url="http://127.0.0.1:9"),
        jobs_automation_condition=AutomationCondition.on_missing(),
    )
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        first = evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # no partitions yet
        assert defs.resolve_job_def(PROMPTS_JOB).execute_in_process(instance=instance).success
        second = evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert second.get_requested_partitions(AssetKey("kvid_video_jobs")) == {"a", "b"}


GRAPHQL = """
{
  assetNodes { assetKey { path } isPartitioned }
  sensorsOrError(repositorySelector: {repositoryName: "__repository__",
                                       repositoryLocationName: "kvid_dagster"}) {
    ... on Sensors { results { name } }
  }
  schedulesOrError(repositorySelector: {repositoryName: "__repository__",
                                         repositoryLocationName: "kvid_dagster"}) {
    ... on Schedules { results { name cronSchedule } }
  }
}
"""


def test_kvid_dagster_dev_serves_the_definitions_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvid_dagster.cli", "dev", "--data-dir", str(tmp_path / "data"),
         "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        answer: dict | None = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.post(f"{base}/graphql", json={"query": GRAPHQL}, timeout=5)
                data = response.json().get("data") or {}
                if data.get("assetNodes"):
                    answer = data
                    break
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            time.sleep(1)
        assert answer is not None, "dagster dev did not answer"
        nodes = {tuple(n["assetKey"]["path"]): n["isPartitioned"] for n in answer["assetNodes"]}
        assert nodes == {
            ("kvid_prompts",): False,
            ("kvid_video_jobs",): True,
            ("kvid_videos",): True,
            ("kvid_catalog",): False,
        }
        sensors = {s["name"] for s in answer["sensorsOrError"]["results"]}
        assert sensors == {"kvid_status_sensor", "kvid_prompts_sensor"}
        schedules = answer["schedulesOrError"]["results"]
        assert schedules == [{"name": "kvid_daily_schedule", "cronSchedule": "0 6 * * *"}]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode is not None
    # nothing is left behind: SIGTERM reached dagster dev through kvid-dagster dev
    leftovers = subprocess.run(
        ["pgrep", "-f", f"dagster dev -w workspace.yaml -p {port}"], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == ""
    # the instance lives under the data dir, where `kvid-dagster run` writes too
    assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").is_file()
