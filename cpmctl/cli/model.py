"""`cpmctl model ...`: info."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Models: info.", no_args_is_help=True)


def _human(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.{1 if count < 100 * size else 0}f}{unit}"
    return str(count)


@app.command("info")
def info(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A TOML recipe."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe value: --set model.n_layers=24 (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The architecture of a recipe and its parameter count, counted on the meta device
    (nothing is allocated, so cpm2-moe's 198B parameters take seconds).

    Example: cpmctl model info --recipe recipes/cpm1-large.toml
    """
    # NOTE: imported here, not at the top: torch takes ~2.5 s to import, and every other
    # command (data, tokenizer) would pay it at start-up.
    from cpmctl.models import count_parameters, validate_config
    from cpmctl.recipe import load_recipe

    model = load_recipe(recipe, overrides).model
    validate_config(model)
    summary = {
        "recipe": str(recipe),
        "arch": model.arch,
        "layers": model.n_layers if model.arch == "gpt"
        else f"{model.n_layers}+{model.decoder_layers}",
        "d_model": model.d_model,
        "heads": f"{model.n_heads} x {model.head_size}",
        "d_ff": model.ffn_size,
        "vocab_size": model.vocab_size,
        "experts": model.moe.experts,
        "parameters": count_parameters(model),
    }
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"{recipe}: {_human(summary['parameters'])} parameters",
                  show_header=False, title_justify="left")
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console(highlight=False).print(table)
