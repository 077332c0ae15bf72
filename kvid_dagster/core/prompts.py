"""The prompt table: one row per video, read from any prompt source and validated row by row.

Where the rows come from (a file, a URL, a database, a DataFrame) is ``sources.py``'s business;
from here on every source is the same: each cell is typed by kvid's rules, so the same rows give
the same partition keys and request hashes wherever they are held. A bad row never takes the
good ones down: every problem becomes an :class:`InvalidRow` naming the row, its key, the field
and the reason, and the valid rows go on. Only a table that cannot be had or used at all
(missing, unreachable, not CSV/Parquet, no ``prompt`` column, a misspelt kvid column) raises
:class:`PromptTableError` (:class:`PromptSourceUnavailable` when it may work on the next try).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kvid_dagster.client import ApiDialect, KvidError, KvidRequest, build_request
from kvid_dagster.core.prompt_cells import CellError, cell_text, integer_text, key_text
from kvid_dagster.core.sources import (
    ImageBase,
    ImageUnavailable,
    PromptSource,
    PromptTableError,
    prompt_source,
)

# Columns that are not API parameters (``image_url``/``image_file``/``end_image_url``: the
# vendor's own names for ``image`` and ``end_image``).
ROW_COLUMNS = (
    "prompt_id", "prompt", "job", "model", "image", "image_url", "image_file", "end_image",
    "end_image_url",
)  # fmt: skip
IMAGE_COLUMNS = {
    "image": ("image", "image_url", "image_file"),
    "end_image": ("end_image", "end_image_url"),
}
# Every API parameter a row may carry, by its API name (the model decides which are allowed).
PARAM_COLUMNS = (
    "negative_prompt",
    "num_frames",
    "frames_per_second",
    "seed",
    "resolution",
    "aspect_ratio",
    "num_inference_steps",
    "enable_safety_checker",
    "enable_prompt_expansion",
    "duration",
    "camera_fixed",
    # the generation dialect's (reference lists: JSON arrays or ``a|b`` text)
    "image_urls",
    "video_urls",
    "audio_urls",
    "generate_audio",
    "guidance_scale",
    "shift",
    "acceleration",
)
INT_PARAMS = frozenset({"num_frames", "frames_per_second", "seed", "num_inference_steps"})
# A partition key is also a file name and a Dagster partition key: keep it boring.
PROMPT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# an unknown column this close to a kvid field is a misspelling of it, not the user's own
_MAX_MISSPELLING = 2
# a longer column name is shown cut, as a value is
_MAX_SHOWN_FIELD = 64


@dataclass(frozen=True)
class PromptRow:
    """A valid row: its partition key and the typed request it turns into."""

    partition_key: str
    row_number: int  # 1-based data row (the CSV line is row_number + 1)
    request: KvidRequest
    request_hash: str
    params: Mapping[str, Any]  # the cells that were set, normalised, for the catalog
    user_columns: Mapping[str, str] = field(default_factory=dict)  # never sent

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def job_kind(self) -> str:
        return str(self.request.job_kind)

    @property
    def model(self) -> str:
        return self.request.model or ""  # "": the generation dialect's server default

    @property
    def dialect(self) -> str:
        return self.request.dialect.value

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str, ensure_ascii=False)

    @property
    def user_columns_json(self) -> str | None:
        if not self.user_columns:
            return None
        return json.dumps(dict(self.user_columns), ensure_ascii=False)


@dataclass(frozen=True)
class InvalidRow:
    """A row that will not be sent, and why."""

    row_number: int
    partition_key: str | None
    field: str
    reason: str
    prompt: str = ""

    @property
    def ledger_key(self) -> str:
        """Its key in the ledger and the catalog: ``row-N`` when it has no usable key."""
        return self.partition_key or f"row-{self.row_number}"

    @property
    def message(self) -> str:
        """One line naming the row, its key and the field (a column's name is shown quoted
        when it is not plain text: the user's own columns may be named anything)."""
        key = f" ({self.partition_key})" if self.partition_key else ""
        plain = self.field.isprintable() and 0 < len(self.field) <= _MAX_SHOWN_FIELD
        field_name = self.field if plain else _short(self.field)
        return f"row {self.row_number}{key}: {field_name}: {self.reason}"


@dataclass
class PromptTable:
    source: str = ""  # where the rows came from (PromptSource.describe())
    rows: list[PromptRow] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""  # sha256 of exactly the bytes parsed
    user_columns: tuple[str, ...] = ()  # the user's own columns, kept with each row, never sent

    @property
    def by_key(self) -> dict[str, PromptRow]:
        return {row.partition_key: row for row in self.rows}

    @property
    def partition_keys(self) -> list[str]:
        return [row.partition_key for row in self.rows]


def _param(name: str, text: str) -> Any:
    """A parameter cell's text as its field reads it: integers exactly (``81``, or ``81.0``
    from a float column), anything else as text for the request's own validation."""
    if name in INT_PARAMS:
        return integer_text(text)
    return text.strip()


_KVID_COLUMNS = frozenset(ROW_COLUMNS) | frozenset(PARAM_COLUMNS)


class _FieldError(ValueError):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


def _texts(record: Mapping[Any, Any]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """The record's non-empty cells as exact text, and the first cell that has none (the
    others are still read: the key and the prompt name an invalid row too)."""
    texts: dict[str, str] = {}
    problem: tuple[str, str] | None = None
    for name, value in record.items():
        try:
            text = cell_text(value)
        except CellError as exc:
            problem = problem or (str(name), str(exc))
            continue
        if text is not None:
            texts[str(name)] = text
    return texts, problem


def _image_cell(texts: Mapping[str, str], target: str) -> tuple[str, str | None]:
    """(the column it came from, its value) for ``image`` or ``end_image``, whichever of its
    names the table uses: ``image_url`` must be a URL, ``image_file`` a local file."""
    given = [c for c in IMAGE_COLUMNS[target] if c in texts]
    if not given:
        return target, None
    if len(given) > 1:
        raise _FieldError(given[1], f"conflicts with {given[0]}: give the image once")
    column, value = given[0], texts[given[0]].strip()
    if column.endswith("_url") and "://" not in value:
        raise _FieldError(column, f"{_short(value)} is not a URL (a local file goes in {target})")
    if column.endswith("_file") and "://" in value:
        raise _FieldError(column, f"{_short(value)} is a URL: put it in {target}_url")
    return column, value


def _derived_key(request: KvidRequest) -> str:
    return "p-" + request.canonical_hash()[:12]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: the columns a project may give a default for (a row's own non-empty cell wins)
DEFAULTABLE_COLUMNS = ("model", *PARAM_COLUMNS)


def checked_param_defaults(values: Mapping[str, Any]) -> dict[str, str]:
    """``values`` (from Python or YAML) as the exact texts a cell would hold, each checked to
    be a kvid parameter: a misspelt default would otherwise be sent to no one, silently."""
    defaults: dict[str, str] = {}
    for name, value in values.items():
        if name not in DEFAULTABLE_COLUMNS:
            near = find_misspelling([name])
            hint = f" (did you mean {near[1]!r}?)" if near else ""
            raise ValueError(
                f"param_defaults: {name!r} is not a kvid parameter{hint}; allowed: "
                + ", ".join(DEFAULTABLE_COLUMNS)
            )
        try:
            text = cell_text(value)
        except CellError as exc:
            raise ValueError(f"param_defaults: {name}: {exc}") from None
        if text is not None:
            defaults[name] = text
    return defaults


def _parse_record(
    index: int,
    record: Mapping[Any, Any],
    images_at: ImageBase,
    known_problem: tuple[str, str] | None,
    dialect: ApiDialect,
    defaults: Mapping[str, str],
) -> tuple[PromptRow, bool] | InvalidRow:
    """One record: its valid row (and whether its key was given), or why it is invalid."""
    texts, problem = _texts(record)
    texts = {**defaults, **texts}  # a default fills an empty or missing cell only
    prompt_text = texts.get("prompt", "")
    raw_prompt = record.get("prompt")
    # a prompt refused for what it holds is still shown (the ledger stores what it can of it)
    excerpt = prompt_text or (raw_prompt if isinstance(raw_prompt, str) else "")
    key: str | None = None

    def invalid(field_name: str, reason: str) -> InvalidRow:
        # only a safe key names the row: any other is what the row is refused for, and may
        # be one the ledger cannot store (too long, a NUL); the reason shows it
        safe = key if key is not None and PROMPT_ID_PATTERN.fullmatch(key) else None
        return InvalidRow(index, safe, field_name, reason, excerpt[:200])

    if "prompt_id" in texts:
        try:
            key = key_text(texts["prompt_id"])
        except CellError as exc:
            key = texts["prompt_id"].strip()
            return invalid("prompt_id", str(exc))
    if known_problem is not None:
        return invalid(*known_problem)
    if problem is not None:
        return invalid(*problem)
    if key is not None and not PROMPT_ID_PATTERN.fullmatch(key):
        return invalid(
            "prompt_id",
            f"{_short(key)} is not a safe key: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    if not prompt_text.strip():
        return invalid("prompt", "is empty: every row needs a prompt")
    params: dict[str, Any] = {}
    for name in (n for n in PARAM_COLUMNS if n in texts):
        try:
            params[name] = _param(name, texts[name])
        except CellError as exc:
            return invalid(name, str(exc))
    try:
        images = {target: _image_cell(texts, target) for target in IMAGE_COLUMNS}
    except _FieldError as exc:
        return invalid(exc.field, exc.reason)
    job = texts.get("job")
    model = texts.get("model")
    image_column, image = images["image"]
    try:  # a relative image under a remote table: its local copy (the same bytes)
        fetched = None if image is None else images_at.fetch(image)
    except ImageUnavailable as exc:
        return invalid(image_column, str(exc))

    def build(api: ApiDialect) -> KvidRequest:
        return build_request(
            prompt_text,
            dialect=api,
            job=None if job is None else job.strip(),
            model=None if model is None else model.strip(),
            image=image if fetched is None else fetched.path,
            end_image=images["end_image"][1],
            base_dir=images_at.local_dir,
            **params,
        )

    try:
        request = build(dialect)
    except KvidError as exc:
        field_name = getattr(exc, "field", None) or "row"
        reason = str(exc) + _other_dialect_note(build, dialect)
        if fetched is not None and reason.startswith("image="):
            # "image='<local copy>' is not ...": name the image the table names instead
            reason = f"image={fetched.url!r} {reason.partition(' ')[2]}"
        return invalid(image_column if field_name == "image" else field_name, reason)
    except (TypeError, ValueError, OSError, RuntimeError) as exc:
        # never let one row stop the table: an unreadable image file ("~nobody/x.png", a name
        # too long for the file system) is that row's problem
        return invalid(image_column if image is not None else "row", f"{type(exc).__name__}: {exc}")
    recorded: dict[str, Any] = dict(params)
    recorded.update({n: texts[n].strip() for n in ("job", "model") if n in texts})
    recorded.update({column: value for column, value in images.values() if value is not None})
    row = PromptRow(
        partition_key=key or _derived_key(request),
        row_number=index,
        request=request,
        request_hash=request.canonical_hash(),
        params=recorded,
        user_columns={c: t for c, t in texts.items() if c and c not in _KVID_COLUMNS},
    )
    return row, key is not None


def _other_dialect_note(build: Callable[[ApiDialect], KvidRequest], dialect: ApiDialect) -> str:
    """Where a row is valid in the other dialect, say so: the fix is a setting, not the row."""
    other = next(d for d in ApiDialect if d is not dialect)
    try:
        build(other)
    except (KvidError, TypeError, ValueError, OSError, RuntimeError):
        return ""
    return (
        f" (the row is valid in the {other} dialect; this project speaks {dialect}: "
        f"set KVID_API_DIALECT={other} to send it)"
    )


def parse_rows(
    records: Sequence[Mapping[str, Any]],
    base_dir: ImageBase | Path | None,
    row_problems: Mapping[int, tuple[str, str]] | None = None,
    *,
    dialect: ApiDialect | str = ApiDialect.VIDEO,
    defaults: Mapping[str, Any] | None = None,
) -> PromptTable:
    """Validate records (one mapping per row) into a :class:`PromptTable` (source left empty).

    ``base_dir``: where relative image paths resolve (a folder, or an :class:`ImageBase`; None:
    the working directory). ``row_problems`` (row number -> (field, reason)): rows the
    reader already found broken.
    ``defaults``: see :func:`checked_param_defaults`; each is validated in every row it fills,
    as if the row held it. Every record becomes exactly one valid or one invalid row.
    """
    filled = checked_param_defaults(defaults or {})
    table = PromptTable()
    images_at = base_dir if isinstance(base_dir, ImageBase) else ImageBase(base_dir)
    row_problems = row_problems or {}
    api = ApiDialect(dialect)
    candidates: list[tuple[PromptRow, bool]] = []  # (row, key was given explicitly)
    for index, record in enumerate(records, start=1):
        parsed = _parse_record(index, record, images_at, row_problems.get(index), api, filled)
        if isinstance(parsed, InvalidRow):
            table.invalid.append(parsed)
        else:
            candidates.append(parsed)

    counts = Counter(row.partition_key for row, explicit in candidates if explicit)
    seen: set[str] = set()
    for row, explicit in candidates:
        key = row.partition_key
        if explicit and counts[key] > 1:
            rows = [str(r.row_number) for r, e in candidates if e and r.partition_key == key]
            table.invalid.append(
                InvalidRow(
                    row.row_number,
                    key,
                    "prompt_id",
                    f"duplicate prompt_id {key!r} (rows {', '.join(rows)}): keys must be unique",
                    row.prompt[:200],
                )
            )
            continue
        if key in seen:
            table.invalid.append(
                InvalidRow(
                    row.row_number,
                    key,
                    "prompt_id",
                    f"row repeats an earlier row with the same key {key!r}",
                    row.prompt[:200],
                )
            )
            continue
        seen.add(key)
        table.rows.append(row)
    table.invalid.sort(key=lambda r: r.row_number)
    return table


def load_prompt_table(
    source: PromptSource | pd.DataFrame | str | os.PathLike[str],
    *,
    dialect: ApiDialect | str = ApiDialect.VIDEO,
    defaults: Mapping[str, Any] | None = None,
) -> PromptTable:
    """Read a prompt table from ``source`` (a :class:`~kvid_dagster.core.sources.PromptSource`, or
    anything :func:`~kvid_dagster.core.sources.prompt_source` takes: a path, a URL, a DataFrame) and
    validate it into requests of ``dialect``; relative image paths resolve against the source's
    folder; ``defaults`` fill the rows' empty kvid cells.

    Raises :class:`PromptTableError` for a table no row of which may be sent: unreadable, or
    with a column that looks like a misspelt kvid field (its rows would be paid with the
    field's default); :class:`~kvid_dagster.core.sources.PromptSourceUnavailable` (a
    PromptTableError) when it cannot be had now: missing, unreachable, still being written.
    """
    chosen = prompt_source(source)
    read = chosen.read()
    where = chosen.describe()
    _check_spelling(where, read.columns)
    table = parse_rows(
        read.records,
        base_dir=read.images,
        row_problems=read.problems,
        dialect=dialect,
        defaults=defaults,
    )
    table.source = where
    table.fingerprint = read.fingerprint
    columns = read.columns
    table.user_columns = tuple(c for c in columns if c and c not in _KVID_COLUMNS)
    if "" in columns:
        table.warnings.append("columns without a name are ignored")
    return table


def find_misspelling(columns: Sequence[str]) -> tuple[str, str] | None:
    """(column, the kvid field it resembles) for the first unknown column that is within a
    small edit distance of a kvid field (``num_frame``, ``seeds``, ``Seed``), else None."""
    for column in columns:
        if not column or column in _KVID_COLUMNS:
            continue
        distance, field_name = min((_edit_distance(column.lower(), f), f) for f in _KVID_COLUMNS)
        if distance <= min(_MAX_MISSPELLING, max(1, len(field_name) // 4)):
            return column, field_name
    return None


def _check_spelling(where: str, columns: Sequence[str]) -> None:
    found = find_misspelling(columns)
    if found is not None:
        column, field_name = found
        raise PromptTableError(
            f"prompt table {where}: column {column!r} looks like the kvid field {field_name!r}; "
            f"rename it to {field_name!r} (or, if it is your own column, to something further "
            "from kvid's fields). No row of this table is sent until then: each would be paid "
            "with that field's default"
        )


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance (a swap of two neighbours counts once)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]
