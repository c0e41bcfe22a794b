"""The artifact layout: the contract between commands (ARCHITECTURE §2).

An artifact is a directory with `cpm-artifact.json` at its root. A command builds its output
in a hidden sibling directory and renames it into place only when complete, writing the
manifest last, so an interrupted command never leaves something that looks finished:

    with ArtifactWriter(out, "corpus", force=force) as writer:
        (writer.dir / "stats.json").write_text(...)
        writer.add_input("source", "raw/", digest)
        writer.commit(meta={...})

Readers open artifacts with `open_artifact(path, expect=("model", "checkpoint"), option="--model")`,
which checks kind and format and fails with a message that says what was expected.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl import __version__
from cpmctl.errors import CpmError

MANIFEST = "cpm-artifact.json"

#: Every artifact kind and the newest format version this cpmctl writes and reads.
FORMATS: dict[str, int] = {
    "corpus": 1,
    "tokenizer": 1,
    "dataset": 1,
    "run": 1,
    "checkpoint": 1,
    "model": 1,
    "prompt": 1,
    "report": 1,
}

_HASH_BLOCK = 1 << 20

#: The command line recorded in manifests; `cpmctl.cli.main` sets it to the arguments it runs.
invocation: list[str] = ["cpmctl", *sys.argv[1:]]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (a config, a trainer state); anything else is a one-line
    error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise CpmError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CpmError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CpmError(f"{path}: must be a JSON object")
    return data


def digest_path(path: Path) -> str:
    """`sha256:...` of a file, or of a folder as the sorted (relative path, file digest) list."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path).as_posix()}\0{sha256_file(child)}\n".encode())
    return "sha256:" + digest.hexdigest()


@dataclass
class Artifact:
    """An opened artifact: its directory and its parsed manifest."""

    path: Path
    kind: str
    format: int
    meta: dict
    files: dict[str, dict]
    inputs: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    def file(self, relative: str) -> Path:
        return self.path / relative

    @property
    def digest(self) -> str:
        """A digest of the whole artifact: the hash of its manifest's file table."""
        table = json.dumps(self.files, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(table).hexdigest()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe_expected(expect: tuple[str, ...]) -> str:
    words = [f"{_article(k)} {k}" for k in expect]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def open_artifact(
    path: str | Path, expect: str | tuple[str, ...] | None = None, option: str = "the input"
) -> Artifact:
    """Open and check an artifact. `expect` is the kind (or kinds) the caller accepts."""
    path = Path(path)
    if not path.exists():
        raise CpmError(f"{path}: no such artifact (for {option})")
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.is_file():
        raise CpmError(
            f"{path} is not a cpmctl artifact (no {MANIFEST}; an interrupted command leaves none)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        kind, fmt = manifest["kind"], manifest["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CpmError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if kind not in FORMATS:
        raise CpmError(f"{manifest_path}: unknown artifact kind {kind!r}")
    if expect is not None:
        expect = (expect,) if isinstance(expect, str) else tuple(expect)
        if kind not in expect:
            raise CpmError(
                f"{path} is {_article(kind)} {kind}; {option} needs {_describe_expected(expect)}"
            )
    if not isinstance(fmt, int) or fmt > FORMATS[kind]:
        raise CpmError(
            f"{path}: {kind} format {fmt} is newer than this cpmctl reads "
            f"(format {FORMATS[kind]}); upgrade cpmctl"
        )
    return Artifact(
        path=path,
        kind=kind,
        format=fmt,
        meta=manifest.get("meta", {}),
        files=manifest.get("files", {}),
        inputs=manifest.get("inputs", []),
        manifest=manifest,
    )


def verify(artifact: Artifact) -> list[str]:
    """Re-hash every file the manifest lists. Returns the problems found (empty if none)."""
    problems = []
    for relative, entry in sorted(artifact.files.items()):
        path = artifact.file(relative)
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != entry["bytes"]:
            size = path.stat().st_size
            problems.append(f"{relative}: {size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{relative}: sha256 differs from the manifest")
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_replaceable(out: Path, force: bool, marker: str = MANIFEST,
                      what: str = "a cpmctl artifact") -> None:
    """Refuse an existing `out` without `force`, and even with it a folder without `marker`.

    NOTE: --force replaces what cpmctl wrote (artifacts, and for `model convert --to hf` a
    folder with a config.json), never a folder of the user's own files.
    """
    if out.exists() and not force:
        raise CpmError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / marker).is_file():
        raise CpmError(f"{out} exists and is not {what}; refusing to replace it")


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporaries of `out` left by killed (SIGKILL) runs whose process is gone."""
    for stale in out.parent.glob(glob.escape(f".{out.name}.tmp-") + "*"):
        try:
            pid = int(stale.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def temporary_sibling(out: Path) -> Path:
    """A new hidden folder `.NAME.tmp-PID-RANDOM` beside `out` to build it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    folder = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def move_into_place(folder: Path, out: Path) -> None:
    """Rename the finished `folder` to `out`. An existing `out` is renamed aside first and
    removed after, so `out` is at every moment either the old folder or the new one."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(folder, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(folder, out)


class ArtifactWriter:
    """Build an artifact in a temporary sibling and move it into place on `commit`.

    Leaving the `with` block without committing (an error, Ctrl-C) removes the temporary
    directory; nothing at the output path changes. With `force`, an existing artifact at the
    output path is replaced only at commit time, so a failed rebuild keeps the old one.

    A resumable job passes `resume_key` (a digest of its inputs and settings): it then builds
    in `.NAME.partial`, which survives an interruption, and a rerun with the same key finds
    its finished pieces there (`resumed` is True). A different key starts afresh.

    Top-level entries of the building folder whose names start with "." are scratch (the
    resume key, a job's progress markers): they are left out of the manifest and removed only
    after it is written, so an interruption at any point before leaves a resumable folder.
    """

    RESUME_FILE = ".resume-key"

    def __init__(self, out: str | Path, kind: str, *, force: bool = False, command=None,
                 resume_key: str | None = None):
        if kind not in FORMATS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        self.out = Path(out)
        self.kind = kind
        self.force = force
        self.command = list(command) if command is not None else list(invocation)
        self.inputs: list[dict] = []
        self.dir: Path | None = None
        self.committed = False
        self.resume_key = resume_key
        self.resumed = False

    def __enter__(self) -> ArtifactWriter:
        check_replaceable(self.out, self.force)
        if self.resume_key is None:
            self.dir = temporary_sibling(self.out)
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        key_file = self.dir / self.RESUME_FILE
        if key_file.is_file() and key_file.read_text() == self.resume_key:
            self.resumed = True
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
            key_file.write_text(self.resume_key)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.dir is not None and self.resume_key is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def add_input(self, role: str, path: str, digest: str) -> None:
        self.inputs.append({"role": role, "path": str(path), "digest": digest})

    def commit(self, meta: dict) -> Path:
        """Hash the files, write the manifest last, and rename the directory into place."""
        assert self.dir is not None, "commit() outside the with block"
        _write_manifest(self.dir, self.kind, self.command, self.inputs, meta)
        move_into_place(self.dir, self.out)
        self.committed = True
        return self.out


def _write_manifest(folder: Path, kind: str, command: list[str], inputs: list[dict],
                    meta: dict) -> None:
    """Hash every file, write `cpm-artifact.json` (last), then drop the scratch dot-entries."""
    scratch = [p for p in folder.iterdir() if p.name.startswith(".")]
    files = {}
    for path in sorted(p for p in folder.rglob("*")
                       if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")):
        relative = path.relative_to(folder).as_posix()
        files[relative] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "kind": kind,
        "format": FORMATS[kind],
        "cpmctl": __version__,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "inputs": inputs,
        "files": files,
        "meta": meta,
    }
    manifest_tmp = folder / f".{MANIFEST}.partial"
    manifest_tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    os.replace(manifest_tmp, folder / MANIFEST)
    for path in scratch:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def finalize_in_place(folder: Path, kind: str, meta: dict, command=None) -> None:
    """Make a folder that was built in place over a long job (a training run) an artifact:
    its manifest is written when the job ends, so until then it never looks finished."""
    _write_manifest(Path(folder), kind, list(command) if command else list(invocation), [], meta)
