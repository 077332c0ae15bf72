"""`dagster dev` through `kvid-dagster dev`, and the declarative-automation alternative."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from dagster import AssetKey, AutomationCondition, evaluate_automation_conditions, instance_for_test
from devkit import (
    free_port,
    graphql_until,
    group_commands,
    kill_group,
    process_commands,
    wait_group_gone,
)

from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import PROMPTS_JOB, build_kvid_definitions
from kvid_dagster.resources import KvidResource


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


def start_dev(
    tmp_path: Path, cwd: Path, *extra: str, sigint_ignored: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """``kvid-dagster dev`` in a session of its own; ``sigint_ignored``: as a shell's
    background job starts it, SIGINT inherited ignored."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}

    def signals() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-m", "kvid_dagster.cli", "dev", "--data-dir", str(tmp_path / "data"),
         "--port", str(port), *extra],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=signals,
    )  # fmt: skip
    return process, port


def dagster_dev_group(tmp_path: Path) -> int:
    """The process group of the ``dagster dev`` that kvid-dagster dev started (its own)."""
    workspace = str(tmp_path / "data" / "dagster_home" / "kvid-dev-workspace.yaml")
    found = [pid for pid, cmd in process_commands().items() if f"dev -w {workspace}" in cmd]
    assert len(found) == 1, found
    return os.getpgid(found[0])


def test_kvid_dagster_dev_serves_the_definitions_and_stops_on_sigterm(tmp_path: Path) -> None:
    process, port = start_dev(tmp_path, REPO_ROOT)
    try:
        answer = graphql_until(port, GRAPHQL, lambda d: bool(d.get("assetNodes")), process, 120)
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
        dev_group = dagster_dev_group(tmp_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        # nothing is left behind: SIGTERM reached dagster dev through kvid-dagster dev
        assert wait_group_gone(dev_group, timeout=60) == {}
    finally:
        kill_group(process)
    # the instance lives under the data dir, where `kvid-dagster run` writes too
    assert (tmp_path / "data" / "dagster_home" / "dagster.yaml").is_file()


def test_kvid_dagster_dev_runs_from_any_folder_and_a_ctrl_c_to_it_alone_stops_everything(
    tmp_path: Path,
) -> None:
    """Started like a shell's background job (SIGINT ignored), in a folder with no
    workspace.yaml: it serves its own definitions, and a SIGINT to the parent process only
    (not its group, as a terminal would send) stops dagster dev and every one of its
    processes, then the emulator."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    table = REPO_ROOT / "data" / "prompts.csv"
    process, port = start_dev(tmp_path, elsewhere, "--prompts", str(table), sigint_ignored=True)
    try:
        graphql_until(port, GRAPHQL, lambda d: bool(d.get("assetNodes")), process, 120)
        dev_group = dagster_dev_group(tmp_path)
        assert dev_group != os.getpgid(process.pid)  # a Ctrl-C reaches the parent alone
        assert group_commands(dev_group)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=90) == 0
        assert wait_group_gone(dev_group, timeout=60) == {}
    finally:
        kill_group(process)
    assert not (elsewhere / "data").exists()  # --data-dir was elsewhere
