"""`cpmctl model ...`: info, convert, reshard."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cpmctl.errors import CpmError

app = typer.Typer(help="Models: info, convert, reshard.", no_args_is_help=True)


class ForeignFormat(StrEnum):
    """Checkpoint formats `model convert` reads and writes."""

    hf = "hf"  # a Hugging Face transformers GPT-2 folder (CPM-Generate's published form)


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


@app.command("convert")
def convert(
    source: Path = typer.Argument(
        ..., help="With --from hf: a Hugging Face GPT-2 folder; with --to hf: a model artifact."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The model or folder to write."),
    from_format: ForeignFormat = typer.Option(
        None, "--from", help="Read SOURCE in this format into a cpmctl model."
    ),
    to_format: ForeignFormat = typer.Option(
        None, "--to", help="Write the cpmctl model SOURCE in this format."
    ),
    tokenizer: Path = typer.Option(
        None, "--tokenizer", "-t",
        help="--from hf: a tokenizer artifact or CPM-1's chinese_vocab.model (default: "
        "tokenizer/, chinese_vocab.model or spiece.model in SOURCE).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUTPUT."),
) -> None:
    """Convert a CPM-1 model between Hugging Face's GPT-2 format and a cpmctl model.

    --from hf: config.json + model.safetensors or pytorch_model.bin (or shards).

    A .bin is read only with torch.load(weights_only=True): tensors, no code.

    --to hf: config.json + model.safetensors + tokenizer/, for GPT2LMHeadModel.

    Example: cpmctl model convert --from hf CPM-Generate/ -o work/cpm1
    """
    if (from_format is None) == (to_format is None):
        raise CpmError("model convert: give one of --from hf or --to hf")
    if to_format and tokenizer is not None:
        raise CpmError("--tokenizer goes with --from hf; --to hf takes the model's own tokenizer")
    # NOTE: imported here: torch is slow to import (see info).
    from cpmctl.models.convert import convert_from_hf, convert_to_hf

    if from_format:
        print(convert_from_hf(source, output, tokenizer=tokenizer, force=force))
    else:
        print(convert_to_hf(source, output, force=force))


@app.command("reshard")
def reshard(
    source: Path = typer.Argument(..., help="A model artifact (one file or already sharded)."),
    output: Path = typer.Option(..., "--output", "-o", help="The sharded model to write."),
    max_shard_size: str = typer.Option(
        "2GB", help="The largest shard file, e.g. 2GB or 512MiB (an expert is never split; "
                    "a bigger one gets a shard of its own)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUTPUT model."),
) -> None:
    """Write a model as model-NNNNN.safetensors shards + model.safetensors.index.json, each
    MoE expert readable alone (what generate --offload reads), one tensor at a time: the
    model is never held in memory whole.

    Example: cpmctl model reshard work/moe --max-shard-size 2GB -o work/moe-sharded
    """
    from cpmctl.data.shards import parse_size
    from cpmctl.models.shard import reshard_model

    print(reshard_model(source, output, max_shard_bytes=parse_size(max_shard_size,
                                                                    "--max-shard-size"),
                        force=force))
