"""The artifact layout: the contract between commands (docs/design.md §2).

An artifact is a directory with `cpm-artifact.json` at its root. A command builds its output
in a hidden sibling directory and renames it into place only when complete, writing the
manifest last, so an interrupted command never leaves something that looks finished:

    with ArtifactWriter(out, "corpus", force=force) as writer:
        (writer.dir / "stats.json").write_text(...)
        writer.add_input("source", "raw/", digest)
        writer.commit(meta={...})

Readers open artifacts with `open_artifact(path, expect=("model", "checkpoint"), option="--model")`,
which checks kind, format and the manifest's structure (every `files` entry a plain path inside
the artifact: folders.member) and fails with a message that says what was expected.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cpmctl import __version__
from cpmctl.errors import CpmError
from cpmctl.folders import LOCK_FILE, FolderLock, clear_folder, make_parent, member

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
_SHA256 = re.compile(r"[0-9a-f]{64}")

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
        """A file of the artifact, by its path relative to it (checked to stay inside)."""
        return member(self.path, relative, str(self.path / MANIFEST))

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
        manifest = read_json_object(manifest_path)
    except CpmError as exc:
        raise CpmError(f"{manifest_path}: unreadable manifest "
                       f"({str(exc).removeprefix(f'{manifest_path}: ')})") from None
    if "kind" not in manifest or "format" not in manifest:
        raise CpmError(f"{manifest_path}: unreadable manifest (no 'kind' or 'format')")
    kind, fmt = manifest["kind"], manifest["format"]
    if not isinstance(kind, str) or kind not in FORMATS:
        raise CpmError(f"{manifest_path}: unknown artifact kind {kind!r}")
    if expect is not None:
        expect = (expect,) if isinstance(expect, str) else tuple(expect)
        if kind not in expect:
            raise CpmError(
                f"{path} is {_article(kind)} {kind}; {option} needs {_describe_expected(expect)}"
            )
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > FORMATS[kind]:
        raise CpmError(
            f"{path}: {kind} format {fmt!r} is newer than this cpmctl reads "
            f"(format {FORMATS[kind]}); upgrade cpmctl"
        )
    return Artifact(path=path, kind=kind, format=fmt,
                    meta=_field(manifest, "meta", dict, manifest_path),
                    files=_checked_files(path, manifest),
                    inputs=_field(manifest, "inputs", list, manifest_path), manifest=manifest)


def _field(manifest: dict, key: str, kind: type, where: Path):
    value = manifest.get(key, kind())
    if not isinstance(value, kind):
        wanted = "object" if kind is dict else "array"
        raise CpmError(f"{where}: '{key}' must be a JSON {wanted}, got {type(value).__name__}")
    return value


def _checked_files(path: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's `files` table, every entry a path inside the artifact with a size and a
    digest; anything else is a CpmError naming the manifest and the entry."""
    where = str(path / MANIFEST)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise CpmError(f"{where}: 'files' must be a JSON object of path -> "
                       f"{{bytes, sha256}}, got {type(files).__name__}")
    for relative, entry in files.items():
        member(path, relative, where)
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
            raise CpmError(f"{where}: files[{relative!r}] must be {{\"bytes\": a size, "
                           "\"sha256\": 64 hex digits}}")
    return files


def verify(artifact: Artifact) -> list[str]:
    """Re-hash every file the manifest lists. Returns the problems found (empty if none)."""
    problems = []
    for relative, entry in sorted(artifact.files.items()):
        path = artifact.file(relative)
        if path.is_symlink():
            problems.append(f"{relative}: a symlink, not the file the manifest lists")
        elif not path.is_file():
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


def is_artifact(folder: Path) -> bool:
    """Whether `folder` holds a manifest cpmctl wrote (one that opens as an artifact)."""
    try:
        open_artifact(folder)
    except CpmError:
        return False
    return True


def check_replaceable(out: Path, force: bool, owned=is_artifact,
                      what: str = "a cpmctl artifact") -> None:
    """Refuse an existing `out` without `force`, and even with it anything `owned` does not
    recognise as cpmctl's own output (by default: an artifact, identified by its manifest).

    NOTE: --force replaces what cpmctl wrote, never a folder of the user's own files.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise CpmError(f"{out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir() or not owned(out):
        raise CpmError(f"{out} exists and is not {what}; refusing to replace it")


def _stale_temporaries(out: Path) -> list[tuple[Path, int]]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")
    found = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((entry, int(match.group(1))))
    return found


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporaries of `out` left by killed (SIGKILL) runs whose process is gone
    (only folders named exactly as `temporary_sibling` names them)."""
    for stale, pid in _stale_temporaries(out):
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def temporary_sibling(out: Path) -> Path:
    """A new hidden folder `.NAME.tmp-PID-RANDOM` beside `out` to build it in."""
    make_parent(out)
    remove_stale_temporaries(out)
    folder = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError as exc:
        raise CpmError(f"{out}: cannot write beside it ({exc.strerror or exc})") from None
    return folder


def move_into_place(folder: Path, out: Path) -> None:
    """Rename the finished `folder` to `out`. An existing `out` (checked replaceable by the
    caller) is renamed aside first and removed after, so `out` is at every moment either the
    old folder or the new one. An `out` that another process created meanwhile is left alone."""
    try:
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(folder, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(folder, out)
    except OSError as exc:
        raise CpmError(f"{out}: could not put the result in place ({exc.strerror or exc}; did "
                       "another process create it meanwhile?); nothing was replaced") from None


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
        self._lock: FolderLock | None = None

    def __enter__(self) -> ArtifactWriter:
        check_replaceable(self.out, self.force)
        if self.resume_key is None:
            self.dir = temporary_sibling(self.out)
            return self
        self.dir = self._partial_folder()
        self._lock = FolderLock(self.dir).__enter__()
        key_file = self.dir / self.RESUME_FILE
        if key_file.read_text(encoding="utf-8", errors="replace") == self.resume_key:
            self.resumed = any(p.name not in (self.RESUME_FILE, LOCK_FILE)
                               for p in self.dir.iterdir())
        else:  # other inputs or settings: start afresh, in the same (locked) folder
            clear_folder(self.dir)
            key_file.write_text(self.resume_key, encoding="utf-8")
        return self

    def _partial_folder(self) -> Path:
        """`.NAME.partial`, created whole (with its key file) if absent; one without a key
        file was not made by cpmctl and is refused."""
        folder = self.out.parent / f".{self.out.name}.partial"
        if not folder.exists():
            fresh = temporary_sibling(self.out)
            (fresh / self.RESUME_FILE).write_text(self.resume_key, encoding="utf-8")
            try:
                os.rename(fresh, folder)
            except OSError:  # another process made it first: use theirs (it is locked)
                shutil.rmtree(fresh, ignore_errors=True)
        if folder.is_symlink() or not (folder / self.RESUME_FILE).is_file():
            raise CpmError(f"{folder} exists and was not made by cpmctl (no "
                           f"{self.RESUME_FILE}); move it away to build {self.out}")
        return folder

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock is not None:
            self._lock.__exit__()
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
