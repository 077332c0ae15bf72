"""``KvidVideosComponent``: scaffolded and loaded in Dagster's defs-folder sandbox, run against the
emulator on a real instance, Dagster's own translation cases, and the ``dg`` CLI itself."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from conftest import TEST_API_KEY
from dagster import (
    AssetKey,
    AssetSpec,
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
)
from dagster.components.testing import create_defs_folder_sandbox
from dagster.components.testing.test_cases import TestTranslation, test_cases
from faultkit import (
    dagster_home,
    open_instance,
    run_prompts,
    run_submit,
    tick_until_settled,
)

from kvid_dagster import KvidVideosComponent
from kvid_dagster.client import ApiDialect
from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.definitions import SUBMIT_JOB
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.emulator.local import recorded_emulator
from kvid_dagster.ledger import Ledger, VideoStatus
from kvid_dagster.translator import ASSET_NAMES

SAMPLE_KEYS = ["fox", "harbour"]  # the scaffolded prompts.csv's rows


@pytest.fixture(autouse=True)
def kvid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings the component reads from the environment, unset unless a test sets them."""
    for name in ("KVID_API_KEY", "KVID_BASE_URL", "KVID_API_DIALECT", "KVID_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    with open_instance(dagster_home(tmp_path / "dagster_home")) as instance:
        yield instance


@contextlib.contextmanager
def load_scaffolded(
    attributes: dict[str, Any] | None = None,
) -> Iterator[tuple[Path, Path, Definitions]]:
    """Scaffold ``videos`` in a sandbox (``attributes`` replace the scaffolded ones) and load
    it: its folder, its default data folder (``<project root>/.kvid/videos``), its
    definitions. A local emulator it started is stopped after."""
    with create_defs_folder_sandbox() as sandbox:
        contents = None
        if attributes is not None:
            contents = {"type": "kvid_dagster.KvidVideosComponent", "attributes": attributes}
        path = sandbox.scaffold_component(
            KvidVideosComponent, defs_path="videos", defs_yaml_contents=contents
        )
        data_dir = sandbox.project_root / ".kvid" / "videos"
        try:
            with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
                assert isinstance(component, KvidVideosComponent)
                yield path, data_dir, defs
        finally:
            local = recorded_emulator(data_dir / "emulator")
            if local is not None:
                local.stop()


def failed_submit(defs: Definitions, instance: DagsterInstance) -> list[str]:
    """A submitting run over the sample that must fail: its steps' errors, each in the words
    of its cause (Dagster wraps an asset's own exception)."""
    result = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=instance,
        tags={RANGE_START_TAG: SAMPLE_KEYS[0], RANGE_END_TAG: SAMPLE_KEYS[-1]},
        raise_on_error=False,
    )
    assert not result.success
    messages = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error.cause is not None:
                error = error.cause
            messages.append(error.message)
    return messages


def submit_all(defs: Definitions, instance: DagsterInstance) -> bool:
    """kvid_prompts, then one submitting run over the sample's partitions."""
    assert run_prompts(defs, instance)
    return run_submit(defs, instance, SAMPLE_KEYS[0], SAMPLE_KEYS[-1])


def sensor_statuses(defs: Definitions) -> dict[str, DefaultSensorStatus]:
    return {sensor.name: sensor.default_status for sensor in defs.sensors or []}


def test_the_scaffold_is_the_local_mode_with_its_data_outside_the_source_tree(
    instance: DagsterInstance,
) -> None:
    """No key, no service: the scaffolded defs.yaml loads as written, submits to the shared
    local emulator (started by the first run, not by loading), its sensors run, and its
    ledger and videos are in ``<project root>/.kvid/``, which git ignores."""
    with load_scaffolded() as (path, data_dir, defs):
        written = yaml.safe_load((path / "defs.yaml").read_text(encoding="utf-8"))
        assert written["type"].endswith(".KvidVideosComponent")  # the dg test: the public name
        assert written["attributes"] == {"prompts": "prompts.csv", "emulator": True}
        assert "# api_key: " in (path / "defs.yaml").read_text()  # the way to the service
        assert (path / "prompts.csv").is_file()
        assert sensor_statuses(defs) == {
            "kvid_status_sensor": DefaultSensorStatus.RUNNING,
            "kvid_prompts_sensor": DefaultSensorStatus.RUNNING,
        }
        resource = defs.resources["kvid"]
        assert resource.local_emulator_dir == str(data_dir / "emulator")
        assert recorded_emulator(data_dir / "emulator") is None  # loading started nothing
        assert submit_all(defs, instance)
        local = recorded_emulator(data_dir / "emulator")
        assert local is not None and local.answers()
        tick_until_settled(defs, instance, Ledger(f"sqlite:///{data_dir / 'kvid.db'}"))
        rows = Ledger(f"sqlite:///{data_dir / 'kvid.db'}").rows_by_key()
        assert {k: r.status for k, r in rows.items()} == dict.fromkeys(
            SAMPLE_KEYS, VideoStatus.COMPLETED
        )
        assert not (path / "data").exists()  # nothing in the package's source tree
        gitignore = (data_dir.parent.parent / ".gitignore").read_text().splitlines()
        assert ".kvid/" in gitignore


def test_against_the_service_the_sensors_start_stopped_and_a_missing_key_is_one_line(
    emulator: KvidEmulator, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the local mode nothing is faked: no key, and the submitting run fails naming
    KVID_API_KEY before anything is sent; with the key it submits. The sensors start
    stopped unless the YAML says otherwise."""
    service = {"api_key": "{{ env.KVID_API_KEY }}", "base_url": emulator.base_url}
    with load_scaffolded(service) as (_, data_dir, defs):
        assert set(sensor_statuses(defs).values()) == {DefaultSensorStatus.STOPPED}
        resource = defs.resources["kvid"]
        # the key stays the environment variable's name: its value is not in the config
        assert resource.api_key is None and resource.api_key_env == "KVID_API_KEY"
        assert resource.local_emulator_dir is None
        assert run_prompts(defs, instance)
        (message,) = failed_submit(defs, instance)
        assert message.strip().splitlines() == [
            "kvid_dagster.client.errors.KvidAuthenticationError: KVID_API_KEY is not set: set "
            "it to your kvid API key (nothing was sent; for made-up videos with no key, the "
            "local emulator: `emulator: true` in the Component's defs.yaml, or `kvid-dagster "
            "dev`)"
        ]
        assert emulator.jobs_created == 0 and recorded_emulator(data_dir / "emulator") is None
        monkeypatch.setenv("KVID_API_KEY", TEST_API_KEY)
        assert run_submit(defs, instance, SAMPLE_KEYS[0], SAMPLE_KEYS[-1])
        assert emulator.jobs_created == len(SAMPLE_KEYS)
    running = {**service, "default_sensor_status": "running"}
    with load_scaffolded(running) as (_, _, defs):
        assert set(sensor_statuses(defs).values()) == {DefaultSensorStatus.RUNNING}
    local_and_key = {"emulator": True, "api_key": "{{ env.KVID_API_KEY }}"}
    with pytest.raises(Exception) as raised, load_scaffolded(local_and_key):
        pass
    assert "emulator: true talks to the local kvid emulator: remove api_key" in error_chain(
        raised.value
    )


def test_attributes_reach_the_definitions(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    """dialect, cron_schedule, database_url and absolute paths; a zero per-run budget sends
    nothing and fails naming it."""
    table = tmp_path / "table.csv"
    table.write_text("prompt_id,prompt\nfox,A red fox\nharbour,A harbour\n", encoding="utf-8")
    database = tmp_path / "ledger.db"
    attributes = {
        "prompts": str(table),
        "data_dir": str(tmp_path / "kvid_data"),
        "api_key": TEST_API_KEY,
        "base_url": emulator.base_url,
        "dialect": "generation",
        "database_url": f"sqlite:///{database}",
        "budget_credits": {"per_run": 0},
        "cron_schedule": "*/30 * * * *",
    }
    with load_scaffolded(attributes) as (_, _, defs):
        assert defs.resources["kvid"].dialect is ApiDialect.GENERATION
        assert defs.resolve_schedule_def("kvid_daily_schedule").cron_schedule == "*/30 * * * *"
        assert run_prompts(defs, instance)
        failures = failed_submit(defs, instance)
        assert any("per-run 0 credits" in message for message in failures), failures
        assert emulator.jobs_created == 0
        assert database.is_file() and not (tmp_path / "kvid_data" / "kvid.db").exists()
        rows = Ledger(f"sqlite:///{database}").rows_by_key()
        assert all(rows[key].status is VideoStatus.PENDING for key in SAMPLE_KEYS)


def error_chain(exc: BaseException) -> str:
    """The messages of an error and its causes: Dagster wraps a component's own error."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


def test_a_misspelt_attribute_is_refused_naming_it() -> None:
    with pytest.raises(Exception) as raised, load_scaffolded({"prompt_path": "prompts.csv"}):
        pass
    assert "prompt_path" in error_chain(raised.value)


def test_prompts_from_a_database_table_or_an_upstream_asset(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    database = tmp_path / "content.db"
    engine = sa.create_engine(f"sqlite:///{database}")
    rows = [
        {"prompt_id": "fox", "prompt": "A red fox"},
        {"prompt_id": "harbour", "prompt": "A harbour"},
    ]
    pd.DataFrame(rows).to_sql("prompts", engine, index=False)
    service = {"api_key": TEST_API_KEY, "base_url": emulator.base_url}
    table = {"database_url": f"sqlite:///{database}", "table": "prompts"}
    with load_scaffolded({**service, "prompts": table}) as (_, _, defs):
        assert submit_all(defs, instance)
    assert emulator.jobs_created == len(SAMPLE_KEYS)
    asset_prompts = {**service, "prompts": {"asset": "team/daily_prompts"}}
    with load_scaffolded(asset_prompts) as (_, _, defs):
        graph = defs.resolve_asset_graph()
        parents = graph.get(AssetKey("kvid_prompts")).parent_keys
        assert AssetKey(["team", "daily_prompts"]) in parents
    two = {**service, "prompts": {"path": "prompts.csv", "asset": "daily_prompts"}}
    with pytest.raises(Exception) as raised, load_scaffolded(two):
        pass
    assert "give exactly one of path, database_url" in error_chain(raised.value)


def test_param_defaults_fill_the_rows_empty_cells_and_a_misspelt_one_is_refused(
    emulator: KvidEmulator, instance: DagsterInstance
) -> None:
    attributes = {
        "api_key": TEST_API_KEY,
        "base_url": emulator.base_url,
        "param_defaults": {"seed": 99, "enable_prompt_expansion": False},
    }
    with load_scaffolded(attributes) as (_, data_dir, defs):
        assert run_prompts(defs, instance)
        rows = Ledger(f"sqlite:///{data_dir / 'kvid.db'}").rows_by_key()
        params = {key: json.loads(rows[key].params_json or "{}") for key in SAMPLE_KEYS}
        # the sample table's own seeds win; its empty cells take the defaults
        assert {key: p["seed"] for key, p in params.items()} == {"fox": 7, "harbour": 11}
        assert all(p["enable_prompt_expansion"] == "false" for p in params.values()), params
    with pytest.raises(Exception) as raised, load_scaffolded({"param_defaults": {"sede": 1}}):
        pass
    assert "'sede' is not a kvid parameter" in error_chain(raised.value)


def test_a_translated_key_is_the_key_of_every_definition(
    emulator: KvidEmulator, instance: DagsterInstance
) -> None:
    """The status sensor materializes the videos under the translated key, where the UI
    looks for them."""
    attributes = {
        "api_key": TEST_API_KEY,
        "base_url": emulator.base_url,
        "translation": {"key_prefix": "marketing", "group_name": "{{ 'kvid_' + name }}"},
    }
    with load_scaffolded(attributes) as (_, data_dir, defs):
        specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
        assert specs[AssetKey(["marketing", "kvid_videos"])].group_name == "kvid_kvid_videos"
        assert submit_all(defs, instance)
        tick_until_settled(defs, instance, Ledger(f"sqlite:///{data_dir / 'kvid.db'}"))
        videos = AssetKey(["marketing", "kvid_videos"])
        assert instance.get_materialized_partitions(videos) == set(SAMPLE_KEYS)


def test_translation_cannot_change_the_partitions() -> None:
    attributes = {"translation": {"partitions_def": {"type": "static", "partition_keys": ["a"]}}}
    with pytest.raises(Exception) as raised, load_scaffolded(attributes):
        pass
    assert "partitions_def cannot change" in error_chain(raised.value)


class TestKvidTranslation(TestTranslation):
    """Dagster's standard translation cases, on each of the four assets."""

    # kvid's partitions are the prompt table's rows: that case is refused (test above)
    @pytest.fixture(
        params=[case for case in test_cases if case.name != "partitions_defs"],
        ids=[case.name for case in test_cases if case.name != "partitions_defs"],
    )
    def translation_test_case(self, request: pytest.FixtureRequest) -> Any:
        return request.param

    def test_translation(
        self,
        attributes: dict[str, Any],
        assertion: Callable[[AssetSpec], bool],
        key_modifier: Callable[[AssetKey], AssetKey] | None,
    ) -> None:
        with load_scaffolded({"translation": attributes}) as (_, _, defs):
            specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
            expected = [AssetKey(name) for name in ASSET_NAMES]
            if key_modifier is not None:
                expected = [key_modifier(key) for key in expected]
            assert set(expected) <= set(specs)  # with a `deps` case, the dep's spec too
            assert all(assertion(specs[key]) for key in expected)


def dg(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``dg`` CLI of this environment, in ``project``."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(bin_dir.parent),
        "DAGSTER_HOME": str(project / "dagster_home"),
        "PYTHONPATH": str(project / "src"),  # the project is not installed
    }
    return subprocess.run(
        [str(bin_dir / "dg"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_dg_scaffolds_checks_and_lists_the_component(tmp_path: Path) -> None:
    """A minimal dg project, as ``create-dagster project`` lays it out."""
    project = tmp_path / "videos_project"
    defs_dir = project / "src" / "videos_project" / "defs"
    defs_dir.mkdir(parents=True)
    dagster_home(project / "dagster_home")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "videos_project"\nversion = "0.1.0"\n\n'
        '[tool.dg]\ndirectory_type = "project"\n\n'
        '[tool.dg.project]\nroot_module = "videos_project"\n'
    )
    (defs_dir.parent / "__init__.py").write_text("")
    (defs_dir / "__init__.py").write_text("")
    (defs_dir.parent / "definitions.py").write_text(
        "from pathlib import Path\n\nimport dagster as dg\n\n\n@dg.definitions\n"
        "def defs() -> dg.Definitions:\n"
        "    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
    )

    scaffold = dg(project, "scaffold", "defs", "kvid_dagster.KvidVideosComponent", "videos")
    assert scaffold.returncode == 0, scaffold.stderr
    assert (defs_dir / "videos" / "prompts.csv").is_file()
    check = dg(project, "check", "yaml")
    assert check.returncode == 0, check.stdout + check.stderr
    listed = dg(project, "list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    assert sorted(asset["asset_key"] for asset in found["assets"]) == sorted(ASSET_NAMES)
    assert {sensor["name"] for sensor in found["sensors"]} == {
        "kvid_status_sensor",
        "kvid_prompts_sensor",
    }

    defs_yaml = defs_dir / "videos" / "defs.yaml"
    defs_yaml.write_text(defs_yaml.read_text().replace("prompts:", "prompt:"))
    misspelt = dg(project, "check", "yaml")
    assert misspelt.returncode != 0
    assert "prompt" in misspelt.stdout + misspelt.stderr
