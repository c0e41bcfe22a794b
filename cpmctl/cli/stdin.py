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
    """(the JSON object on stdin line `number`, its `field`)."""
    try:
        record = json.loads(line)
        return record, record[field]
    except (ValueError, KeyError, TypeError):
        raise CpmError(f"stdin line {number}: expected a JSON object with {field!r}") from None
