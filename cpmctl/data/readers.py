"""Input files for `data build`: finding them, and cutting them into chunks for the workers.

The main process streams every input once (decompressing gzip/zstd, recognised by their magic
bytes, and hashing the bytes on disk for provenance) and cuts the stream at record boundaries
into chunks of about `chunk_bytes`; workers parse and clean the chunks. Reading in one place
keeps the order, and with it the output, independent of the worker count.

Problems with a file (binary, unreadable, a corrupt compressed stream) never stop the build:
they are recorded in the file's `FileReport` and shown as warnings.

A record (line, or paragraph) longer than `max_record_bytes` is never held whole: once the
bytes read without a record boundary pass that bound, the rest of the record is read and
counted but not kept, and the chunk reports it in `oversized` (a `too_long` document). The
bound is a multiple of --max-chars (`record_limit`), so a 2 GB line in a 2 MB gzip file costs
a few MB of memory, not 2 GB.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from cpmctl.artifacts import sha256_file
from cpmctl.errors import CpmError

INPUT_FORMATS = ("text", "jsonl", "parquet")
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BINARY_PROBE = 8192


@dataclass(frozen=True)
class Source:
    """One input: a file, or standard input (path None)."""

    name: str
    path: Path | None
    format: str


@dataclass
class FileReport:
    """What happened to one input; ends up in the corpus's stats.json."""

    path: str
    format: str
    compression: str | None = None
    status: str = "ok"  # ok | empty | binary | unreadable
    error: str | None = None
    bytes: int = 0
    documents: int = 0
    digest: str | None = None

    def fail(self, status: str, error: str) -> None:
        self.status, self.error, self.digest = status, error, None


@dataclass
class Chunk:
    """A slice of one input, cut at record boundaries: raw bytes, or Parquet rows."""

    source: str
    format: str
    first_line: int
    disk_bytes: int
    data: bytes = b""
    rows: list[dict] = field(default_factory=list)
    oversized: list[tuple[int, int]] = field(default_factory=list)
    """Records too long to keep, dropped while reading: (first line, raw bytes)."""


def record_limit(max_chars: int) -> int:
    """Raw bytes after which a record is dropped unread as too long: 8 bytes a character, room
    for UTF-8's 4-byte characters and for markup that cleaning removes."""
    return 8 * max_chars + 1024


def guess_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    if last in _JSONL_SUFFIXES:
        return "jsonl"
    if last in _PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def resolve_inputs(inputs: list[str], forced_format: str | None = None) -> list[Source]:
    """Expand folders (recursively, sorted, hidden entries skipped); check that inputs exist."""
    if forced_format is not None and forced_format not in INPUT_FORMATS:
        raise CpmError(f"--format must be one of {', '.join(INPUT_FORMATS)}, not {forced_format!r}")
    if inputs.count("-") > 1:
        raise CpmError("'-' (standard input) can be given only once")
    sources: list[Source] = []
    for item in inputs:
        if item == "-":
            sources.append(Source("-", None, forced_format or "text"))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(
                (p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            sources += [Source(str(p), p, forced_format or guess_format(p)) for p in files]
        elif path.exists():
            sources.append(Source(item, path, forced_format or guess_format(path)))
        else:
            raise CpmError(f"input not found: {item}")
    if not sources:
        raise CpmError(f"no input files in {', '.join(inputs)}")
    return sources


class _HashingReader(io.RawIOBase):
    """Counts and hashes the bytes read from the underlying (on-disk) stream."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self.sha256.update(data)
        self.count += len(data)
        buffer[: len(data)] = data
        return len(data)


def _zstd_blocks(buffered, block_bytes: int) -> Iterator[bytes]:
    """Decompress concatenated zstd frames. NOTE: zstandard's stream_reader ends silently at
    a truncated frame, so we drive decompressobj ourselves and check that the last frame ended."""
    context = zstandard.ZstdDecompressor()
    frame = context.decompressobj()
    in_frame = False
    # Small reads bound the output of one decompress call (zstd can expand 1000-fold).
    while data := buffered.read(1 << 16):
        while data:
            in_frame = True
            out = frame.decompress(data)
            for start in range(0, len(out), block_bytes):
                yield out[start : start + block_bytes]
            data = b""
            if frame.eof:
                data, frame, in_frame = frame.unused_data, context.decompressobj(), False
    if in_frame:
        raise EOFError("zstd stream ends inside a frame (truncated file)")


def _decompressed_blocks(raw: _HashingReader, report: FileReport, block_bytes: int):
    """The input's bytes in blocks, decompressed when the magic bytes say gzip or zstd."""
    buffered = io.BufferedReader(raw, buffer_size=1 << 16)
    magic = buffered.peek(4)[:4]
    if magic.startswith(_ZSTD_MAGIC):
        report.compression = "zstd"
        yield from _zstd_blocks(buffered, block_bytes)
        return
    stream = buffered
    if magic.startswith(_GZIP_MAGIC):
        report.compression = "gzip"
        stream = gzip.GzipFile(fileobj=buffered)
    while block := stream.read(block_bytes):
        yield block


def _cut(buffer: bytes, split: str) -> int:
    """Where to cut `buffer` so the head holds only whole records (0: no boundary yet)."""
    if split == "paragraph":
        cut = max(buffer.rfind(b"\n\n"), buffer.rfind(b"\n\r\n"))
        return cut + 1 if cut >= 0 else 0
    return buffer.rfind(b"\n") + 1


def _boundary(split: str) -> bytes:
    return b"\n\n" if split == "paragraph" else b"\n"


def _stream_chunks(
    source: Source, report: FileReport, chunk_bytes: int, split: str, max_record_bytes: int
) -> Iterator[Chunk]:
    opened = open(source.path, "rb") if source.path is not None else sys.stdin.buffer
    raw = _HashingReader(opened)
    record_split = split if source.format == "text" else "line"
    boundary = _boundary(record_split)
    line = 1
    pending = b""
    disk_mark = 0
    skipped = None  # (first line, bytes so far) of an over-long record being read past
    try:
        first = True
        for block in _decompressed_blocks(raw, report, chunk_bytes):
            if first:
                first = False
                nul = block.find(b"\0", 0, _BINARY_PROBE)
                if nul >= 0:
                    report.fail("binary", f"binary data (NUL byte at offset {nul})")
                    return
            if skipped is not None:
                # keep the last bytes: a paragraph boundary may straddle two blocks
                carry = pending[-(len(boundary) - 1):] if len(boundary) > 1 else b""
                window = carry + block
                end = window.find(boundary)
                if end < 0:
                    skipped = (skipped[0], skipped[1] + len(block))
                    line += block.count(b"\n")
                    pending = window[-(len(boundary) - 1):] if len(boundary) > 1 else b""
                    continue
                size = skipped[1] + end - len(carry)  # the record's bytes, boundary excluded
                end += len(boundary) - len(carry)  # in `block`: the first byte after it
                line += block[:end].count(b"\n")
                yield Chunk(source.name, source.format, line, raw.count - disk_mark,
                            oversized=[(skipped[0], size)])
                disk_mark = raw.count
                skipped, pending, block = None, b"", block[end:]
            pending += block
            cut = _cut(pending, record_split)
            if cut:
                head, pending = pending[:cut], pending[cut:]
                yield Chunk(source.name, source.format, line, raw.count - disk_mark, data=head)
                disk_mark = raw.count
                line += head.count(b"\n")
            if len(pending) > max_record_bytes:  # the record in pending has no end in sight
                skipped = (line, len(pending))
                line += pending.count(b"\n")
                pending = pending[-(len(boundary) - 1):] if len(boundary) > 1 else b""
        if first:
            report.status = "empty"
        if skipped is not None:
            yield Chunk(source.name, source.format, line, raw.count - disk_mark,
                        oversized=[skipped])
        elif pending:
            yield Chunk(source.name, source.format, line, raw.count - disk_mark, data=pending)
        report.bytes = raw.count
        report.digest = "sha256:" + raw.sha256.hexdigest()
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        report.bytes = raw.count
        report.fail("unreadable", f"{type(exc).__name__}: {exc} (after {raw.count:,} bytes)")
    finally:
        if source.path is not None:
            opened.close()


def _parquet_chunks(source: Source, report: FileReport, text_field: str) -> Iterator[Chunk]:
    try:
        parquet = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as exc:
        report.fail("unreadable", f"not a readable Parquet file ({exc})")
        return
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise CpmError(
            f"{source.name}: no column {text_field!r} (columns: {', '.join(columns)}); "
            f"choose one with --text-field"
        )
    size = source.path.stat().st_size
    total_rows = max(parquet.metadata.num_rows, 1)
    row = 1
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            rows = batch.to_pylist()
            yield Chunk(source.name, "parquet", row, size * len(rows) // total_rows, rows=rows)
            row += len(rows)
    except (OSError, pa.ArrowException) as exc:
        report.fail("unreadable", f"{type(exc).__name__}: {exc} (after row {row - 1})")
        return
    if parquet.metadata.num_rows == 0:
        report.status = "empty"
    report.bytes = size
    report.digest = "sha256:" + sha256_file(source.path)


def read_chunks(
    source: Source, report: FileReport, *, chunk_bytes: int, split: str, text_field: str,
    max_record_bytes: int = record_limit(100_000),
) -> Iterator[Chunk]:
    """Stream one input as chunks; problems are recorded in `report`, never raised."""
    if source.format == "parquet":
        if source.path is None:
            raise CpmError("Parquet cannot be read from standard input; pass a file")
        yield from _parquet_chunks(source, report, text_field)
        return
    try:
        yield from _stream_chunks(source, report, chunk_bytes, split, max_record_bytes)
    except OSError as exc:  # could not even open it: permissions, a special file
        report.fail("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
