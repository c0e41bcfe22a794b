"""`cpmctl plot`."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path

import typer


class XAxis(StrEnum):
    step = "step"
    tokens = "tokens"


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (their metrics.jsonl)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the curves as a PNG."),
    metric: str = typer.Option("valid_loss", "--metric", "-m",
                               help="The metrics.jsonl field to plot (loss, lm_loss, ...)."),
    x: XAxis = typer.Option(XAxis.step, "--x", help="The x axis: optimizer step or tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the curves' points as JSON."),
) -> None:
    """Compare runs by their curves: a PNG with -o, and drawn in the terminal when stdout is
    one. Labels are the runs' names.

    Example: cpmctl plot runs/scratch runs/grown -o curves.png --metric valid_loss --x tokens
    """
    from cpmctl.errors import CpmError
    from cpmctl.plot import draw_in_terminal, read_curves, write_png

    curves = read_curves(runs, metric, x.value)
    terminal = sys.stdout.isatty()
    if output is None and not terminal and not as_json:
        raise CpmError("plot: stdout is not a terminal; pass -o FILE.png (or --json)")
    if output is not None:
        write_png(curves, output, metric, x.value)
    if as_json:
        print(json.dumps([{"label": c.label, "x": c.xs, metric: c.ys} for c in curves]))
    elif terminal:
        draw_in_terminal(curves, metric, x.value)
    if output is not None and not as_json:
        print(output)
