"""Benchmark tasks: the task format (format.py), the shipped task files (*.toml here), the data
readers (data_readers.py) and the data installed packages ship (package_data.py).

    task = load_task("tnews")                    # a shipped task, or load_task("my.toml")
    examples = task.read_examples("clue/tnews")  # its split (dev) in a CLUE data folder
    requests = task.requests(examples[0], random.Random(0))
    requests.candidates[0].context_parts, requests.candidates[0].continuation

Scoring is cpmctl.bench.scoring.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cpmctl.bench.tasks.format import (
    RULES,
    Candidate,
    Example,
    ScoringRequests,
    Task,
    load_task_file,
)
from cpmctl.errors import CpmError

__all__ = ["RULES", "Candidate", "Example", "ScoringRequests", "Task", "load_task",
           "shipped_tasks"]


def shipped_tasks() -> list[str]:
    """The names of the task files that ship with cpmctl."""
    folder = resources.files(__package__)
    return sorted(p.name[:-len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_task(name_or_path: str) -> Task:
    """A shipped task by name (`tnews`), or a user's task file (a path ending in .toml)."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_task_file(Path(name_or_path))
    if name_or_path not in shipped_tasks():
        raise CpmError(f"--task: no shipped task {name_or_path!r} (shipped: "
                       f"{', '.join(shipped_tasks())}; or give a .toml file)")
    with resources.as_file(resources.files(__package__) / f"{name_or_path}.toml") as path:
        return load_task_file(path)
