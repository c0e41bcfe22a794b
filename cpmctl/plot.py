"""`cpmctl plot`: the curves of one or more runs' metrics.jsonl, as a PNG and in the terminal.

    curves = read_curves(["runs/a", "runs/b"], metric="valid_loss", x="tokens")
    write_png(curves, "curves.png", metric="valid_loss", x="tokens")
    draw_in_terminal(curves, metric="valid_loss", x="tokens")

A run is a run folder (finished or still training: only metrics.jsonl is read). Its label is
the run's name (`[run] name` of its recipe.toml), or the folder's name without one; when two
runs share a name, their folders label them. matplotlib and plotext are the `plot` extra.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import CpmError

X_AXES = ("step", "tokens")
_EXTRA = "pip install 'cpmctl[plot]'"


@dataclass
class Curve:
    label: str
    xs: list[float]
    ys: list[float]


def _run_name(run: Path) -> str:
    try:
        return tomllib.loads((run / "recipe.toml").read_text(encoding="utf-8"))["run"]["name"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return run.name


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise CpmError(f"{run}: no metrics.jsonl (not a run folder)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise CpmError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CpmError(f"{path}:{number}: a metrics line needs an integer 'step'")
        records.append(record)
    return records


def read_curves(runs: list[str | Path], metric: str, x: str = "step") -> list[Curve]:
    """One curve per run: `metric` against the step or the tokens trained on so far."""
    if x not in X_AXES:
        raise CpmError(f"--x must be one of {', '.join(X_AXES)}, not {x!r}")
    if not runs:
        raise CpmError("plot: name at least one run")
    curves = []
    names = [_run_name(Path(run)) for run in runs]
    for run, name in zip(runs, names, strict=True):
        run = Path(run)
        records, tokens, xs, ys = _records(run), 0, [], []
        for record in records:
            tokens += int(record.get("tokens", 0))
            value = record.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(record["step"] if x == "step" else tokens)
                ys.append(float(value))
        if not ys:
            known = sorted({key for record in records for key in record} - {"step"})
            raise CpmError(f"{run}: its metrics.jsonl has no {metric!r} (it has: "
                           f"{', '.join(known) or 'nothing'})")
        if x == "tokens" and not tokens:
            raise CpmError(f"{run}: its metrics.jsonl records no 'tokens' for --x tokens")
        label = name if names.count(name) == 1 else str(run)
        curves.append(Curve(label, xs, ys))
    return curves


def write_png(curves: list[Curve], out: str | Path, metric: str, x: str,
              title: str | None = None) -> Path:
    """The curves as a PNG at `out`, written whole or not at all."""
    try:
        import matplotlib
    except ImportError:
        raise CpmError(f"plot -o needs matplotlib: {_EXTRA}") from None
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise CpmError(f"-o {out}: the plot is written as PNG; name it *.png")
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for curve in curves:
        axes.plot(curve.xs, curve.ys, label=curve.label, marker="." if len(curve.xs) < 30
                  else None)
    axes.set_xlabel("tokens" if x == "tokens" else "step")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, out)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return out


def draw_in_terminal(curves: list[Curve], metric: str, x: str) -> None:
    """The curves drawn with plotext on stdout (a terminal)."""
    try:
        import plotext
    except ImportError:
        raise CpmError(f"plot needs plotext to draw in the terminal: {_EXTRA}") from None
    plotext.clear_figure()
    for curve in curves:
        plotext.plot(curve.xs, curve.ys, label=curve.label)
    plotext.xlabel(x)
    plotext.ylabel(metric)
    plotext.show()
