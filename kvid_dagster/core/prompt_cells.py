"""Prompt-table cells as text, typed by the kvid field rules, whatever wrote or holds the table.

A table re-saved by pandas after one blank cell turns an integer column into float64: Parquet
then holds ``1.0`` and CSV the text ``"1.0"``. Read as written, the key ``1`` becomes ``1.0``
(every row paid again under new keys) and ``seed`` 7 becomes 7.0. So every cell is first made
text exactly (:func:`cell_text`), then each field reads that text by its own rule: an integer
written as a whole float is that integer, a fractional one is an error, and a float beyond 2^53
(where a float no longer holds every integer) is refused as lossy, never rounded.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import pandas as pd

from kvid_dagster.ledger import unstorable_at

#: Beyond this a float64 cannot hold every integer: its digits may already be gone.
EXACT_FLOAT_LIMIT = 2**53
_DIGITS = re.compile(r"[+-]?\d+")
# what a float looks like as text (pandas, Excel, repr): a point or an exponent
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+|\d*\.\d+[eE][+-]?\d+)")


class CellError(ValueError):
    """A cell whose value cannot be read for its field (the row is invalid, not the table)."""


def is_empty(value: Any) -> bool:
    """None, NaN, pandas NA/NaT, or only whitespace: the cell means the API default."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, str) and value.strip() == ""


def cell_text(value: Any) -> str | None:
    """A cell (a CSV string, or any value pandas read from Parquet) as exact text; None when
    empty. Raises :class:`CellError` for a value no text would represent faithfully, or text
    the ledger could not store as written (every cell of a row is stored with it)."""
    text = _text(value)
    if text is not None and (at := unstorable_at(text)) is not None:
        char = text[at]
        what = (
            "a NUL character (0x00)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
        )
        raise CellError(
            f"holds {what} at character {at + 1}, which the ledger cannot store: remove it"
        )
    return text


def _text(value: Any) -> str | None:
    if isinstance(value, np.generic):
        value = value.item()
    if is_empty(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, dt.datetime | dt.date | dt.time | pd.Timestamp):
        return value.isoformat()
    if isinstance(value, uuid.UUID):  # a database's uuid column, as its text form
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise CellError("holds bytes that are not UTF-8 text") from None
    if isinstance(value, list | tuple | np.ndarray):
        items = [cell_text(v) for v in value]
        return json.dumps(items, ensure_ascii=False)
    raise CellError(f"holds a {type(value).__name__}, which is not a table value")


def _float_text(value: float) -> str:
    if not math.isfinite(value):
        raise CellError(f"is {value!r}, not a number a request can carry")
    if value.is_integer():
        if abs(value) > EXACT_FLOAT_LIMIT:
            raise CellError(_lossy(repr(value)))
        return str(int(value))
    return repr(value)  # the shortest text that reads back as the same float


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        raise CellError(f"is {value}, not a number a request can carry")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _lossy(shown: str) -> str:
    return (
        f"{shown} is a floating-point number beyond 2^53, so its digits may be lost: store the "
        "column as integers or as text"
    )


def key_text(text: str) -> str:
    """A prompt_id: a whole number written as a float (``1.0``, pandas' re-save of ``1``) is
    that number; any other text is kept as written."""
    stripped = text.strip()
    if _FLOAT_TEXT.fullmatch(stripped):
        number = _decimal(stripped)
        if abs(number) > EXACT_FLOAT_LIMIT:
            raise CellError(_lossy(stripped))
        if number == number.to_integral_value():
            return str(int(number))
    return stripped


def integer_text(text: str) -> int:
    """An integer field's cell: digits, or a whole number written as a float."""
    stripped = text.strip()
    if _DIGITS.fullmatch(stripped):
        return int(stripped)
    if _FLOAT_TEXT.fullmatch(stripped):
        number = _decimal(stripped)
        if abs(number) > EXACT_FLOAT_LIMIT:
            raise CellError(_lossy(stripped))
        if number != number.to_integral_value():
            raise CellError(f"{stripped} is not a whole number")
        return int(number)
    raise CellError(f"{stripped[:60]!r} is not an integer")


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # the patterns above only let numbers through
        raise CellError(f"{text[:60]!r} is not a number") from None
