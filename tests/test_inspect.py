"""`cpmctl data inspect`: summary, --json, --sample, --verify, and wrong kinds."""

from __future__ import annotations

import json

import pytest

from cpmctl.artifacts import ArtifactWriter

LINES = [
    "今天天气很好，我们一起去公园散步吧。",
    "这本书的内容非常丰富，值得每个人认真阅读。",
    "他在实验室里工作了整整一个晚上，终于得到了结果。",
    "短句。",
]


@pytest.fixture
def corpus(tmp_path, cli):
    (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "corpus"
    assert cli("data", "build", tmp_path / "in.txt", "-o", out, "--workers", "1",
               "--keep-rejected").code == 0
    return out


def test_summary_table_and_json(corpus, cli):
    table = cli("data", "inspect", corpus)
    assert table.code == 0
    assert "corpus" in table.out and "documents.kept" in table.out and "stats.json" not in table.out
    summary = json.loads(cli("data", "inspect", corpus, "--json").out)
    assert summary["kind"] == "corpus" and summary["meta"]["documents"]["kept"] == 3
    assert summary["meta"]["documents"]["dropped"] == {"too_short": 1}
    assert summary["files"] == 3 and summary["inputs"][0]["role"] == "source"


def test_sample_draws_documents(corpus, cli):
    summary = json.loads(cli("data", "inspect", corpus, "--json", "--sample", "2").out)
    assert len(summary["sample"]) == 2
    assert all(document["text"] in LINES for document in summary["sample"])
    again = json.loads(cli("data", "inspect", corpus, "--json", "--sample", "2").out)
    assert again["sample"] == summary["sample"]
    rejected = json.loads(cli("data", "inspect", corpus, "--json", "--sample", "5",
                              "--rejected").out)
    assert [(d["text"], d["reason"]) for d in rejected["sample"]] == [("短句。", "too_short")]
    shown = cli("data", "inspect", corpus, "--sample", "1", "--rejected")
    assert "reason=too_short" in shown.out and "短句。" in shown.out


def test_verify_detects_tampering(corpus, cli):
    ok = cli("data", "inspect", corpus, "--verify")
    assert ok.code == 0 and "verify: all 3 files match the manifest" in ok.out
    shard = corpus / "shards" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = cli("data", "inspect", corpus, "--verify")
    assert bad.code == 2
    assert bad.err.strip() == (f"error: {corpus}: 1 file(s) differ from the manifest: "
                               "shards/part-00000.parquet: sha256 differs from the manifest")


def test_not_an_artifact_and_wrong_kind(tmp_path, cli):
    (tmp_path / "plain").mkdir()
    result = cli("data", "inspect", tmp_path / "plain")
    assert result.code == 2 and "is not a cpmctl artifact (no cpm-artifact.json" in result.err
    assert cli("data", "inspect", tmp_path / "missing").code == 2
    with ArtifactWriter(tmp_path / "model", "model", command=["test"]) as writer:
        (writer.dir / "model.json").write_text("{}")
        writer.commit({"arch": "gpt"})
    assert cli("data", "inspect", tmp_path / "model").code == 0
    sample = cli("data", "inspect", tmp_path / "model", "--sample", "2")
    assert sample.code == 2 and "is a model; --sample needs a corpus" in sample.err
