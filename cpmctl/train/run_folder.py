"""The run folder (`run.output`): whose it is, who works in it, what it holds at the start.

A run folder is built in place over a long job, so until its manifest is written at the end
it is marked as cpmctl's by `cpm-run.json` (which stays, listed in the manifest, afterwards).
`claim` decides whether this run may use the folder:

    absent, or empty          a new run starts there
    marked, not finished      --resume continues it; --force starts it again
    finished (a run manifest) --force starts it again
    anything else             refused: a folder of the user's own files is never written into,
                              adopted into a manifest or deleted, --force or not

The main process then holds a lock (folders.FolderLock) on the folder until the run ends, so
a second `cpmctl train` on it (say, with --resume while the first still runs) is refused with
the first one's PID instead of interleaving metrics.jsonl. `start` writes the marker, the
resolved recipe and a copy of the dataset's tokenizer: the final model takes its tokenizer
from the run itself, so a dataset deleted while training cannot leave a model without one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpmctl.artifacts import MANIFEST, open_artifact
from cpmctl.errors import CpmError
from cpmctl.folders import LOCK_FILE, FolderLock, clear_folder, copy_tree, make_parent

MARKER = "cpm-run.json"
RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"


def folder_state(path: Path) -> str:
    """'absent', 'empty', 'running' (marked, not finished), 'finished' or 'foreign'."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if path.is_symlink() or not path.is_dir():
        return "foreign"
    if (path / MANIFEST).is_file():
        try:
            return "finished" if open_artifact(path).kind == "run" else "foreign"
        except CpmError:
            return "foreign"
    if (path / MARKER).is_file():
        return "running"
    if all(entry.name == LOCK_FILE for entry in path.iterdir()):
        return "empty"
    return "foreign"


class RunFolder:
    """The run folder of one training process; only the main process writes and locks."""

    def __init__(self, path: Path, main: bool):
        self.path, self.main = Path(path), main
        self._lock: FolderLock | None = None

    def claim(self, *, resume: bool, force: bool) -> None:
        """Refuse a folder this run may not use (see the module docstring), then lock it."""
        state, path = folder_state(self.path), self.path
        if state == "foreign":
            raise CpmError(f"{path} exists and is not a cpmctl run folder (no {MARKER} or run "
                           f"manifest); choose another run.output: cpmctl neither writes into "
                           "nor deletes a folder it did not make")
        if state == "finished" and not force:
            raise CpmError(f"{path} is a finished run; pass --force to train it again")
        if resume and not force and state != "running":
            raise CpmError(f"{path}: nothing to resume (no run was started there)")
        if state == "running" and not resume and not force:
            raise CpmError(f"{path} holds a run already; pass --resume to continue it or "
                           "--force to start again")
        if self.main:
            if state == "absent":
                make_parent(path)
                path.mkdir(exist_ok=True)
            self._lock = FolderLock(path).__enter__()

    def start(self, recipe_text: str, tokenizer: Path, *, fresh: bool) -> None:
        """Main process: a fresh run empties the folder (keeping the lock) and writes the
        marker and recipe.toml; every run makes sure the tokenizer copy is there."""
        if not self.main:
            return
        if fresh:
            clear_folder(self.path)
            (self.path / MARKER).write_text(json.dumps({"kind": "run"}) + "\n",
                                            encoding="utf-8")
            (self.path / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
        if not (self.path / TOKENIZER_DIR).is_dir():
            copy_tree(tokenizer, self.path / TOKENIZER_DIR)

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_DIR

    def release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__()
            self._lock = None
