"""Reading stdin a line at a time, for the commands that take one input a line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from cpmctl.errors import CpmError


def stdin_lines() -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending); invalid UTF-8 is a CpmError naming the
    line."""
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            yield number, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise CpmError(f"stdin line {number}: invalid UTF-8 at byte {exc.start}") from None


def json_field(number: int, line: str, field: str):
    """(the JSON object on stdin line `number`, its `field`). Every string in the record must be
    text UTF-8 can hold: JSON's "\\ud800" escapes can spell lone surrogates, which no tokenizer
    encodes and no output can print."""
    try:
        record = json.loads(line)
        value = record[field]
    except (ValueError, KeyError, TypeError):
        raise CpmError(f"stdin line {number}: expected a JSON object with {field!r}") from None
    _check_text(record, f"stdin line {number}")
    return record, value


def _check_text(value, where: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _check_text(key, where)
            _check_text(inner, where)
    elif isinstance(value, list):
        for inner in value:
            _check_text(inner, where)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CpmError(f"{where}: the string {value[:20]!r} holds a lone surrogate "
                           f"{exc.object[exc.start]!r} (not text)") from None
