"""``KvidTranslator.get_asset_spec``: the specs, and what an overriding subclass changes on the
Definitions ``build_kvid_definitions`` actually builds (the assets, check, jobs, sensors and
schedule agree on every key)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, AssetSpec, Definitions
from faultkit import write_table

from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, SUBMIT_JOB, build_kvid_definitions
from kvid_dagster.project import KvidProject
from kvid_dagster.quality import QualityCheck
from kvid_dagster.reporting import VIDEO_CHECK_NAME
from kvid_dagster.translator import ASSET_NAMES, KvidAsset, KvidAssetProps, KvidTranslator


@pytest.fixture
def project(tmp_path: Path) -> KvidProject:
    return KvidProject(write_table(tmp_path / "ads.csv", ["a", "b"]), tmp_path / "data")


def test_each_kvid_asset_has_a_spec_with_its_key_group_and_at_most_three_kinds(
    project: KvidProject,
) -> None:
    translator = KvidTranslator()
    specs = {a: translator.get_asset_spec(KvidAssetProps(a, project)) for a in KvidAsset}
    assert all(isinstance(spec, AssetSpec) for spec in specs.values())
    assert [spec.key for spec in specs.values()] == [AssetKey([n]) for n in ASSET_NAMES]
    assert {spec.group_name for spec in specs.values()} == {"kvid"}
    assert all(1 <= len(spec.kinds) <= 3 for spec in specs.values())
    assert specs[KvidAsset.VIDEOS].kinds == {"kvid", "mp4"}
    assert specs[KvidAsset.CATALOG].kinds == {"parquet"}
    prompts = specs[KvidAsset.PROMPTS]
    assert "ads.csv" in (prompts.description or "")
    assert prompts.metadata["dagster/uri"].value == project.source().uri


def test_the_older_overrides_still_make_the_spec(project: KvidProject) -> None:
    class Prefixed(KvidTranslator):
        def get_asset_key(self, name: str) -> AssetKey:
            return AssetKey(["media", name])

        def get_group_name(self) -> str:
            return "media"

    spec = Prefixed().get_asset_spec(KvidAssetProps(KvidAsset.VIDEO_JOBS, project))
    assert spec.key == AssetKey(["media", "kvid_video_jobs"]) and spec.group_name == "media"


class Studio(KvidTranslator):
    """A user's translator: its own keys, group, descriptions, owners and tags, through
    ``get_asset_spec``."""

    def get_asset_spec(self, props: KvidAssetProps) -> AssetSpec:
        spec = super().get_asset_spec(props)
        return spec.replace_attributes(
            key=AssetKey(["studio", props.asset.name.lower()]),
            group_name="studio",
            description=f"studio {props.asset.name.lower()} of "
            f"{Path(props.project.prompts_name).name}",
            owners=["team:studio"],
            tags={"cost-centre": "ads"},
        )


def test_an_overridden_spec_changes_the_built_definitions(project: KvidProject) -> None:
    defs = build_kvid_definitions(project, translator=Studio())
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {AssetKey(["studio", a.name.lower()]) for a in KvidAsset}
    assert graph.get_all_asset_keys() == keys
    for key in keys:
        node = graph.get(key)
        assert node.group_name == "studio"
        assert node.description == f"studio {key.path[-1]} of ads.csv"
        assert node.owners == ["team:studio"] and node.tags["cost-centre"] == "ads"
        assert 1 <= len(node.kinds) <= 3
    videos = AssetKey(["studio", "videos"])
    assert graph.get(videos).partitions_def == project.partitions_def
    assert graph.get(AssetKey(["studio", "video_jobs"])).partitions_def == project.partitions_def
    assert graph.get(videos).parent_keys == {AssetKey(["studio", "video_jobs"])}
    assert AssetCheckKey(videos, VIDEO_CHECK_NAME) in graph.asset_check_keys
    assert {AssetCheckKey(videos, check) for check in QualityCheck} <= graph.asset_check_keys
    selected = {
        name: defs.resolve_job_def(name).asset_layer.selected_asset_keys
        for name in (PROMPTS_JOB, SUBMIT_JOB, CATALOG_JOB)
    }
    assert selected == {
        PROMPTS_JOB: {AssetKey(["studio", "prompts"])},
        SUBMIT_JOB: {AssetKey(["studio", "video_jobs"])},
        CATALOG_JOB: {AssetKey(["studio", "catalog"])},
    }
    status = defs.resolve_sensor_def("kvid_status_sensor").asset_selection
    assert status is not None and status.resolve(graph) == {videos}


def test_building_the_definitions_sets_no_warning_filter(project: KvidProject) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        before = list(warnings.filters)
        defs = build_kvid_definitions(project)
        defs.resolve_job_def(SUBMIT_JOB)
        assert warnings.filters == before
    # the one beta argument kvid relies on is silenced where it is passed, and only there
    assert not [w for w in caught if "backfill_policy" in str(w.message)]
