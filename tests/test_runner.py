"""``run_pipeline``: the CLI's whole pipeline in one process, on a Dagster home of its own."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import TEST_API_KEY
from dagster import DagsterInstance

from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.progress import PlainDisplay
from kvid_dagster.resource import KvidResource
from kvid_dagster.runner import run_pipeline


def test_the_pipeline_uses_its_own_dagster_home_and_leaves_the_environment_alone(
    emulator: KvidEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library code writes no ``os.environ``: the runner opens ``<data_dir>/dagster_home``'s
    instance directly, so the caller's process (a notebook, a test) keeps its own settings."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    table = tmp_path / "prompts.csv"
    table.write_text("prompt_id,prompt\nfox,A red fox\nlake,A calm lake\n", encoding="utf-8")
    before = dict(os.environ)
    out = io.StringIO()
    result = run_pipeline(
        table,
        tmp_path / "data",
        KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url),
        poll_interval_s=0.2,
        display=PlainDisplay(out),
    )
    assert result.ok, out.getvalue()
    assert dict(os.environ) == before
    home = tmp_path / "data" / "dagster_home"
    with DagsterInstance.from_config(str(home)) as instance:
        assert {r.run_id for r in instance.get_runs()} == set(result.runs)
    assert "done 2/2" in out.getvalue()
