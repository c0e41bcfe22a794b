"""`cpmctl train`."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A TOML recipe."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe value: --set train.steps=200 (repeatable)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in the recipe's output folder."
    ),
    force: bool = typer.Option(False, "--force", help="Start the run again from scratch."),
) -> None:
    """Train a model from a recipe into a run folder; the final model lands in final/.

    Several processes: torchrun --nproc_per_node 2 -m cpmctl train --recipe R.toml

    Example: cpmctl train --recipe recipes/tiny-gpt.toml --set train.steps=200
    """
    # NOTE: imported here: torch takes seconds to import and the other commands need none.
    from cpmctl.train.loop import train as run_training

    final = run_training(str(recipe), overrides, resume=resume, force=force)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(final)
