"""``planning``: which partitions need a submitting run, and in which ranges (no Dagster), and
``keys_needing_jobs`` on a real ephemeral Dagster instance and a real ledger."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DagsterInstance
from faultkit import write_table

from kvid_dagster._dagster_common import keys_needing_jobs, range_run_requests
from kvid_dagster.core.planning import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    PartitionRange,
    partition_ranges,
    plan_jobs,
)
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptRow, load_prompt_table
from kvid_dagster.core.submit import latest_submissions, register_table
from kvid_dagster.ledger import ClaimOwner, Ledger, Submission

JOBS = AssetKey("kvid_video_jobs")


def test_ranges_are_the_contiguous_runs_of_wanted_keys_in_partition_order() -> None:
    ordered = ["a", "b", "c", "d", "e", "f"]
    assert partition_ranges(ordered, ["b", "c", "e"]) == [("b", "c"), ("e", "e")]
    assert partition_ranges(ordered, {"f", "a", "b"}) == [("a", "b"), ("f", "f")]
    assert partition_ranges(ordered, ordered) == [PartitionRange("a", "f")]
    assert partition_ranges(ordered, []) == []
    # a wanted key that is not a partition (yet) makes no range
    assert partition_ranges(ordered, ["zz"]) == []


def test_a_range_tags_its_run_with_dagsters_range_tags() -> None:
    (first,) = partition_ranges(["x", "y", "z"], ["y", "z"])
    assert (first.first, first.last) == ("y", "z")
    assert first.run_tags() == {RANGE_START_TAG: "y", RANGE_END_TAG: "z"}


def claimed(ledger: Ledger, row: PromptRow) -> Submission:
    result = ledger.claim(row, ClaimOwner.current(), cost_credits=1.0)
    assert isinstance(result, Submission), result
    return result


def test_plan_wants_the_rows_whose_exact_request_has_no_job(tmp_path: Path) -> None:
    table = load_prompt_table(write_table(tmp_path / "t.csv", ["k1", "k2", "k3"]))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    register_table(ledger, table)
    assert plan_jobs(table, latest_submissions(ledger, table.rows), ["k1", "k2"], ["k3"]) == (
        ["k1", "k2", "k3"],
        ["k1", "k2", "k3"],
    )
    claimed(ledger, table.by_key["k2"])
    plan = plan_jobs(table, latest_submissions(ledger, table.rows), ["k3", "k2", "k1"])
    assert plan.ordered == ["k3", "k2", "k1"]  # the partitions' order, not the table's
    assert plan.wanted == ["k1", "k3"]


def test_keys_needing_jobs_reads_the_instances_partitions_and_the_ledger(
    tmp_path: Path,
) -> None:
    prompts = write_table(tmp_path / "t.csv", ["p1", "p2", "p3", "p4"])
    project = KvidProject(prompts, tmp_path / "data")
    register_table(project.ledger(), project.load_table())
    claimed(project.ledger(), project.load_table().by_key["p2"])
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(project.partitions_name, ["p1", "p2", "p3"])
        ordered, wanted = keys_needing_jobs(project, instance, extra=["p4"])
        assert ordered == ["p1", "p2", "p3", "p4"]
        assert wanted == ["p1", "p3", "p4"]
        requests = range_run_requests(ordered, wanted, jobs_key=JOBS, run_key_prefix="tick")
    assert [r.tags for r in requests] == [
        {RANGE_START_TAG: "p1", RANGE_END_TAG: "p1"},
        {RANGE_START_TAG: "p3", RANGE_END_TAG: "p4"},
    ]
    assert [r.run_key for r in requests] == ["tick:p1:p1", "tick:p3:p4"]
    assert all(r.asset_selection == [JOBS] for r in requests)
    unkeyed = range_run_requests(ordered, wanted, jobs_key=JOBS, run_key_prefix=None)
    assert [r.run_key for r in unkeyed] == [None, None]


def test_planning_imports_no_dagster() -> None:
    code = "import sys, kvid_dagster.core.planning; print('dagster' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
