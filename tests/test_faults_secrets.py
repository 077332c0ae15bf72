"""The API key never leaves the client: not in logs, metadata, the ledger, the catalog,
exception texts, the Dagster event log or any file under DAGSTER_HOME, even when the server
echoes it back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import EmulatorFactory, fast_config
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    statuses,
    tick_until_settled,
    write_table,
)

from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.project import KvidProject

SECRET = "kvid-SECRET-7f3a9c1e-do-not-log"


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_a_full_run_with_faults_never_shows_the_api_key(
    emulator_factory: EmulatorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    emulator = emulator_factory(fast_config(api_key=SECRET))
    keys = ["echoed", "fine", "bad", "throttled"]
    prompts = write_table(
        tmp_path / "prompts.csv",
        keys,
        lambda k: f"A doomed shot {k} [[kvid:fail]]" if k == "bad" else f"A calm lake {k}",
    )
    project = KvidProject(prompts, tmp_path / "data")
    home = dagster_home(tmp_path / "home")
    # the key as a plain string, the worst case (EnvVar would keep it out of the config too)
    defs = make_defs(emulator.base_url, prompts, project.data_dir, api_key=SECRET)
    emulator.add_fault("generate", "echo_key")  # one submission ends UNCERTAIN, key echoed
    emulator.add_fault("generate", 429, times=2)
    emulator.add_fault("status", "echo_key", times=3)
    emulator.add_fault("result", 500, times=1)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        assert not run_submit(defs, instance, "echoed", "throttled")  # fails: one UNCERTAIN
        tick_until_settled(defs, instance, project.ledger())
        result = defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance)
        assert result.success
        texts = [str(e.message or "") + repr(e.event_specific_data) for e in result.all_events]
    assert sorted(statuses(project.ledger()).values()) == [
        "COMPLETED", "COMPLETED", "FAILED", "UNCERTAIN",
    ]  # fmt: skip
    assert emulator.stats[("status", 500)] == 3  # the echoing server really was asked

    needle = SECRET.encode()
    echoed = [r.getMessage() for r in caplog.records if "***" in r.getMessage()]
    assert echoed, "the scrubbed echo should show up in the logs"
    assert SECRET not in caplog.text
    captured = capfd.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    assert all(SECRET not in text for text in texts)
    ledger = project.ledger()
    [uncertain] = ledger.submissions([VideoStatus.UNCERTAIN])
    assert uncertain.error is not None and "***" in uncertain.error  # the echo, scrubbed
    ledger.close()
    written = {p.name for p in project.data_dir.rglob("*") if p.is_file()}
    assert {"kvid.db", "data.parquet"} <= written  # the ledger and the catalogs were searched
    # the ledger (database, WAL, journal), the published catalogs, the videos
    assert files_containing(project.data_dir, needle) == []
    assert files_containing(home, needle) == []  # runs, event logs, compute logs, schedules
