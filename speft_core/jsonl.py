"""JSONL lines and their fields: decoding, one JSON object a line, typed checks naming the line.

Decisions kept here once (speft_core/data.py and speft_core/chat_data.py read rows through them):
- Lines are numbered from 1, blank lines included; blank lines are skipped; a UTF-8 BOM is
  allowed at the very start of the file only. A line is refused (naming it) when it is not
  UTF-8, not JSON (including JSON nested deeper than the parser's recursion limit, or an integer
  beyond Python's digit limit) or not an object.
- A string holding a lone surrogate (`"\\ud800"`) is refused: it cannot be encoded again.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import DatasetFormatError

_BOM = "\ufeff"
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_objects(lines: Iterable[bytes | str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DatasetFormatError names a bad line."""
    for number, raw in enumerate(lines, start=1):
        text = _decode_line(raw, number)
        if number == 1:
            text = text.removeprefix(_BOM)
        if not text.strip():
            continue
        row = _load_json(text.rstrip("\r\n"), number)
        if not isinstance(row, dict):
            raise DatasetFormatError(f"expected a JSON object, got {json_type(row)}", line=number)
        yield number, row


class JSONSyntaxError(ValueError):
    """Text that is not JSON at all (as opposed to JSON Python cannot hold)."""


def loads_json(text: str) -> Any:
    """`json.loads(text)`; ValueError saying why for JSON Python cannot hold (nested too deeply,
    an integer beyond the interpreter's digit limit), JSONSyntaxError for text that is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONSyntaxError(f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:  # an integer literal beyond the interpreter's digit limit
        raise ValueError(f"an integer longer than {sys.get_int_max_str_digits()} digits") from None


def required_str(row: dict[str, Any], name: str, line: int, *, non_empty: bool,
                 where: str | None = None) -> str:
    """row[name] as a string; errors name `where` (a path such as messages[2].content) or name."""
    where = where or name
    shown = f"{where!r}" if where == name else where
    if name not in row:
        raise DatasetFormatError(f"missing required field {shown}", line=line, param=where)
    value = row[name]
    if not isinstance(value, str):
        raise DatasetFormatError(
            f"{shown} must be a string, got {json_type(value)}", line=line, param=where
        )
    if non_empty and not value.strip():
        raise DatasetFormatError(f"{shown} must not be empty", line=line, param=where)
    check_encodable(value, where, line)
    return value


def check_encodable(value: str, name: str, line: int | None) -> None:
    """Refuse a lone surrogate (JSON `"\\ud800"`): no UTF-8 encoder or tokenizer takes it."""
    found = _SURROGATE.search(value)
    if found is not None:
        raise DatasetFormatError(
            f"{name!r} holds a lone surrogate (\\u{ord(found.group()):04x} at character "
            f"{found.start()}); escape a character outside the BMP as a surrogate pair",
            line=line, param=name,
        )


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message: 'a string', 'null', 'an array'…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def is_int(value: Any) -> bool:
    """Whether a JSON value is an integer (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_line(raw: bytes | str, line: int) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(
            f"not valid UTF-8 (bad byte at offset {err.start} of the line)", line=line
        )


def _load_json(text: str, line: int) -> Any:
    try:
        return loads_json(text)
    except ValueError as err:
        if "\r" in text and isinstance(err, JSONSyntaxError):  # CR is whitespace: a line break
            raise DatasetFormatError(
                "invalid JSON: lines end in a carriage return alone (CR, old Mac style); "
                "end each line with LF or CRLF", line=line) from None
        raise DatasetFormatError(f"invalid JSON ({err})", line=line) from None
