"""The file-system rules every command follows when it reads or writes a folder.

- A path read from a manifest or an index (`member`) is relative, normalised and inside its
  folder, and does not pass through a symlink that leaves it: `../../etc/passwd`,
  `/etc/hostname` or `tokenizer -> /home` never reach `open()`.
- A copy (`copy_tree`) takes regular files and folders only: a symlink or a device inside the
  source is an error naming it, so no outside file lands inside a new artifact.
- A folder that one process writes in place (a training run, a resumable `.partial`) is locked
  (`FolderLock`, an `fcntl` lock on a file inside it) against a second process, which gets an
  error naming the holder's PID.
- `--force` replaces only what cpmctl wrote: artifacts.py and the HF export check ownership
  before they replace anything (`clear_folder` empties a folder cpmctl owns, keeping its lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from cpmctl.errors import CpmError

LOCK_FILE = ".cpmctl-lock"


def member(root: Path, relative, where: str) -> Path:
    """`root / relative` for a path read from a manifest or index (`where` names that file),
    refusing anything that is not a plain relative path inside `root`."""
    if not isinstance(relative, str) or not relative or "\0" in relative or "\\" in relative:
        raise CpmError(f"{where}: {relative!r} is not a relative file path")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in relative.split("/")):
        raise CpmError(f"{where}: {relative!r} is not a path inside the artifact (absolute, "
                       "'..' and '.' components are refused)")
    path = Path(root, *pure.parts)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise CpmError(f"{where}: {relative!r} leads outside {root} through a symlink")
    return path


def copy_tree(source: Path, destination: Path) -> None:
    """Copy the folder `source` to `destination` (which must not exist): regular files and
    folders only; a symlink or special file anywhere inside is a CpmError naming it."""
    source, destination = Path(source), Path(destination)
    if source.is_symlink() or not source.is_dir():
        raise CpmError(f"{source}: not a folder (a symlink is not copied into an artifact)")
    for folder, subfolders, files in os.walk(source, followlinks=False):
        here = Path(folder)
        target = destination / here.relative_to(source)
        target.mkdir(parents=True, exist_ok=here != source)
        for name in sorted(subfolders + files):
            entry = here / name
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise CpmError(f"{entry}: a symlink; cpmctl copies no links into an artifact "
                               "(replace it with the file itself)")
            if stat.S_ISREG(mode):
                shutil.copyfile(entry, target / name, follow_symlinks=False)
            elif not stat.S_ISDIR(mode):
                raise CpmError(f"{entry}: not a regular file; cpmctl copies regular files only")


def make_parent(path: Path) -> None:
    """Create `path`'s parent folders, as a CpmError naming the path when that is impossible
    (`-o some_file/out`, a read-only place)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CpmError(f"{path}: cannot create it, a parent is a file, not a folder") from None
    except OSError as exc:
        raise CpmError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None


def clear_folder(folder: Path) -> None:
    """Empty a folder cpmctl owns (its callers checked that), keeping its lock file: entries
    are renamed out of sight first, so no half-deleted entry keeps its name."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            trash = entry.with_name(f".{entry.name}.deleting-{os.getpid()}")
            os.rename(entry, trash)
            shutil.rmtree(trash)
        else:
            entry.unlink()


class FolderLock:
    """An exclusive lock on `folder` for as long as the `with` block runs.

    NOTE: `flock` locks belong to the open file, so the lock goes away with the process however
    it ends (SIGKILL included); a stale lock file left behind locks nothing."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CpmError(f"{self.path.parent}: cannot lock it ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise CpmError(f"{self.path.parent}: cannot lock it ({exc.strerror})") from None
            raise CpmError(f"{self.path.parent} is in use by another cpmctl process (PID "
                           f"{holder}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
