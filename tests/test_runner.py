"""``run_pipeline``: the CLI's whole pipeline in one process, on a Dagster home of its own."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import TEST_API_KEY
from dagster import AssetKey, DagsterInstance
from faultkit import write_table

from kvid_dagster.cli.progress import PlainDisplay
from kvid_dagster.cli.runner import run_pipeline
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.project import KvidProject
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import KvidTranslator

PRICE = 60  # v1 480p, one clip: faultkit.write_table's rows


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
        KvidProject(table, tmp_path / "data"),
        KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url),
        poll_interval_seconds=0.2,
        display=PlainDisplay(out),
    )
    assert result.ok, out.getvalue()
    assert dict(os.environ) == before
    home = tmp_path / "data" / "dagster_home"
    with DagsterInstance.from_config(str(home)) as instance:
        assert {r.run_id for r in instance.get_runs()} == set(result.runs)
    assert "done 2/2" in out.getvalue()


class Renamed(KvidTranslator):
    """Keys of a user's own: the submitting op is ``studio__kvid_video_jobs``, not the
    default translator's ``kvid_video_jobs``."""

    def get_asset_key(self, name: str) -> AssetKey:
        return AssetKey(["studio", name])


def test_a_translator_renaming_the_assets_still_gets_the_per_run_budget(
    emulator: KvidEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-run room is run config of the submitting op, whose name follows the
    definitions' translator: with renamed assets it still reaches the op (a config naming the
    default op would fail the run before anything is sent)."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    project = KvidProject(write_table(tmp_path / "p.csv", ["a", "b"]), tmp_path / "data")
    out = io.StringIO()
    result = run_pipeline(
        project,
        KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url),
        translator=Renamed(),
        poll_interval_seconds=0.2,
        budget_credits=CreditBudget(per_run=PRICE),
        display=PlainDisplay(out),
    )
    assert emulator.jobs_created == 1, out.getvalue()
    statuses = {row.partition_key: row.status for row in project.ledger().rows()}
    assert statuses == {"a": VideoStatus.COMPLETED, "b": VideoStatus.PENDING}
    assert "per-run 60 credits" in out.getvalue()
    assert result.spent_credits == PRICE and len(result.failed_runs) == 1
