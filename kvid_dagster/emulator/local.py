"""The local mode: one kvid emulator shared by every process that loads a project's definitions.

Under ``dg dev`` (or ``dagster dev``) the definitions are loaded by several processes: the code
server, which evaluates the sensors, and a fresh process per run. They must all talk to one
emulator: a job a run creates is polled and fetched by the status sensor, in another process,
minutes later. An emulator in a thread would die with the run that started it, and its jobs
with it.

So the first process that needs the service starts ``python -m kvid_dagster.emulator`` as a
process of its own, on a free loopback port, and writes its address and pid to
``<state_dir>/emulator.json``; every other process finds it there. A file lock makes the
check-and-start one step, so two processes never start two emulators. Nothing is started by
merely loading the definitions (``dg check``, ``dg list defs``): only a sensor tick or a run
that talks to the service starts it.

The emulator stays in the process group of whatever started it, so ``dg dev``'s Ctrl-C stops
it with the rest; whatever way ``dg dev`` ends, the emulator exits by itself after
``IDLE_SECONDS`` with no request and no job running, and the next process that needs one
starts a new one. Its jobs live in its memory: a job still running when it stops is lost
(``LOST`` in the ledger after the status sensor's 404 window), which costs nothing here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

#: the key the local emulator accepts; it is no secret and opens nothing but the emulator
LOCAL_API_KEY = "local-emulator-key"
#: an emulator with nothing to do for this long exits; the next run or tick starts another
IDLE_SECONDS = 600.0
_STATE = "emulator.json"
_LOCK = "emulator.lock"
_LOG = "emulator.log"


class LocalEmulatorError(RuntimeError):
    """The local emulator could not be started (its log says why)."""


@dataclass(frozen=True)
class LocalEmulator:
    """A running shared emulator, as ``emulator.json`` records it."""

    base_url: str
    pid: int

    def answers(self) -> bool:
        """Its process is alive and its port answers HTTP (any answer: a 404 is a server)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's: not ours to use
            return False
        try:
            httpx.get(f"{self.base_url}/", timeout=5.0)
        except httpx.HTTPError:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM: it stops serving, removes its temp files and exits."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / _LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def recorded_emulator(state_dir: Path) -> LocalEmulator | None:
    """The emulator ``state_dir`` records, running or not; None when none is recorded."""
    try:
        return LocalEmulator(**json.loads((state_dir / _STATE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def shared_emulator(state_dir: Path, *, idle_seconds: float = IDLE_SECONDS) -> LocalEmulator:
    """The emulator every process of this project shares: the recorded one if it answers,
    else a new one, started now and recorded."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        found = recorded_emulator(state_dir)
        if found is not None and found.answers():
            return found
        started = _start(state_dir, idle_seconds)
        tmp = state_dir / f".{_STATE}.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(started)), encoding="utf-8")
        os.replace(tmp, state_dir / _STATE)
        return started


def _start(state_dir: Path, idle_seconds: float) -> LocalEmulator:
    command = [
        sys.executable, "-m", "kvid_dagster.emulator", "--port", "0",
        "--api-key", LOCAL_API_KEY, "--exit-when-idle", str(idle_seconds),
        "--log-level", "WARNING",
    ]  # fmt: skip
    log_path = state_dir / _LOG
    with open(log_path, "ab") as log:
        # not a new session: a Ctrl-C to the process group that started it stops it too
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
    assert process.stdout is not None
    with process.stdout:  # the first line is its address; it writes nothing more there
        base_url = process.stdout.readline().decode().strip()
    if not base_url.startswith("http"):
        process.wait(timeout=30)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        raise LocalEmulatorError(
            f"the local kvid emulator did not start (exit {process.returncode}): "
            f"{tail[0] if tail else 'no message'}; its log is {log_path}"
        )
    return LocalEmulator(base_url=base_url, pid=process.pid)
