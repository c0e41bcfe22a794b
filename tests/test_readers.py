"""Finding inputs, cutting them into chunks, and parsing chunks into records
(cpmctl/data/readers.py and cpmctl/data/records.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cpmctl.data.readers import (
    Chunk,
    FileReport,
    Source,
    guess_format,
    read_chunks,
    resolve_inputs,
)
from cpmctl.data.records import parse_chunk
from cpmctl.errors import CpmError


def read_all(path: Path, fmt: str = "text", *, chunk_bytes: int = 1 << 20,
             split: str = "line", text_field: str = "text"):
    report = FileReport(str(path), fmt)
    chunks = list(read_chunks(Source(str(path), path, fmt), report, chunk_bytes=chunk_bytes,
                              split=split, text_field=text_field))
    return chunks, report


def disk_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def records(chunks, split="line", text_field="text"):
    return [r for chunk in chunks for r in parse_chunk(chunk, split, text_field)]


# --- resolve_inputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "text"),
        ("a", "text"),
        ("a.jsonl", "jsonl"),
        ("a.JSONL", "jsonl"),
        ("a.json", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.jsonl.zst", "jsonl"),
        ("a.jsonl.zstd", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("a.txt.gz", "text"),
        ("a.gz", "text"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("web.2024.jsonl", "jsonl"),
        ("a.tar.gz", "text"),
    ],
)
def test_guess_format(name, expected):
    assert guess_format(Path("some/dir") / name) == expected


def test_resolve_inputs_folder(tmp_path):
    root = tmp_path / "raw"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    for relative in ["b.txt", "a.jsonl", "sub/c.jsonl.zst", "sub/deeper/d.parquet",
                     ".hidden.txt", ".git/config", "sub/.DS_Store"]:
        (root / relative).write_bytes(b"x\n")
    sources = resolve_inputs([str(root)])
    assert [(Path(s.name).relative_to(root).as_posix(), s.format) for s in sources] == [
        ("a.jsonl", "jsonl"),
        ("b.txt", "text"),
        ("sub/c.jsonl.zst", "jsonl"),
        ("sub/deeper/d.parquet", "parquet"),
    ]
    assert all(s.path == Path(s.name) for s in sources)
    forced = resolve_inputs([str(root)], forced_format="text")
    assert [s.format for s in forced] == ["text"] * 4


def test_resolve_inputs_files_keep_order(tmp_path):
    (tmp_path / "z.txt").write_text("z")
    (tmp_path / "a.jsonl").write_text("{}")
    z, a = str(tmp_path / "z.txt"), str(tmp_path / "a.jsonl")
    sources = resolve_inputs([z, a])
    assert [(s.name, s.format) for s in sources] == [(z, "text"), (a, "jsonl")]
    # An explicitly named hidden file is read.
    (tmp_path / ".dot.txt").write_text("d")
    assert [s.name for s in resolve_inputs([str(tmp_path / ".dot.txt")])] == [
        str(tmp_path / ".dot.txt")
    ]


def test_resolve_inputs_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    sources = resolve_inputs(["-", str(tmp_path / "a.txt")])
    assert sources[0] == Source("-", None, "text")
    assert resolve_inputs(["-"], forced_format="jsonl") == [Source("-", None, "jsonl")]
    with pytest.raises(CpmError, match="only once"):
        resolve_inputs(["-", "-"])


def test_resolve_inputs_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(CpmError, match=f"input not found: {missing}"):
        resolve_inputs([str(tmp_path / "a.txt"), missing])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("h")
    with pytest.raises(CpmError, match="no input files in"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(CpmError, match="--format must be one of text, jsonl, parquet"):
        resolve_inputs([str(tmp_path / "a.txt")], forced_format="csv")


# --- read_chunks: compression ----------------------------------------------------------


def sample_lines(count: int = 600) -> bytes:
    return "".join(f"第{i}行：一些中文文本 line {i}\n" for i in range(1, count + 1)).encode()


@pytest.mark.parametrize(
    ("suffix", "compress", "compression"),
    [
        (".txt", lambda data: data, None),
        (".txt.gz", gzip.compress, "gzip"),
        (".txt.zst", lambda data: zstandard.ZstdCompressor().compress(data), "zstd"),
        # Compression is recognised by magic bytes, not by the name.
        (".txt", gzip.compress, "gzip"),
        (".dat", lambda data: zstandard.ZstdCompressor(write_content_size=False).compress(data),
         "zstd"),
    ],
)
def test_read_chunks_compression(tmp_path, suffix, compress, compression):
    data = sample_lines()
    path = tmp_path / f"input{suffix}"
    path.write_bytes(compress(data))
    chunks, report = read_all(path, chunk_bytes=4096)
    assert len(chunks) > 5
    assert b"".join(c.data for c in chunks) == data
    assert report.status == "ok" and report.error is None
    assert report.compression == compression
    assert report.bytes == path.stat().st_size
    assert report.digest == disk_digest(path)
    assert all(c.source == str(path) and c.format == "text" for c in chunks)


def test_read_chunks_multi_frame_zstd(tmp_path):
    first, second = sample_lines(100), b"second frame\n"
    path = tmp_path / "two.txt.zst"
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(compressor.compress(first) + compressor.compress(second))
    chunks, report = read_all(path)
    assert b"".join(c.data for c in chunks) == first + second
    assert report.status == "ok"


def test_read_chunks_multi_member_gzip(tmp_path):
    path = tmp_path / "two.txt.gz"
    path.write_bytes(gzip.compress(b"one\n") + gzip.compress(b"two\n"))
    chunks, report = read_all(path)
    assert b"".join(c.data for c in chunks) == b"one\ntwo\n"
    assert (report.status, report.compression) == ("ok", "gzip")


# --- read_chunks: boundaries -----------------------------------------------------------


def test_chunks_end_at_newlines_and_count_lines(tmp_path):
    data = b"".join(b"line %d %s\n" % (i, b"x" * (i % 7)) for i in range(1, 101))
    path = tmp_path / "lines.txt"
    path.write_bytes(data)
    chunks, report = read_all(path, chunk_bytes=50)
    assert b"".join(c.data for c in chunks) == data
    assert len(chunks) > 10
    line = 1
    for chunk in chunks:
        assert chunk.data.endswith(b"\n")
        assert chunk.first_line == line
        line += chunk.data.count(b"\n")
    parsed = records(chunks)
    assert [r.meta["line"] for r in parsed] == list(range(1, 101))
    assert [r.text for r in parsed] == data.decode().splitlines()
    assert sum(c.disk_bytes for c in chunks) == len(data) == report.bytes


def test_long_record_is_not_split(tmp_path):
    data = b"short\n" + b"y" * 300 + b"\nlast line without newline"
    path = tmp_path / "long.txt"
    path.write_bytes(data)
    chunks, _ = read_all(path, chunk_bytes=16)
    assert b"".join(c.data for c in chunks) == data
    assert [c.data for c in chunks] == [b"short\n", b"y" * 300 + b"\n",
                                        b"last line without newline"]
    assert [c.first_line for c in chunks] == [1, 2, 3]


PARAGRAPHS = (
    b"p1 line1\np1 line2\n"      # lines 1-2
    b"\n"                        # 3
    b"p2 line1\n"                # 4
    b"\n\n"                      # 5-6
    b"p3 only line\n"            # 7
    b"\r\n"                      # 8 (a Windows blank line)
    b"p4 line1\r\np4 line2\r\n"  # 9-10
)


@pytest.mark.parametrize("chunk_bytes", [4, 12, 25, 1 << 20])
def test_paragraph_split(tmp_path, chunk_bytes):
    path = tmp_path / "paras.txt"
    path.write_bytes(PARAGRAPHS)
    chunks, report = read_all(path, chunk_bytes=chunk_bytes, split="paragraph")
    assert b"".join(c.data for c in chunks) == PARAGRAPHS
    for chunk, following in pairwise(chunks):
        # Cut only inside a blank line: the head ends a line, the tail opens with a blank one.
        assert chunk.data.endswith(b"\n")
        assert following.data.startswith((b"\n", b"\r\n"))
    parsed = records(chunks, split="paragraph")
    assert [(r.text, r.meta["line"]) for r in parsed] == [
        ("p1 line1\np1 line2", 1),
        ("p2 line1", 4),
        ("p3 only line", 7),
        ("p4 line1\np4 line2", 9),
    ]
    assert report.status == "ok"


def test_paragraph_split_is_line_split_for_jsonl(tmp_path):
    data = b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n'
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    chunks, _ = read_all(path, "jsonl", chunk_bytes=20, split="paragraph")
    assert [c.data for c in chunks] == data.splitlines(keepends=True)
    assert [r.text for r in records(chunks, split="paragraph")] == ["a", "b", "c"]


# --- read_chunks: problems -------------------------------------------------------------


def test_binary_file(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"hello\x00world\n" * 10)
    chunks, report = read_all(path)
    assert chunks == []
    assert report.status == "binary"
    assert report.error == "binary data (NUL byte at offset 5)"
    assert report.digest is None


def test_binary_inside_gzip(tmp_path):
    path = tmp_path / "blob.gz"
    path.write_bytes(gzip.compress(b"\x00\x01\x02" * 100))
    chunks, report = read_all(path)
    assert chunks == []
    assert (report.status, report.compression) == ("binary", "gzip")


def test_empty_files(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    chunks, report = read_all(path)
    assert chunks == []
    assert (report.status, report.bytes, report.compression) == ("empty", 0, None)
    assert report.digest == disk_digest(path)

    path = tmp_path / "empty.txt.gz"
    path.write_bytes(gzip.compress(b""))
    chunks, report = read_all(path)
    assert chunks == []
    assert (report.status, report.compression) == ("empty", "gzip")


def test_truncated_gzip(tmp_path):
    compressed = gzip.compress(sample_lines(2000))
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    _, report = read_all(path, chunk_bytes=4096)
    assert report.status == "unreadable"
    assert report.error.startswith("EOFError: Compressed file ended before the end-of-stream")
    assert report.error.endswith(f"(after {path.stat().st_size:,} bytes)")
    assert report.digest is None
    assert report.compression == "gzip"


def test_corrupt_gzip(tmp_path):
    compressed = bytearray(gzip.compress(b"some text\n" * 50))
    compressed[-8] ^= 0xFF  # the CRC
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(compressed))
    _, report = read_all(path)
    assert report.status == "unreadable"
    assert "CRC check failed" in report.error


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_zstd(tmp_path, keep):
    compressed = zstandard.ZstdCompressor().compress(sample_lines(2000))
    path = tmp_path / "cut.txt.zst"
    path.write_bytes(compressed[: int(len(compressed) * keep)])
    _, report = read_all(path, chunk_bytes=4096)
    assert report.status == "unreadable"


def test_missing_file_is_unreadable(tmp_path):
    path = tmp_path / "gone.txt"
    chunks, report = read_all(path)
    assert chunks == []
    assert report.status == "unreadable"
    assert report.error == "FileNotFoundError: No such file or directory"


# --- parse_chunk -----------------------------------------------------------------------

JSONL = (
    b'{"text": "\xe7\xac\xac\xe4\xb8\x80\xe6\x9d\xa1", "id": 1}\n'  # 1: 第一条
    b"not json at all\n"  # 2
    b"\n"  # 3: blank, skipped
    b"[1, 2]\n"  # 4
    b'{"title": "no text"}\n'  # 5
    b'{"text": 42}\n'  # 6
    b'{"text": null}\n'  # 7
    b'{"text": "bad \xff byte"}\n'  # 8
    b'{"text": "last", "tags": ["a"]}'  # 9, no newline at the end
)


def test_parse_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(JSONL)
    chunks, report = read_all(path, "jsonl", chunk_bytes=30)
    assert report.status == "ok"
    parsed = records(chunks)
    summary = [(r.meta["line"], r.reason) for r in parsed]
    assert summary == [
        (1, None),
        (2, "malformed_json"),
        (4, "malformed_json"),
        (5, "missing_field"),
        (6, "missing_field"),
        (7, "missing_field"),
        (8, "malformed_json"),
        (9, None),
    ]
    first, bad, array, no_text, number, null, _, last = parsed
    assert (first.text, first.meta) == ("第一条", {"line": 1, "id": 1})
    assert first.raw_bytes == len(JSONL.split(b"\n")[0])
    assert bad.text == "not json at all"
    assert bad.detail.startswith("malformed JSON (")
    assert array.detail == "a JSON list, not an object"
    assert no_text.meta == {"line": 5, "title": "no text"}
    assert no_text.detail == "no field 'text'"
    assert (number.text, number.detail) == ("42", "field 'text' is int, not a string")
    assert null.detail == "no field 'text'"
    assert (last.text, last.meta) == ("last", {"line": 9, "tags": ["a"]})


def test_parse_jsonl_other_field_and_offset():
    chunk = Chunk("x.jsonl", "jsonl", first_line=41, disk_bytes=0,
                  data=b'{"body": "\xe6\xad\xa3\xe6\x96\x87", "text": 1}\r\n{"text": "t"}\n')
    parsed = list(parse_chunk(chunk, "line", "body"))
    assert [(r.text, r.reason, r.meta) for r in parsed] == [
        ("正文", None, {"line": 41, "text": 1}),
        ("", "missing_field", {"line": 42, "text": "t"}),
    ]


def test_parse_text_invalid_utf8(tmp_path):
    data = b"good line\r\nbad \xff\xfe line\n\n" + "中文".encode() + b"\n"
    path = tmp_path / "mixed.txt"
    path.write_bytes(data)
    chunks, report = read_all(path)
    assert report.status == "ok"
    parsed = records(chunks)
    assert [(r.text, r.reason, r.meta) for r in parsed] == [
        ("good line", None, {"line": 1}),
        ("bad \\xff\\xfe line", "invalid_utf8", {"line": 2}),
        ("中文", None, {"line": 4}),
    ]
    assert parsed[1].detail == "invalid UTF-8 at byte 4"
    assert parsed[1].raw_bytes == len(b"bad \xff\xfe line")
    assert parsed[2].raw_bytes == 6


def test_parse_text_paragraph_invalid_utf8():
    chunk = Chunk("x.txt", "text", first_line=10, disk_bytes=0,
                  data=b"ok one\nok two\n\nbroken \xc3\n\nfine\n")
    parsed = list(parse_chunk(chunk, "paragraph", "text"))
    assert [(r.text, r.reason, r.meta["line"]) for r in parsed] == [
        ("ok one\nok two", None, 10),
        ("broken \\xc3", "invalid_utf8", 13),
        ("fine", None, 15),
    ]


# --- Parquet ---------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def test_parquet_rows(tmp_path):
    count = 5000  # more than one 4096-row batch
    texts = [f"文档{i}" for i in range(count)]
    texts[2] = None
    table = pa.table({"text": texts, "lang": ["zh"] * (count - 1) + ["en"],
                      "score": list(range(count))})
    path = write_parquet(tmp_path / "docs.parquet", table)
    [source] = resolve_inputs([str(path)])
    assert source.format == "parquet"
    chunks, report = read_all(path, "parquet")
    assert [(c.format, c.first_line, len(c.rows)) for c in chunks] == [
        ("parquet", 1, 4096), ("parquet", 4097, count - 4096)
    ]
    assert report.status == "ok"
    assert report.bytes == path.stat().st_size
    assert report.digest == disk_digest(path)
    parsed = records(chunks)
    assert len(parsed) == count
    assert (parsed[0].text, parsed[0].meta) == ("文档0", {"row": 1, "lang": "zh", "score": 0})
    assert parsed[0].raw_bytes == len("文档0".encode())
    assert (parsed[2].reason, parsed[2].meta["row"]) == ("missing_field", 3)
    assert parsed[4096].meta == {"row": 4097, "lang": "zh", "score": 4096}
    assert parsed[-1].meta == {"row": count, "lang": "en", "score": count - 1}
    assert parsed[-1].text == f"文档{count - 1}"


def test_parquet_text_field_choice(tmp_path):
    path = write_parquet(tmp_path / "d.pq", pa.table({"body": ["正文"], "lang": ["zh"]}))
    chunks, _ = read_all(path, "parquet", text_field="body")
    assert [(r.text, r.meta) for r in records(chunks, text_field="body")] == [
        ("正文", {"row": 1, "lang": "zh"})
    ]
    with pytest.raises(CpmError, match=r"no column 'text' \(columns: body, lang\)"):
        read_all(path, "parquet")


def test_parquet_empty_and_broken(tmp_path):
    path = write_parquet(tmp_path / "empty.parquet",
                         pa.table({"text": pa.array([], type=pa.string())}))
    chunks, report = read_all(path, "parquet")
    assert sum(len(c.rows) for c in chunks) == 0
    assert report.status == "empty"

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet at all\n" * 10)
    chunks, report = read_all(broken, "parquet")
    assert chunks == []
    assert report.status == "unreadable"
    assert report.error.startswith("not a readable Parquet file")


def test_parquet_from_stdin_refused():
    report = FileReport("-", "parquet")
    with pytest.raises(CpmError, match="Parquet cannot be read from standard input"):
        list(read_chunks(Source("-", None, "parquet"), report, chunk_bytes=1024,
                         split="line", text_field="text"))


def test_jsonl_chunks_from_compressed_file(tmp_path):
    lines = [json.dumps({"text": f"文档{i}", "n": i}, ensure_ascii=False) for i in range(300)]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / "docs.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    [source] = resolve_inputs([str(path)])
    assert source.format == "jsonl"
    chunks, report = read_all(path, "jsonl", chunk_bytes=512)
    assert len(chunks) > 5
    parsed = records(chunks)
    assert [(r.text, r.meta) for r in parsed] == [
        (f"文档{i}", {"line": i + 1, "n": i}) for i in range(300)
    ]
    assert report.compression == "zstd"
