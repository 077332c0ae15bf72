"""A claim's owner is judged alive by its pid only where that pid names it, on both backends.

Containers on one kernel with the same host name (host networking) share the boot id, but each
has its own PID namespace: a live submitter's pid, looked up in another namespace's ``/proc``,
is not there (or is another process). So an owner is local, and judged by its process, only on
the same host, boot and PID namespace; any other owner by its heartbeat lease.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_ledger import Row

from kvid_dagster.ledger import ClaimOwner, Ledger, Submission, VideoStatus
from kvid_dagster.ledger.records import process_start_token

ROW = Row("k", "h" * 64)
# a child that claims ROW and lives until its stdin closes
CLAIMER = """
import os
import sys
from kvid_dagster.ledger import ClaimOwner, Ledger, Submission
from test_claim_owners import ROW
with Ledger(sys.argv[1]) as ledger:
    claim = ledger.claim(ROW, ClaimOwner.current("run-ns"), cost_credits=1.0)
    assert isinstance(claim, Submission), claim
print(os.readlink("/proc/self/ns/pid"), flush=True)
sys.stdin.read()
"""
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def claim_of(ledger: Ledger, owner: ClaimOwner) -> Submission:
    ledger.register([ROW])
    claim = ledger.claim(ROW, owner, cost_credits=1.0)
    assert isinstance(claim, Submission), claim
    return claim


def settled(url: str, *, lease: float) -> list[str]:
    """What a recovery with this heartbeat lease settles (another process's view)."""
    with Ledger(url, claim_lease_seconds=lease) as ledger:
        return [s.partition_key for s in ledger.recover().settled]


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    with Ledger(database_url) as made:
        yield made


def test_an_owner_of_this_host_and_boot_in_another_pid_namespace_lives_by_its_heartbeat(
    ledger: Ledger, database_url: str
) -> None:
    """Pid 1 runs here too, but the owner's is another namespace's: its start time is not the
    one looked up here, and no pid says anything about it."""
    here = ClaimOwner.current()
    other = ClaimOwner(here.host, 1, f"{BOOT_ID}/4026599999:{process_start_token(1)}", "run-ns")
    assert not other.is_local()
    claim_of(ledger, other)
    assert settled(database_url, lease=120.0) == []  # a fresh heartbeat: alive
    assert ledger.row("k").status is VideoStatus.SUBMITTING
    assert settled(database_url, lease=0.0) == ["k"]  # the lease ran out: settled
    assert ledger.row("k").status is VideoStatus.UNCERTAIN


def test_an_owner_written_without_its_namespace_lives_by_its_heartbeat_too(
    ledger: Ledger, database_url: str
) -> None:
    """An older kvid-dagster wrote "<boot id>:<start time>": its pid may be another
    namespace's, so its lease judges it (a dead one is settled after the lease, not at once)."""
    here = ClaimOwner.current()
    old = ClaimOwner(here.host, os.getpid(), f"{BOOT_ID}:{process_start_token(os.getpid())}")
    assert not old.is_local()
    claim_of(ledger, old)
    assert settled(database_url, lease=120.0) == []
    assert settled(database_url, lease=0.0) == ["k"]


def unshare_prefix() -> list[str]:
    """A command prefix that runs its command as pid 1 of a new PID namespace (with its own
    ``/proc``), as a container does; skips where this machine does not allow it."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no new PID namespace here: {probe.stderr.strip()}")
    return prefix


def test_a_live_submitter_in_another_pid_namespace_is_not_settled_uncertain(
    ledger: Ledger, database_url: str
) -> None:
    """A real process in a new PID namespace (same kernel, boot and host name) claims a row
    and lives: recovery here leaves its claim; once it has gone, its lease settles it."""
    ledger.register([ROW])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)])}
    child = subprocess.Popen(
        [*unshare_prefix(), sys.executable, "-c", CLAIMER, database_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        namespace = child.stdout.readline().strip()
        assert namespace, child.stderr.read() if child.stderr else ""
        assert namespace != os.readlink("/proc/self/ns/pid")  # another PID namespace
        owner = ledger.row("k").submission.owner
        assert owner.host == ClaimOwner.current().host and owner.pid == 1  # pid 1 runs here too
        assert owner.started.startswith(BOOT_ID)  # on this boot of this kernel
        assert ledger.recover().settled == []
        assert ledger.row("k").status is VideoStatus.SUBMITTING
    finally:
        child.communicate(timeout=60)  # closing its stdin ends it
    assert child.returncode == 0
    assert settled(database_url, lease=0.0) == ["k"]
