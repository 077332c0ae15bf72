"""Two hosts that share nothing but PostgreSQL and S3, on one machine (tests/test_deploy.py).

A cluster's run launcher (K8sRunLauncher, EcsRunLauncher) does not run a run itself: it asks
the cluster for a container, and that container runs ``dagster api execute_run`` with the
run's serialized arguments, on another host. Here the same hand-off goes through the one thing
the hosts share, the Dagster instance's PostgreSQL:

- ``HandOffRunLauncher`` (host A's ``run_launcher``) only leaves the run STARTING in the run
  storage, where Dagster puts a run it launches;
- ``run_worker_agent`` (host B, its own process tree and environment) picks up STARTING runs
  and executes each with ``dagster api execute_run``, as the container would.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, ConfigurableClassData

logger = logging.getLogger(__name__)


class HandOffRunLauncher(RunLauncher, ConfigurableClass):
    """Launches nothing on this host: the run stays STARTING until another host's agent runs
    it (``dagster.yaml``: ``run_launcher: {module: hostkit, class: HandOffRunLauncher}``)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        self._inst_data = inst_data
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> HandOffRunLauncher:
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        logger.info("run %s handed off to the run-worker host", context.dagster_run.run_id)

    def terminate(self, run_id: str) -> bool:
        return False


def run_worker_agent(work_dir: str) -> None:
    """Host B: every STARTING run becomes a ``dagster api execute_run`` child in ``work_dir``
    (its log there as ``run-<id>.log``), one per run, until this process is killed."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    with DagsterInstance.get() as instance:  # DAGSTER_HOME: host B's own
        while True:
            for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTING])):
                if run.run_id in started or run.job_code_origin is None:
                    continue
                command = ExecuteRunArgs(
                    job_origin=run.job_code_origin,
                    run_id=run.run_id,
                    instance_ref=None,  # the worker opens DAGSTER_HOME's instance, as a pod does
                    set_exit_code_on_failure=True,
                ).get_command_args()
                with (Path(work_dir) / f"run-{run.run_id}.log").open("wb") as log:
                    started[run.run_id] = subprocess.Popen(
                        command, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT
                    )
            for child in started.values():
                child.poll()  # reap finished workers
            time.sleep(0.5)


if __name__ == "__main__":
    run_worker_agent(sys.argv[1])
