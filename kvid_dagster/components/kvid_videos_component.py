"""``KvidVideosComponent``: a prompt table and its kvid definitions, declared in a ``defs.yaml``.

``dg scaffold defs kvid_dagster.KvidVideosComponent videos`` writes the ``defs.yaml`` (in the
local mode, ``emulator: true``: ``dg dev`` makes real MP4s with no key and no cost) and a
sample ``prompts.csv`` beside it, and adds the data folder to the project's ``.gitignore``;
the component's ``build_defs`` is ``build_kvid_definitions``.
"""

# no `from __future__ import annotations`: Dagster derives the YAML schema from the fields'
# annotations at run time, and cannot from strings
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import dagster as dg
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver

from kvid_dagster.client import DEFAULT_BASE_URL
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.project import KvidProject, PromptsSetting
from kvid_dagster.core.sources import SqlPromptSource
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.options import PromptsSensorOptions, ScheduleOptions, StatusSensorOptions
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import KvidAssetProps, KvidTranslator

# the whole value is one environment variable: kept as its name (the resource's api_key_env,
# read when a client is made), so the key's value is never part of the resource's
# configuration (which the UI shows)
_ENV_TEMPLATE = re.compile(r"""^\{\{\s*env(?:\.(\w+)|\(\s*['"](\w+)['"]\s*\))\s*\}\}$""")

#: where an unset ``data_dir`` goes: ``<project root>/.kvid/<the component's folder under defs>``,
#: outside the package's source tree, and ignored by git (the scaffolder adds it)
DATA_ROOT = ".kvid"

#: what ``dg scaffold defs`` writes: the local mode, the real service one edit away
SCAFFOLD_YAML = """\
type: {type_name}

attributes:
  prompts: prompts.csv
  # The local kvid emulator: real MP4s, no key, no cost, and the sensors start running.
  # For the real service, replace this line with the api_key line below: the sensors then
  # start stopped, so nothing is paid for before you turn them on (the UI's Automation tab,
  # or default_sensor_status: running).
  emulator: true
  # api_key: "{{{{ env.KVID_API_KEY }}}}"   # kept an environment variable: never shown
  # data_dir: default <project root>/.kvid/<this folder> (the ledger, videos, catalog)
"""

SAMPLE_PROMPTS = """\
prompt_id,prompt,resolution,seed
fox,"A red fox trotting through fresh snow at dawn, cinematic",480p,7
harbour,"Fishing boats rocking in a quiet harbour, golden hour",480p,11
"""


def _resolve_secret(context: dg.ResolutionContext, raw: str | None) -> str | None:
    """``"{{ env.KVID_API_KEY }}"`` becomes ``EnvVar("KVID_API_KEY")`` (its name, never its
    value); anything else is resolved as usual."""
    if raw is None:
        return None
    match = _ENV_TEMPLATE.match(raw.strip())
    if match:
        return dg.EnvVar(match.group(1) or match.group(2))
    return context.resolve_value(raw, as_type=str)


class KvidPromptsModel(dg.Model):
    """``prompts`` in YAML, as a mapping: exactly one of ``path`` (a local path, relative to
    the component's folder, or an fsspec URL such as ``s3://bucket/prompts.parquet``),
    ``database_url`` with ``table`` or ``query`` (SQLAlchemy), or ``asset`` (the key of an
    upstream asset whose value is the table: a DataFrame, or a path or URL)."""

    path: str | None = None
    database_url: str | None = None
    table: str | None = None
    query: str | None = None
    asset: str | None = None
    image_base: str | None = None  # where a database's rows' relative image paths resolve


def _resolve_prompts(
    context: dg.ResolutionContext, model: str | KvidPromptsModel
) -> PromptsSetting:
    """The ``prompts`` attribute as a ``KvidProject`` takes it; a relative path stays relative
    (``build_defs`` anchors it in the component's folder)."""
    if isinstance(model, str):
        return context.resolve_value(model, as_type=str)
    given = [n for n in ("path", "database_url", "asset") if getattr(model, n) is not None]
    if len(given) != 1:
        raise ValueError(
            "prompts: give exactly one of path, database_url (with table or query) or asset; "
            f"got {', '.join(given) or 'none'}"
        )
    if model.path is not None:
        return context.resolve_value(model.path, as_type=str)
    if model.asset is not None:
        return dg.AssetKey.from_user_string(context.resolve_value(model.asset, as_type=str))
    if (model.table is None) == (model.query is None):
        raise ValueError("prompts: a database_url needs exactly one of table or query")
    return SqlPromptSource(
        context.resolve_value(model.database_url, as_type=str),
        table=model.table,
        query=model.query,
        image_base=model.image_base,
    )


class KvidBudgetModel(dg.Model):
    """``budget_credits`` in YAML: credits per submitting run and per UTC day (None: no cap)."""

    per_run: float | None = None
    per_day: float | None = None


def _resolve_budget(
    context: dg.ResolutionContext, model: KvidBudgetModel | None
) -> CreditBudget | None:
    return None if model is None else CreditBudget(per_run=model.per_run, per_day=model.per_day)


class KvidComponentTranslator(KvidTranslator):
    """The default specs with the component's ``translation`` applied, in one pass (as
    dagster-fivetran's component translator does): the sensors, jobs and checks read keys from
    these specs, so a translated key is every module's key. ``name`` (``kvid_prompts``, ...) is
    in the translation's scope."""

    def __init__(self, translation: TranslationFn[str]) -> None:
        self._translation = translation

    def get_asset_spec(self, props: KvidAssetProps) -> dg.AssetSpec:
        base = super().get_asset_spec(props)
        name = props.asset.value
        translated = self._translation(base, name)
        if translated.partitions_def != base.partitions_def:
            raise dg.DagsterInvalidDefinitionError(
                f"translation of {name}: partitions_def cannot change; kvid's partitions are "
                "the prompt table's rows"
            )
        return translated


class KvidVideosScaffolder(dg.Scaffolder):
    """Writes a ``defs.yaml`` that loads as written and a sample ``prompts.csv`` beside it."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        if request.scaffold_format != "yaml" or request.append:
            dg.scaffold_component(request, {"prompts": "prompts.csv", "emulator": True})
        else:  # with the comments that say how to leave the local mode
            defs_yaml = request.target_path / "defs.yaml"
            defs_yaml.write_text(SCAFFOLD_YAML.format(type_name=request.type_name))
        prompts = request.target_path / "prompts.csv"
        if not prompts.exists():  # never overwrite a table someone already wrote
            prompts.write_text(SAMPLE_PROMPTS, encoding="utf-8")
        if request.project_root is not None:
            ignore_data_root(Path(request.project_root))


def ignore_data_root(project_root: Path) -> None:
    """Add ``.kvid/`` to the project's ``.gitignore`` (create-dagster's knows nothing of it),
    unless a line already names it."""
    gitignore = project_root / ".gitignore"
    text = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    if any(line.strip().strip("/") == DATA_ROOT for line in text.splitlines()):
        return
    separator = "" if not text or text.endswith("\n") else "\n"
    gitignore.write_text(
        f"{text}{separator}\n# kvid-dagster: ledger, videos and catalogs\n{DATA_ROOT}/\n",
        encoding="utf-8",
    )


@dg.scaffold_with(KvidVideosScaffolder)
@dataclass
class KvidVideosComponent(dg.Component, dg.Resolvable):
    """The kvid assets, checks, sensors, schedule and resource for one prompt table.

    ``prompts`` is where the rows come from: a path (relative to the component's folder) or
    an fsspec URL, or a mapping (see ``KvidPromptsModel``): ``{database_url: ..., table:
    prompts}``, ``{asset: daily_prompts}``. A relative ``data_dir`` is the component
    folder's; unset, it is ``<project root>/.kvid/<the component's path under defs>``.
    ``emulator: true`` is the local mode: a kvid emulator that every process of the project
    shares (see ``kvid_dagster.emulator.local``), no key, no cost; with it, ``api_key`` and
    ``base_url`` are refused. Without it the service is used, and a missing key fails the run
    or tick that needs it, naming the variable: never a silent emulator.
    ``api_key`` written as ``"{{ env.KVID_API_KEY }}"`` stays an environment variable (read
    when a client is made, never its value in the configuration); unset, it is
    ``KVID_API_KEY``. ``base_url`` unset or empty is the vendor's.
    ``default_sensor_status`` (``running`` or ``stopped``) is both sensors'; unset, they run
    in the local mode and are stopped against the service, so nothing is paid for before a
    person turns them on. Unset ``dialect``, ``database_url`` and ``cron_schedule`` keep
    the defaults of ``KvidProject`` (``$KVID_API_DIALECT``, ``$KVID_DATABASE_URL``) and
    ``ScheduleOptions``.
    ``storage_url`` (unset: ``$KVID_STORAGE_URL``, else ``data_dir``) is where videos,
    previews and catalogs go: a path or an fsspec URL. ``param_defaults`` fill each row's
    empty kvid cells (a name that is no kvid parameter is refused, naming it). ``translation``
    is Dagster's standard one (key, group_name, owners, tags, kinds, ...), applied to each of
    the four assets with ``name`` (``kvid_prompts``, ...) in its scope.
    """

    prompts: Annotated[
        PromptsSetting,
        dg.Resolver(
            _resolve_prompts,
            model_field_type=str | KvidPromptsModel,
            description="Where the prompt rows come from: a path or URL, or a mapping with "
            "path, database_url and table or query, or asset.",
        ),
    ] = "prompts.csv"
    data_dir: str | None = None
    emulator: bool = False
    default_sensor_status: Literal["running", "stopped"] | None = None
    api_key: Annotated[
        str | None,
        dg.Resolver(
            _resolve_secret,
            model_field_type=str | None,
            inject_before_resolve=False,
            description='The kvid API key; "{{ env.KVID_API_KEY }}" keeps it a secret.',
        ),
    ] = None
    base_url: str | None = None
    dialect: Literal["video", "generation"] | None = None
    database_url: str | None = None
    storage_url: str | None = None
    budget_credits: Annotated[
        CreditBudget | None,
        dg.Resolver(_resolve_budget, model_field_type=KvidBudgetModel | None),
    ] = None
    cron_schedule: str | None = None
    param_defaults: Annotated[
        dict[str, str | int | float | bool] | None,
        dg.Resolver.default(
            description="Values for the rows' empty kvid cells (model, resolution, seed, ...)."
        ),
    ] = None
    translation: Annotated[
        TranslationFn[str] | None,
        TranslationFnResolver[str](lambda name: {"name": name}),
    ] = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        folder = Path(context.path)
        translator = (
            KvidTranslator()
            if self.translation is None
            else KvidComponentTranslator(self.translation)
        )
        prompts = self.prompts
        if isinstance(prompts, str) and "://" not in prompts:
            prompts = folder / prompts  # an absolute path stays itself
        data_dir = (
            folder / self.data_dir
            if self.data_dir is not None
            else Path(context.project_root, DATA_ROOT, folder.relative_to(context.defs_module_path))
        )
        project = KvidProject(
            prompts,
            data_dir,
            database_url=self.database_url,
            dialect=self.dialect,
            param_defaults=self.param_defaults,
            storage_url=self.storage_url,
        )
        schedule = (
            ScheduleOptions()
            if self.cron_schedule is None
            else ScheduleOptions(cron_schedule=self.cron_schedule)
        )
        status = self._sensor_status()
        return build_kvid_definitions(
            project,
            resource=self._resource(project),
            translator=translator,
            budget_credits=self.budget_credits,
            status_sensor=StatusSensorOptions(default_status=status),
            prompts_sensor=PromptsSensorOptions(default_status=status),
            schedule=schedule,
        )

    def _resource(self, project: KvidProject) -> KvidResource:
        if self.emulator:
            if self.api_key or self.base_url:
                raise ValueError(
                    "emulator: true talks to the local kvid emulator: remove api_key and "
                    "base_url (or emulator: true, to talk to the service)"
                )
            return KvidResource(
                local_emulator_dir=str(project.data_dir / "emulator"), dialect=project.dialect
            )
        key = self.api_key or dg.EnvVar("KVID_API_KEY")
        return KvidResource(
            # an environment variable is read when a client is made: its value is never in
            # the configuration, and a missing one is a one-line error naming it
            **(
                {"api_key_env": key.env_var_name}
                if isinstance(key, dg.EnvVar)
                else {"api_key": key}
            ),
            base_url=self.base_url or DEFAULT_BASE_URL,
            dialect=project.dialect,
        )

    def _sensor_status(self) -> dg.DefaultSensorStatus:
        """Running in the local mode (it costs nothing), else stopped unless asked for: a
        sensor that starts by itself against the service spends money without a click."""
        wanted = self.default_sensor_status or ("running" if self.emulator else "stopped")
        return dg.DefaultSensorStatus(wanted.upper())
