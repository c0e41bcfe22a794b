"""Corpus shards: zstd Parquet files with columns id, text, source, meta (+ reason when rejected).

Shards are cut by the UTF-8 size of their text (`--shard-size`) and row groups by row count,
both decided only by the documents written, so the same documents give the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cpmctl.errors import CpmError

DOCUMENT_COLUMNS = ("id", "text", "source", "meta")
CORPUS_SCHEMA = pa.schema([(name, pa.string()) for name in DOCUMENT_COLUMNS])
REJECTED_SCHEMA = CORPUS_SCHEMA.append(pa.field("reason", pa.string()))
# Small row groups: `data tokenize` works on slices of them, and decodes a whole group for one.
_ROW_GROUP_ROWS = 2048
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(text: str, option: str = "--shard-size") -> int:
    """A byte size as options write it (every option that takes one: --shard-size,
    --memory-budget, --max-shard-size, ...): '64MB' -> 64_000_000; '1GiB' -> 2**30; '500k' ->
    500_000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise CpmError(f"{option}: cannot read {text!r} as a size (say 64MB, 1GiB or 500KB)")
    return int(float(match.group(1)) * _UNITS[unit])


def meta_json(meta: dict) -> str:
    """Meta as JSON; falls back to ASCII escapes when a value holds a lone surrogate."""
    try:
        text = json.dumps(meta, ensure_ascii=False, default=str)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(meta, ensure_ascii=True, default=str)


class ShardWriter:
    """Writes rows into `folder/part-NNNNN.parquet`, a new shard every `shard_bytes` of text."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_bytes: int):
        self.folder = folder
        self.schema = schema
        self.shard_bytes = shard_bytes
        self.paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._columns: list[list] = [[] for _ in schema.names]
        self._shard_text_bytes = 0

    def add(self, row: tuple) -> None:
        for column, value in zip(self._columns, row, strict=True):
            column.append(value)
        self._shard_text_bytes += len(row[1].encode("utf-8"))
        if len(self._columns[0]) >= _ROW_GROUP_ROWS:
            self._flush_rows()
        if self._shard_text_bytes >= self.shard_bytes:
            self._close_shard()

    def _flush_rows(self) -> None:
        if not self._columns[0]:
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"part-{len(self.paths):05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.paths.append(path)
        columns = dict(zip(self.schema.names, self._columns, strict=True))
        table = pa.table(columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=_ROW_GROUP_ROWS)
        self._columns = [[] for _ in self.schema.names]

    def _close_shard(self) -> None:
        self._flush_rows()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shard_text_bytes = 0

    def close(self) -> list[Path]:
        self._close_shard()
        return self.paths


def shard_paths(corpus_dir: Path, folder: str = "shards") -> list[Path]:
    return sorted((corpus_dir / folder).glob("part-*.parquet"))


@contextmanager
def reading(path: Path):
    """Around every read of a corpus shard: a damaged one is a CpmError naming it."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise CpmError(f"{path}: unreadable Parquet shard ({str(exc).splitlines()[0][:200]}); "
                       "`cpmctl data inspect --verify` checks the corpus") from None


def iter_documents(corpus_dir: Path, folder: str = "shards", columns=None) -> Iterator[dict]:
    """Every row of a corpus's shards in order, without loading a shard whole."""
    for path in shard_paths(corpus_dir, folder):
        with reading(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
                yield from batch.to_pylist()
