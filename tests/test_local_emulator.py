"""The local mode's emulator is one for every process of a project
(``kvid_dagster.emulator.local``): real processes racing to start it, a job created through
one and fetched through another, a dead one replaced, an idle one gone by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvid_dagster.client import KvidClient, build_request
from kvid_dagster.emulator.local import LOCAL_API_KEY, recorded_emulator, shared_emulator

FIND = "import json, sys; from pathlib import Path; from kvid_dagster.emulator.local import shared_emulator; e = shared_emulator(Path(sys.argv[1])); print(json.dumps([e.base_url, e.pid]))"  # noqa: E501


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "emulator"
    yield folder
    found = recorded_emulator(folder)
    if found is not None:  # nothing outlives the test
        found.stop()
        wait_gone(found.pid)


def wait_gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie, not reaped yet, has exited too
            if stat.read().split(") ")[-1].startswith("Z"):
                return True
        time.sleep(0.2)
    return False


def test_processes_racing_to_start_it_share_one_and_a_job_crosses_them(state_dir: Path) -> None:
    finders = [
        subprocess.Popen(
            [sys.executable, "-c", FIND, str(state_dir)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    found = {tuple(json.loads(p.communicate(timeout=120)[0])) for p in finders}
    assert len(found) == 1, found  # one address, one process, for all four
    ((base_url, pid),) = found
    assert recorded_emulator(state_dir) is not None
    assert recorded_emulator(state_dir).pid == pid  # type: ignore[union-attr]
    assert all(p.returncode == 0 for p in finders)
    # a job created here (a run's process) is known to another process's client (a sensor's)
    request = build_request("A lighthouse", resolution="480p")
    with KvidClient(LOCAL_API_KEY, shared_emulator(state_dir).base_url) as client:
        request_id = client.generate(request)
    poll = (
        "import sys; from pathlib import Path; from kvid_dagster.client import KvidClient; "
        "from kvid_dagster.emulator.local import LOCAL_API_KEY, shared_emulator; "
        "c = KvidClient(LOCAL_API_KEY, shared_emulator(Path(sys.argv[1])).base_url); "
        "c.wait('text-to-video', sys.argv[2], poll_interval=0.2, deadline=120); "
        "print(c.result('text-to-video', sys.argv[2]).url)"
    )
    done = subprocess.run(
        [sys.executable, "-c", poll, str(state_dir), request_id],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(base_url)


def test_a_dead_emulator_is_replaced_and_an_idle_one_exits_by_itself(state_dir: Path) -> None:
    first = shared_emulator(state_dir, idle_seconds=600)
    first.stop()
    assert wait_gone(first.pid)
    assert not first.answers()
    second = shared_emulator(state_dir, idle_seconds=1)
    assert second.pid != first.pid and second.answers()
    assert recorded_emulator(state_dir) == second
    assert wait_gone(second.pid, timeout=60)  # a second with nothing to do: it ended itself
    third = shared_emulator(state_dir)
    assert third.pid != second.pid and third.answers()
