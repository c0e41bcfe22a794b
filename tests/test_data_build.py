"""`cpmctl data build` as a user runs it: formats, the bad-input battery, dedup, determinism."""

from __future__ import annotations

import gzip
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cpmctl.artifacts import MANIFEST
from cpmctl.data.shards import iter_documents
from tests.conftest import run_subprocess

GOOD = [
    "今天天气很好，我们一起去公园散步吧。",
    "这本书的内容非常丰富，值得每个人认真阅读。",
    "他在实验室里工作了整整一个晚上，终于得到了结果。",
    "春天来了，山上的花都开了，到处都是一片生机勃勃的景象。",
]


def stats_of(corpus: Path) -> dict:
    return json.loads((corpus / "stats.json").read_text(encoding="utf-8"))


def texts_of(corpus: Path, folder: str = "shards") -> list[str]:
    return [row["text"] for row in iter_documents(corpus, folder)]


def assert_accounted(stats: dict) -> None:
    documents = stats["documents"]
    assert documents["in"] == documents["kept"] + sum(documents["dropped"].values())
    nbytes = stats["bytes"]
    assert nbytes["in"] == nbytes["kept"] + sum(nbytes["dropped"].values())


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


_HANZI = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]


def random_chinese(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_HANZI, k=length))


def test_plain_text_builds_a_corpus_artifact(tmp_path, cli):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(GOOD) + "\n", encoding="utf-8")
    out = tmp_path / "corpus"
    result = cli("data", "build", source, "-o", out, "--workers", "1")
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "corpus" and manifest["format"] == 1
    assert set(manifest["files"]) == {"shards/part-00000.parquet", "stats.json"}
    assert manifest["inputs"][0]["digest"].startswith("sha256:")
    rows = list(iter_documents(out))
    assert [r["text"] for r in rows] == GOOD
    assert [json.loads(r["meta"])["line"] for r in rows] == [1, 2, 3, 4]
    assert all(r["source"] == str(source) and len(r["id"]) == 16 for r in rows)
    assert pq.ParquetFile(out / "shards/part-00000.parquet").metadata.row_group(0).column(1) \
        .compression == "ZSTD"


def test_compressed_jsonl_parquet_and_paragraphs(tmp_path, cli):
    records = [json.dumps({"content": t, "label": i}, ensure_ascii=False)
               for i, t in enumerate(GOOD)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(records[:2]).encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("\n".join(records[2:]).encode()))
    out = tmp_path / "c1"
    result = cli("data", "build", tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst", "-o", out,
                 "--text-field", "content", "--workers", "1")
    assert result.code == 0, result.err
    rows = list(iter_documents(out))
    assert [r["text"] for r in rows] == GOOD
    assert json.loads(rows[3]["meta"]) == {"line": 2, "label": 3}
    compressions = [f["compression"] for f in stats_of(out)["files"]]
    assert compressions == ["gzip", "zstd"]

    pq.write_table(pa.table({"content": GOOD, "year": [2001, 2002, 2003, 2004]}),
                   tmp_path / "d.parquet")
    out = tmp_path / "c2"
    assert cli("data", "build", tmp_path / "d.parquet", "-o", out, "--text-field", "content",
               "--workers", "1").code == 0
    assert texts_of(out) == GOOD
    assert json.loads(next(iter_documents(out))["meta"]) == {"row": 1, "year": 2001}

    (tmp_path / "e.txt").write_text(f"{GOOD[0]}\n{GOOD[1]}\n\n \n{GOOD[2]}\n", encoding="utf-8")
    out = tmp_path / "c3"
    assert cli("data", "build", tmp_path / "e.txt", "-o", out, "--split", "paragraph",
               "--workers", "1").code == 0
    assert texts_of(out) == [f"{GOOD[0]}\n{GOOD[1]}", GOOD[2]]


def test_stdin_is_read_with_dash(tmp_path):
    out = tmp_path / "corpus"
    done = run_subprocess("data", "build", "-", "-o", out, "--workers", "1",
                          input=("\n".join(GOOD) + "\n").encode())
    assert done.returncode == 0, done.stderr
    assert texts_of(out) == GOOD
    assert stats_of(out)["files"][0]["path"] == "-"


def test_cleaning_is_applied(tmp_path, cli):
    dirty = "<p>这是一段<b>网页</b>文字，ＡＢＣ１２３，&amp;\u200b\x07  很好。</p>"
    (tmp_path / "in.txt").write_text(dirty + "\n", encoding="utf-8")
    out = tmp_path / "corpus"
    assert cli("data", "build", tmp_path / "in.txt", "-o", out, "--workers", "1",
               "--min-cjk-ratio", "0").code == 0
    assert texts_of(out) == ["这是一段网页文字，ABC123，& 很好。"]


# --- the bad-input battery ------------------------------------------------------------


def test_invalid_utf8_inside_a_good_file_is_counted_not_fatal(tmp_path, cli):
    source = tmp_path / "mixed.txt"
    broken = b"\xff\xfe\xc3 broken \x80"
    source.write_bytes(GOOD[0].encode() + b"\n" + broken + b"\n" + GOOD[1].encode() + b"\n")
    out = tmp_path / "corpus"
    result = cli("data", "build", source, "-o", out, "--workers", "1", "--keep-rejected")
    assert result.code == 0, result.err
    assert texts_of(out) == GOOD[:2]
    stats = stats_of(out)
    assert stats["documents"]["dropped"] == {"invalid_utf8": 1}
    assert f"{source}:2: invalid UTF-8 at byte 0" in result.err
    rejected = list(iter_documents(out, "rejected"))
    assert rejected[0]["reason"] == "invalid_utf8" and "\\xff" in rejected[0]["text"]
    assert_accounted(stats)


def test_binary_file_is_skipped_and_reported(tmp_path, cli):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(GOOD), encoding="utf-8")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp_path / "corpus"
    result = cli("data", "build", folder, "-o", out, "--workers", "1")
    assert result.code == 0, result.err
    assert texts_of(out) == GOOD
    assert f"{folder / 'b.png'}: skipped, binary data (NUL byte at offset 8)" in result.err
    files = {Path(f["path"]).name: f for f in stats_of(out)["files"]}
    assert files["b.png"]["status"] == "binary" and files["a.txt"]["documents"] == 4


def test_empty_file(tmp_path, cli):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "good.txt").write_text(GOOD[0], encoding="utf-8")
    out = tmp_path / "corpus"
    result = cli("data", "build", tmp_path / "empty.txt", tmp_path / "good.txt", "-o", out,
                 "--workers", "1")
    assert result.code == 0, result.err
    assert "empty.txt: empty file" in result.err
    assert texts_of(out) == GOOD[:1]
    alone = cli("data", "build", tmp_path / "empty.txt", "-o", tmp_path / "c2", "--workers", "1")
    assert alone.code == 2
    assert "error: no documents in" in alone.err
    assert not (tmp_path / "c2").exists() and no_leftovers(tmp_path)


def test_a_50mb_single_line_is_rejected_as_too_long(tmp_path, cli):
    source = tmp_path / "big.txt"
    rng = random.Random(0)
    block = random_chinese(rng, 100_000)
    with open(source, "w", encoding="utf-8") as f:
        f.write(GOOD[0] + "\n" + block * 167 + "\n" + GOOD[1] + "\n")
    assert source.stat().st_size > 50_000_000
    out = tmp_path / "corpus"
    result = cli("data", "build", source, "-o", out, "--workers", "1")
    assert result.code == 0, result.err
    assert texts_of(out) == GOOD[:2]
    stats = stats_of(out)
    assert stats["documents"]["dropped"] == {"too_long": 1}
    assert stats["bytes"]["dropped"]["too_long"] == len(block.encode()) * 167
    assert_accounted(stats)


def test_malformed_jsonl_lines_among_good_ones(tmp_path, cli):
    lines = [
        json.dumps({"text": GOOD[0]}, ensure_ascii=False),
        '{"text": "这一行没有结束',
        "[1, 2, 3]",
        json.dumps({"title": "没有正文"}, ensure_ascii=False),
        json.dumps({"text": 42}),
        json.dumps({"text": GOOD[1]}, ensure_ascii=False),
    ]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "corpus"
    result = cli("data", "build", source, "-o", out, "--workers", "1", "--keep-rejected")
    assert result.code == 0, result.err
    assert texts_of(out) == GOOD[:2]
    assert stats_of(out)["documents"]["dropped"] == {"malformed_json": 2, "missing_field": 2}
    assert f"{source}:2: malformed JSON" in result.err
    assert f"{source}:3: a JSON list, not an object" in result.err
    assert f"{source}:5: field 'text' is int, not a string" in result.err
    reasons = {json.loads(r["meta"])["line"]: r["reason"] for r in iter_documents(out, "rejected")}
    assert reasons == {2: "malformed_json", 3: "malformed_json", 4: "missing_field",
                       5: "missing_field"}


def test_missing_input_is_a_usage_error(tmp_path, cli):
    (tmp_path / "good.txt").write_text(GOOD[0], encoding="utf-8")
    result = cli("data", "build", tmp_path / "good.txt", tmp_path / "nope.txt", "-o",
                 tmp_path / "corpus")
    assert result.code == 2
    assert result.err.strip() == f"error: input not found: {tmp_path / 'nope.txt'}"
    assert not (tmp_path / "corpus").exists()


def test_existing_output_needs_force(tmp_path, cli):
    (tmp_path / "a.txt").write_text(GOOD[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(GOOD[1], encoding="utf-8")
    out = tmp_path / "corpus"
    assert cli("data", "build", tmp_path / "a.txt", "-o", out, "--workers", "1").code == 0
    again = cli("data", "build", tmp_path / "b.txt", "-o", out, "--workers", "1")
    assert again.code == 2
    assert again.err.strip() == f"error: {out} already exists; pass --force to replace it"
    assert texts_of(out) == GOOD[:1]
    forced = cli("data", "build", tmp_path / "b.txt", "-o", out, "--workers", "1", "--force")
    assert forced.code == 0 and texts_of(out) == GOOD[1:2] and no_leftovers(tmp_path)
    mine = tmp_path / "my-notes"
    mine.mkdir()
    refused = cli("data", "build", tmp_path / "b.txt", "-o", mine, "--force")
    assert refused.code == 2 and "is not a cpmctl artifact; refusing" in refused.err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_build_leaves_no_artifact(tmp_path, signum):
    rng = random.Random(1)
    with open(tmp_path / "in.txt", "w", encoding="utf-8") as f:
        for _ in range(60_000):
            f.write(random_chinese(rng, 300) + "\n")
    out = tmp_path / "corpus"
    process = subprocess.Popen(
        [sys.executable, "-m", "cpmctl", "data", "build", tmp_path / "in.txt", "-o", out,
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".corpus.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert err.decode().strip().endswith("error: interrupted")
    assert not out.exists() and no_leftovers(tmp_path)


def test_bad_options_are_usage_errors(tmp_path, cli):
    (tmp_path / "a.txt").write_text(GOOD[0], encoding="utf-8")
    cases = {
        ("--dedup", "fuzzy"): "--dedup must be one of none, exact, minhash, not 'fuzzy'",
        ("--shard-size", "lots"): "--shard-size: cannot read 'lots' as a size",
        ("--min-cjk-ratio", "1.5"): "--min-cjk-ratio must be between 0 and 1, not 1.5",
        ("--blocklist", tmp_path / "none.txt"): f"{tmp_path / 'none.txt'}: blocklist file not",
    }
    for options, message in cases.items():
        result = cli("data", "build", tmp_path / "a.txt", "-o", tmp_path / "c", *options)
        assert result.code == 2, options
        assert message in result.err and "Traceback" not in result.err
        assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and no_leftovers(tmp_path)


# --- dedup and determinism ------------------------------------------------------------


def edited(text: str, rng: random.Random, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        chars[rng.randrange(len(chars))] = chr(rng.randrange(0x4E00, 0x4E00 + 2500))
    return "".join(chars)


def test_near_duplicates_removed_at_the_documented_threshold(tmp_path, cli):
    rng = random.Random(7)
    originals = [random_chinese(rng, 400) for _ in range(300)]
    copies = [edited(originals[i], rng, 3) for i in range(0, 300, 10)]  # Jaccard ~0.93
    distant = [edited(originals[i], rng, 120) for i in range(5, 300, 10)]  # Jaccard ~0.2
    (tmp_path / "in.txt").write_text("\n".join(originals + copies + distant) + "\n", "utf-8")
    out = tmp_path / "corpus"
    result = cli("data", "build", tmp_path / "in.txt", "-o", out, "--workers", "1",
                 "--keep-rejected")
    assert result.code == 0, result.err
    assert texts_of(out) == originals + distant
    stats = stats_of(out)
    assert stats["documents"]["dropped"] == {"near_duplicate": 30}
    assert stats["near_duplicates"]["clusters"] == 30
    assert stats["near_duplicates"]["threshold"] == pytest.approx((1 / 10) ** (1 / 8), abs=1e-4)
    ids = {row["text"]: row["id"] for row in iter_documents(out)}
    for row, i in zip(iter_documents(out, "rejected"), range(0, 300, 10), strict=True):
        assert json.loads(row["meta"])["duplicate_of"] == ids[originals[i]]


def test_exact_duplicates_keep_the_first(tmp_path, cli):
    (tmp_path / "a.txt").write_text(f"{GOOD[0]}\n{GOOD[1]}\n{GOOD[0]}\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(f"  {GOOD[1]}  \n{GOOD[2]}\n", encoding="utf-8")
    out = tmp_path / "corpus"
    assert cli("data", "build", tmp_path / "a.txt", tmp_path / "b.txt", "-o", out,
               "--workers", "1", "--dedup", "exact").code == 0
    assert texts_of(out) == GOOD[:3]
    assert stats_of(out)["documents"]["dropped"] == {"exact_duplicate": 2}


def test_output_bytes_do_not_depend_on_worker_count(tmp_path, cli):
    rng = random.Random(3)
    folder = tmp_path / "raw"
    folder.mkdir()
    for n in range(3):
        lines = [random_chinese(rng, rng.randrange(20, 400)) for _ in range(3000)]
        lines += [edited(line, rng, 2) for line in lines[:200]] + lines[200:300]
        (folder / f"part{n}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifests = []
    for workers in ("1", "2"):
        out = tmp_path / f"corpus-{workers}"
        result = run_subprocess("data", "build", folder, "-o", out, "--workers", workers,
                                "--keep-rejected", "--shard-size", "300KB")
        assert result.returncode == 0, result.stderr
        manifests.append(json.loads((out / MANIFEST).read_text())["files"])
    assert manifests[0] == manifests[1]
    assert len([name for name in manifests[0] if name.startswith("shards/")]) > 1
    assert_accounted(stats_of(tmp_path / "corpus-2"))
