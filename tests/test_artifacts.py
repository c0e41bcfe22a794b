"""The artifact layout: writing, opening and verifying artifacts (cpmctl/artifacts.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest

from cpmctl import __version__
from cpmctl.artifacts import (
    MANIFEST,
    ArtifactWriter,
    digest_path,
    open_artifact,
    sha256_file,
    verify,
)
from cpmctl.errors import CpmError

COMMAND = ["cpmctl", "data", "build", "raw/", "-o", "work/corpus"]
DEAD_PID = 2**31 - 1  # above any pid_max: never a live process


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def siblings(out) -> list[str]:
    """Hidden entries next to `out` that belong to it (temporaries, trash)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def write_corpus(out, *, text: bytes = b"hello", force: bool = False, meta=None):
    with ArtifactWriter(out, "corpus", force=force, command=COMMAND) as writer:
        (writer.dir / "stats.json").write_bytes(b'{"docs": 2}\n')
        (writer.dir / "shards").mkdir()
        (writer.dir / "shards" / "part-00000.parquet").write_bytes(text)
        writer.add_input("source", "raw/", "sha256:" + "ab" * 32)
        return writer.commit(meta=meta if meta is not None else {"docs_in": 2, "kept": 2})


def write_manifest(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": "corpus", "format": 1, "files": {}, "meta": {}, **fields}
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


# --- ArtifactWriter --------------------------------------------------------------------


def test_commit_writes_manifest(tmp_path):
    out = tmp_path / "work" / "corpus"  # the parent is created too
    assert write_corpus(out, text=b"parquet bytes") == out
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["kind"] == "corpus"
    assert manifest["format"] == 1
    assert manifest["cpmctl"] == __version__
    assert manifest["command"] == COMMAND
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created"])
    assert manifest["inputs"] == [
        {"role": "source", "path": "raw/", "digest": "sha256:" + "ab" * 32}
    ]
    assert manifest["meta"] == {"docs_in": 2, "kept": 2}
    assert manifest["files"] == {
        "shards/part-00000.parquet": {"bytes": 13, "sha256": sha(b"parquet bytes")},
        "stats.json": {"bytes": 12, "sha256": sha(b'{"docs": 2}\n')},
    }
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shards", "stats.json"]
    assert siblings(out) == []
    assert verify(open_artifact(out, "corpus")) == []


def test_manifest_is_utf8_json(tmp_path):
    out = write_corpus(tmp_path / "c", meta={"名称": "语料"})
    raw = (out / MANIFEST).read_bytes()
    assert "语料".encode() in raw  # not \u escapes
    assert open_artifact(out).meta == {"名称": "语料"}


def test_default_command_is_the_cli_invocation(tmp_path, cli):
    """The manifest records the arguments cpmctl ran with, also when main() is called
    in-process (where sys.argv belongs to the host program)."""
    (tmp_path / "a.txt").write_text("今天天气很好，我们一起去公园散步吧。", encoding="utf-8")
    args = ["data", "build", str(tmp_path / "a.txt"), "-o", str(tmp_path / "c"), "--workers", "1"]
    assert cli(*args).code == 0
    assert open_artifact(tmp_path / "c").manifest["command"] == ["cpmctl", *args]


def test_unknown_kind_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown artifact kind"):
        ArtifactWriter(tmp_path / "x", "banana")


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "corpus"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(out, "corpus", command=COMMAND) as writer:
            assert writer.dir.parent == tmp_path
            assert writer.dir.name.startswith(".corpus.tmp-")
            (writer.dir / "stats.json").write_text("{}")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_commit_leaves_nothing(tmp_path):
    out = tmp_path / "corpus"
    with ArtifactWriter(out, "corpus", command=COMMAND) as writer:
        (writer.dir / "stats.json").write_text("{}")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = write_corpus(tmp_path / "corpus", text=b"old")
    with pytest.raises(CpmError, match="already exists; pass --force"):
        with ArtifactWriter(out, "corpus", command=COMMAND):
            pytest.fail("entered the with block")
    assert (out / "shards" / "part-00000.parquet").read_bytes() == b"old"
    assert siblings(out) == []


def test_force_replaces_only_on_commit(tmp_path):
    out = write_corpus(tmp_path / "corpus", text=b"old")
    with ArtifactWriter(out, "corpus", force=True, command=COMMAND) as writer:
        (writer.dir / "new.txt").write_text("new")
        # Until commit, the old artifact is untouched.
        assert (out / "shards" / "part-00000.parquet").read_bytes() == b"old"
        writer.commit(meta={"v": 2})
    artifact = open_artifact(out, "corpus")
    assert artifact.meta == {"v": 2}
    assert sorted(artifact.files) == ["new.txt"]
    assert not (out / "shards").exists()
    assert siblings(out) == []  # no temporary and no trash left behind


def test_failed_forced_rebuild_keeps_old(tmp_path):
    out = write_corpus(tmp_path / "corpus", text=b"old")
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, "corpus", force=True, command=COMMAND) as writer:
            (writer.dir / "stats.json").write_text("partial")
            raise RuntimeError("interrupted")
    assert (out / MANIFEST).read_bytes() == before
    assert (out / "shards" / "part-00000.parquet").read_bytes() == b"old"
    assert verify(open_artifact(out)) == []
    assert siblings(out) == []


def test_force_never_replaces_a_user_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(CpmError, match="exists and is not a cpmctl artifact; refusing"):
        with ArtifactWriter(out, "corpus", force=True, command=COMMAND):
            pytest.fail("entered the with block")
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_force_never_replaces_a_user_file(tmp_path):
    out = tmp_path / "corpus"
    out.write_text("a file, not a folder")
    with pytest.raises(CpmError, match="not a cpmctl artifact"):
        with ArtifactWriter(out, "corpus", force=True, command=COMMAND):
            pytest.fail("entered the with block")
    assert out.read_text() == "a file, not a folder"


def test_stale_temporaries_removed(tmp_path):
    out = tmp_path / "corpus"
    dead = tmp_path / f".corpus.tmp-{DEAD_PID}-deadbeef"
    dead.mkdir()
    (dead / "half.parquet").write_bytes(b"half")
    alive = tmp_path / f".corpus.tmp-{os.getpid()}-cafebabe"  # a live run: keep it
    alive.mkdir()
    odd = tmp_path / ".corpus.tmp-notapid"  # not ours to judge: keep it
    odd.mkdir()
    other = tmp_path / f".other.tmp-{DEAD_PID}-deadbeef"  # another output's: keep it
    other.mkdir()
    write_corpus(out)
    assert not dead.exists()
    assert alive.is_dir() and odd.is_dir() and other.is_dir()
    assert out.is_dir()


# --- open_artifact ---------------------------------------------------------------------


def test_open_artifact(tmp_path):
    out = write_corpus(tmp_path / "corpus", meta={"kept": 2})
    artifact = open_artifact(out, expect="corpus", option="--corpus")
    assert artifact.path == out
    assert (artifact.kind, artifact.format) == ("corpus", 1)
    assert artifact.meta == {"kept": 2}
    assert artifact.inputs[0]["role"] == "source"
    assert artifact.file("stats.json") == out / "stats.json"
    assert set(artifact.files) == {"stats.json", "shards/part-00000.parquet"}
    # The artifact digest hashes the file table: stable and independent of the location.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert open_artifact(moved).digest == artifact.digest
    assert artifact.digest.startswith("sha256:") and len(artifact.digest) == 7 + 64
    assert open_artifact(str(out), expect=("tokenizer", "corpus")).kind == "corpus"


def test_open_missing(tmp_path):
    with pytest.raises(CpmError, match=r"no such artifact \(for --model\)"):
        open_artifact(tmp_path / "nothing", option="--model")


def test_open_folder_without_manifest(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(CpmError, match="is not a cpmctl artifact"):
        open_artifact(tmp_path / "half")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CpmError, match="is not a cpmctl artifact"):
        open_artifact(tmp_path / "file.txt")


def test_open_wrong_kind(tmp_path):
    out = write_corpus(tmp_path / "corpus")
    with pytest.raises(CpmError) as info:
        open_artifact(out, expect=("model", "checkpoint"), option="--model")
    assert str(info.value) == f"{out} is a corpus; --model needs a model or a checkpoint"
    with pytest.raises(CpmError) as info:
        open_artifact(out, expect="tokenizer", option="--tokenizer")
    assert str(info.value) == f"{out} is a corpus; --tokenizer needs a tokenizer"
    with pytest.raises(CpmError, match="needs a model, a checkpoint or a run"):
        open_artifact(out, expect=("model", "checkpoint", "run"), option="--from")


def test_open_newer_format(tmp_path):
    write_manifest(tmp_path / "future", format=2)
    with pytest.raises(CpmError, match="corpus format 2 is newer than this cpmctl reads"):
        open_artifact(tmp_path / "future", expect="corpus")


def test_open_bad_manifests(tmp_path):
    write_manifest(tmp_path / "unknown", kind="banana")
    with pytest.raises(CpmError, match="unknown artifact kind 'banana'"):
        open_artifact(tmp_path / "unknown")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("{not json")
    with pytest.raises(CpmError, match="unreadable manifest"):
        open_artifact(tmp_path / "broken")
    (tmp_path / "nokind").mkdir()
    (tmp_path / "nokind" / MANIFEST).write_text('{"format": 1}')
    with pytest.raises(CpmError, match="unreadable manifest"):
        open_artifact(tmp_path / "nokind")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CpmError, match="unreadable manifest"):
        open_artifact(tmp_path / "list")


# --- verify ----------------------------------------------------------------------------


def test_verify_detects_changes(tmp_path):
    out = write_corpus(tmp_path / "corpus", text=b"hello")
    artifact = open_artifact(out)
    assert verify(artifact) == []

    (out / "shards" / "part-00000.parquet").write_bytes(b"jello")  # same size
    assert verify(artifact) == ["shards/part-00000.parquet: sha256 differs from the manifest"]

    (out / "shards" / "part-00000.parquet").write_bytes(b"hel")
    assert verify(artifact) == ["shards/part-00000.parquet: 3 bytes, manifest says 5"]

    (out / "shards" / "part-00000.parquet").unlink()
    (out / "stats.json").write_bytes(b"{}")
    assert verify(artifact) == [
        "shards/part-00000.parquet: missing",
        "stats.json: 2 bytes, manifest says 12",
    ]


# --- digests ---------------------------------------------------------------------------


def test_digest_path_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == expected
    assert digest_path(path) == "sha256:" + expected
    assert digest_path(str(path)) == "sha256:" + expected


def test_digest_path_folder(tmp_path):
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"first")
    (folder / "sub" / "b.txt").write_bytes(b"second")
    digest = digest_path(folder)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert digest_path(folder) == digest  # stable
    copy = tmp_path / "elsewhere" / "raw-copy"
    shutil.copytree(folder, copy)
    assert digest_path(copy) == digest  # relative paths only

    (folder / "sub" / "b.txt").write_bytes(b"Second")
    changed = digest_path(folder)
    assert changed != digest
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert digest_path(folder) not in (digest, changed)  # a rename changes it too
    (folder / "sub" / "c.txt").rename(folder / "sub" / "b.txt")
    assert digest_path(folder) == changed
    (folder / "new.txt").write_bytes(b"")
    assert digest_path(folder) != changed  # an added (even empty) file changes it


def test_stale_temporaries_removed_for_name_with_brackets(tmp_path):
    out = tmp_path / "corpus[v1]"
    dead = tmp_path / f".corpus[v1].tmp-{DEAD_PID}-deadbeef"
    dead.mkdir()
    write_corpus(out)
    assert out.is_dir()
    assert not dead.exists()
