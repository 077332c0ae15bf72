"""The prompt table: one row per video, read from CSV or Parquet and validated row by row.

A bad row never takes the good ones down: every problem becomes an :class:`InvalidRow` naming the
row, its key, the field and the reason, and the valid rows go on. Only a table that cannot be read
at all (missing, not CSV/Parquet, no ``prompt`` column) raises :class:`PromptTableError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvid_dagster.client import KvidError, KvidRequest, build_request

# Columns that are not API parameters.
ROW_COLUMNS = ("prompt_id", "prompt", "job", "model", "image", "end_image")
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
)
INT_PARAMS = frozenset({"num_frames", "frames_per_second", "seed", "num_inference_steps"})
# A partition key is also a file name and a Dagster partition key: keep it boring.
PROMPT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_TABLE_BYTES = 256 * 1024 * 1024


class PromptTableError(ValueError):
    """The table as a whole cannot be read (rows are never reported this way)."""


@dataclass(frozen=True)
class PromptRow:
    """A valid row: its partition key and the typed request it turns into."""

    partition_key: str
    row_number: int  # 1-based data row (the CSV line is row_number + 1)
    request: KvidRequest
    request_hash: str
    params: Mapping[str, Any]  # the cells that were set, normalised, for the catalog

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def job_kind(self) -> str:
        return str(self.request.job_kind)

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class InvalidRow:
    """A row that will not be sent, and why."""

    row_number: int
    partition_key: str | None
    field: str
    reason: str
    prompt: str = ""

    @property
    def message(self) -> str:
        key = f" ({self.partition_key})" if self.partition_key else ""
        return f"row {self.row_number}{key}: {self.field}: {self.reason}"


@dataclass
class PromptTable:
    path: Path
    rows: list[PromptRow] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def by_key(self) -> dict[str, PromptRow]:
        return {row.partition_key: row for row in self.rows}

    @property
    def partition_keys(self) -> list[str]:
        return [row.partition_key for row in self.rows]


# (column names, one mapping per data row, {row number: (field, reason)} for rows already bad)
_Read = tuple[list[str], list[dict[str, Any]], dict[int, tuple[str, str]]]


def _read_table(path: Path) -> _Read:
    """Read a whole table; anything that makes the *file* unusable is a PromptTableError."""
    if not path.is_file():
        raise PromptTableError(f"prompt table {path} does not exist or is not a file")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise PromptTableError(f"prompt table {path} is larger than {MAX_TABLE_BYTES} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptTableError(f"prompt table {path} cannot be read: {exc}") from exc
    if path.suffix.lower() in {".parquet", ".pq"}:
        return _read_parquet(path, data)
    return _read_csv(path, data)


def _read_parquet(path: Path, data: bytes) -> _Read:
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises a zoo of types for a damaged or foreign file
        raise PromptTableError(
            f"prompt table {path} is not a readable Parquet file: {type(exc).__name__}: {exc}"
        ) from exc
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()  # a table saved with prompt_id as its index keeps its keys
    columns = [str(c).strip() for c in frame.columns]
    _check_columns(path, columns)
    frame.columns = columns
    return columns, frame.to_dict(orient="records"), {}


def _read_csv(path: Path, data: bytes) -> _Read:
    """Every cell as text (types are decided per field; an empty cell means the default).

    The csv module rather than pandas: a row with too many cells must be *that row's* error,
    not a silent shift of the first column into an index, and repeated column names must not
    be renamed ``prompt.1`` behind the user's back.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptTableError(
            f"prompt table {path} is not a readable UTF-8 CSV file: {exc}"
        ) from exc
    if csv.field_size_limit() < MAX_TABLE_BYTES:
        csv.field_size_limit(MAX_TABLE_BYTES)  # a huge cell is that row's error, not the file's
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[dict[str, Any]] = []
    problems: dict[int, tuple[str, str]] = {}
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or one of only delimiters: nothing to send
            if header is None:
                header = [cell.strip() for cell in cells]
                _check_columns(path, header)
                continue
            number = len(records) + 1
            if any(cell.strip() for cell in cells[len(header) :]):
                problems[number] = (
                    "row",
                    f"has {len(cells)} cells but the header names {len(header)} columns "
                    "(a missing quote or an extra delimiter?)",
                )
            records.append({name: cell for name, cell in zip(header, cells, strict=False) if name})
    except csv.Error as exc:
        raise PromptTableError(
            f"prompt table {path} is not a readable CSV file (line {reader.line_num}): {exc}"
        ) from exc
    if header is None:
        return ["prompt"], [], {}  # an empty file is an empty table
    return header, records, problems


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    if "prompt" not in columns:
        shown = ", ".join(c for c in columns if c)[:500] or "none"
        raise PromptTableError(f"prompt table {path} has no 'prompt' column (columns: {shown})")
    duplicates = sorted(c for c, n in Counter(columns).items() if n > 1 and c)
    if duplicates:
        raise PromptTableError(f"prompt table {path} repeats columns: {', '.join(duplicates)}")


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        if value is pd.NA or value is pd.NaT:
            return True
    except TypeError:
        pass
    return isinstance(value, str) and value.strip() == ""


def _cell(value: Any) -> Any:
    """A table cell as a Python value; ``None`` for an empty cell (the API default)."""
    if isinstance(value, np.generic):
        value = value.item()  # numpy scalar -> Python (arrays of a list column stay arrays)
    if _is_empty(value):
        return None
    return value


def _coerce_param(name: str, value: Any) -> Any:
    # CSV cells are text: an integer parameter written as "81" is the integer 81. Anything else is
    # passed through unchanged so that the request's own validation names the field and value.
    if name in INT_PARAMS and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _derived_key(request: KvidRequest) -> str:
    return "p-" + request.canonical_hash()[:12]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_rows(
    records: Sequence[Mapping[str, Any]],
    base_dir: Path | None,
    row_problems: Mapping[int, tuple[str, str]] | None = None,
) -> PromptTable:
    """Validate records (one mapping per row) into a :class:`PromptTable` (path left empty).

    ``row_problems`` (row number -> (field, reason)): rows the reader already found broken.
    Every record becomes exactly one valid or one invalid row, whatever its cells hold.
    """
    table = PromptTable(path=Path(base_dir or "."))
    row_problems = row_problems or {}
    candidates: list[tuple[PromptRow, bool]] = []  # (row, key was given explicitly)
    for index, record in enumerate(records, start=1):
        given_id = _cell(record.get("prompt_id"))
        key = None if given_id is None else str(given_id).strip()
        prompt = _cell(record.get("prompt"))
        prompt_text = prompt if isinstance(prompt, str) else ""

        def invalid(
            field_name: str,
            reason: str,
            *,
            _i: int = index,
            _k: str | None = key,
            _p: str = prompt_text,
        ) -> None:
            table.invalid.append(InvalidRow(_i, _k, field_name, reason, _p[:200]))

        if index in row_problems:
            invalid(*row_problems[index])
            continue
        if key is not None and not PROMPT_ID_PATTERN.fullmatch(key):
            invalid(
                "prompt_id",
                f"{_short(key)} is not a safe key: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
            continue
        if prompt is None:
            invalid("prompt", "is empty: every row needs a prompt")
            continue
        params = {
            name: _coerce_param(name, value)
            for name in PARAM_COLUMNS
            if (value := _cell(record.get(name))) is not None
        }
        job = _cell(record.get("job"))
        model = _cell(record.get("model"))
        image = _cell(record.get("image"))
        end_image = _cell(record.get("end_image"))
        try:
            request = build_request(
                prompt,
                job=None if job is None else str(job).strip(),
                model="v1" if model is None else str(model).strip(),
                image=None if image is None else str(image).strip(),
                end_image=None if end_image is None else str(end_image).strip(),
                base_dir=base_dir,
                **params,
            )
        except KvidError as exc:
            invalid(getattr(exc, "field", None) or "row", str(exc))
            continue
        except (TypeError, ValueError, OSError, RuntimeError) as exc:
            # never let one row stop the table: an unreadable image file ("~nobody/x.png", a name
            # too long for the file system) is that row's problem
            invalid("image" if image is not None else "row", f"{type(exc).__name__}: {exc}")
            continue
        recorded = dict(params)
        for name, value in (
            ("job", job),
            ("model", model),
            ("image", image),
            ("end_image", end_image),
        ):
            if value is not None:
                recorded[name] = str(value).strip()
        row = PromptRow(
            partition_key=key or _derived_key(request),
            row_number=index,
            request=request,
            request_hash=request.canonical_hash(),
            params=recorded,
        )
        candidates.append((row, key is not None))

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


def load_prompt_table(path: str | Path) -> PromptTable:
    """Read and validate a prompt table; relative image paths resolve against its folder."""
    path = Path(path).resolve()
    columns, records, problems = _read_table(path)
    table = parse_rows(records, base_dir=path.parent, row_problems=problems)
    table.path = path
    unknown = [c for c in columns if c and c not in ROW_COLUMNS and c not in PARAM_COLUMNS]
    if unknown:
        table.warnings.append(f"columns ignored (not kvid fields): {', '.join(unknown)}"[:2000])
    if "" in columns:
        table.warnings.append("columns without a name are ignored")
    return table


def table_fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of the table file (for sensors noticing changes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
