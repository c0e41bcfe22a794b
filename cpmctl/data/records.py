"""Parsing a chunk into records: plain text (a document per line or per paragraph), JSONL,
or Parquet rows. Runs in the workers.

Each record's meta holds its position (`line`, or `row` for Parquet) and, for JSONL and
Parquet, the record's other fields; the position wins over a field of the same name.

A record that cannot be a document (invalid UTF-8, malformed JSON, a missing text field) is
returned with its rejection reason, so it is counted and can be written to `rejected/`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from cpmctl.data.readers import Chunk


@dataclass
class Record:
    text: str
    meta: dict
    raw_bytes: int
    reason: str | None = None  # None: a document to clean; else why it was rejected
    detail: str = ""  # for a rejection: what exactly was wrong (shown in warnings)


def _decode(raw: bytes, meta: dict) -> Record:
    try:
        return Record(raw.decode("utf-8"), meta, len(raw))
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", "backslashreplace")
        return Record(text, meta, len(raw), "invalid_utf8", f"invalid UTF-8 at byte {exc.start}")


def _text_records(chunk: Chunk, split: str) -> Iterator[Record]:
    lines = chunk.data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if split == "line":
        for offset, line in enumerate(lines):
            if line.strip():
                yield _decode(line.rstrip(b"\r"), {"line": chunk.first_line + offset})
        return
    paragraph: list[bytes] = []
    start = chunk.first_line
    for offset, line in enumerate([*lines, b""]):
        if line.strip():
            if not paragraph:
                start = chunk.first_line + offset
            paragraph.append(line.rstrip(b"\r"))
        elif paragraph:
            yield _decode(b"\n".join(paragraph), {"line": start})
            paragraph = []


def _field_record(value, meta: dict, raw_bytes: int, text_field: str) -> Record:
    if value is None:
        return Record("", meta, raw_bytes, "missing_field", f"no field {text_field!r}")
    if not isinstance(value, str):
        kind = type(value).__name__
        return Record(str(value), meta, raw_bytes, "missing_field",
                      f"field {text_field!r} is {kind}, not a string")
    return Record(value, meta, raw_bytes)


def _jsonl_records(chunk: Chunk, text_field: str) -> Iterator[Record]:
    for offset, line in enumerate(chunk.data.split(b"\n")):
        if not line.strip():
            continue
        position = {"line": chunk.first_line + offset}
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            text = line.decode("utf-8", "backslashreplace")
            yield Record(text, position, len(line), "malformed_json", f"malformed JSON ({exc})")
            continue
        if not isinstance(value, dict):
            text = line.decode("utf-8", "backslashreplace")
            yield Record(text, position, len(line), "malformed_json",
                         f"a JSON {type(value).__name__}, not an object")
            continue
        text = value.pop(text_field, None)
        yield _field_record(text, {**value, **position}, len(line), text_field)


def _parquet_records(chunk: Chunk, text_field: str) -> Iterator[Record]:
    for offset, row in enumerate(chunk.rows):
        text = row.pop(text_field, None)
        raw_bytes = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
        yield _field_record(text, {**row, "row": chunk.first_line + offset}, raw_bytes, text_field)


def parse_chunk(chunk: Chunk, split: str, text_field: str) -> Iterator[Record]:
    if chunk.format == "parquet":
        return _parquet_records(chunk, text_field)
    if chunk.format == "jsonl":
        return _jsonl_records(chunk, text_field)
    return _text_records(chunk, split)
