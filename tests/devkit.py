"""Helpers for tests that start `dagster dev`-like process trees: ports, GraphQL, process groups."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def graphql_until(
    port: int,
    query: str,
    ready: Callable[[dict[str, Any]], bool],
    process: subprocess.Popen[Any],
    timeout: float,
) -> dict[str, Any]:
    """Ask the UI's GraphQL endpoint until ``ready`` accepts its ``data`` (polled every quarter
    second: the UI starts and the sensors tick on their own clocks, and a longer step only adds
    its remainder to the test); fails if ``process`` ends."""
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited ({process.returncode})"
        try:
            answer = httpx.post(
                f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
            )
            data = answer.json().get("data") or {}
            if ready(data):
                return data
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready after {timeout:.0f} s; last answer: {data}")


def process_commands() -> dict[int, str]:
    """pid -> command line of every live process (a zombie, having exited, has none)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def group_commands(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process in process group ``pgid``."""
    found = {}
    for pid, command in process_commands().items():
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                found[pid] = command
    return found


def wait_group_gone(pgid: int, timeout: float) -> dict[int, str]:
    """Wait until no process of the group is alive; return what is left at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := group_commands(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_group(process: subprocess.Popen[Any]) -> None:
    """The last resort of a test's ``finally``: nothing it started outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
