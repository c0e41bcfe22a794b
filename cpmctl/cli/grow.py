"""`cpmctl grow`."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer


class DepthMode(StrEnum):
    append = "append"
    interleave = "interleave"


class NewLayers(StrEnum):
    copy = "copy"
    init = "init"


class RouterInit(StrEnum):
    zero = "zero"
    orthogonal = "orthogonal"


def grow(
    source: Path = typer.Option(..., "--from", help="The model to grow (a model artifact)."),
    recipe: Path = typer.Option(
        ..., "--recipe", "-r", help="A recipe whose [model] is the architecture to grow into."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The grown model to write."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a recipe value: --set model.n_layers=8 (repeatable)."
    ),
    tokenizer: Path = typer.Option(
        None, "--tokenizer", "-t",
        help="A bigger tokenizer holding every piece of the model's own: the vocabulary is "
        "extended by piece string, and the grown model carries this tokenizer.",
    ),
    depth_mode: DepthMode = typer.Option(
        DepthMode.append, "--depth-mode",
        help="New blocks after the last one (append) or after the old ones (interleave).",
    ),
    new_layers: NewLayers = typer.Option(
        NewLayers.copy, "--new-layers",
        help="New blocks' weights copied from their neighbour or freshly initialised (their "
        "output projections are zero either way: the identity).",
    ),
    allow_inexact: bool = typer.Option(
        False, "--allow-inexact",
        help="Allow a width that is not an integer multiple (the function then changes; the "
        "deviation is reported).",
    ),
    split_noise: float = typer.Option(
        0.0, "--split-noise",
        help="Width: blend the block-diagonal copies with a random split of each weight "
        "(0-1) so that the copies get different gradients; the function stays the same to "
        "float rounding. With 0 and no dropout, copies train in lockstep.",
    ),
    router_init: RouterInit = typer.Option(
        RouterInit.zero, "--router-init",
        help="Dense -> MoE: router centroids zero (exact) or orthogonal with gain 0.01 "
        "(CPM-2's; gates move ~1%).",
    ),
    expert_noise: float = typer.Option(
        0.0, "--expert-noise",
        help="Dense -> MoE: add N(0, x^2) to every expert's weights (breaks exactness).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice and the probe."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUTPUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON."),
) -> None:
    """Grow a model into a recipe's bigger architecture, function-preserving where possible:
    more layers, ×k width, a bigger vocabulary, dense -> MoE. The largest change of a logit on
    a probe batch is measured and kept in the model's lineage.

    Example: cpmctl grow --from quickstart/runs/tiny-gpt/final --recipe big.toml -o models/big
    """
    # NOTE: imported here: torch is slow to import and most commands need none.
    from cpmctl.console import info, warn
    from cpmctl.errors import CpmError
    from cpmctl.grow import GrowOptions
    from cpmctl.grow import grow as grow_model
    from cpmctl.recipe import load_recipe

    for name, value in (("--split-noise", split_noise), ("--expert-noise", expert_noise)):
        if not 0.0 <= value <= (1.0 if name == "--split-noise" else float("inf")):
            raise CpmError(f"{name} must be {'in [0, 1]' if name == '--split-noise' else '>= 0'}"
                           f", not {value}")
    target = load_recipe(recipe, overrides).model
    options = GrowOptions(depth_mode=depth_mode.value, new_layers=new_layers.value,
                          allow_inexact=allow_inexact, split_noise=split_noise,
                          router_init=router_init.value, expert_noise=expert_noise, seed=seed)
    path, lineage = grow_model(source, target, output, options, tokenizer=tokenizer,
                               force=force)
    names = ", ".join(record["operator"] for record in lineage["operators"]) or "none"
    delta = lineage["max_abs_logit_delta"]
    info(f"grew {source} with {names}: max |Δlogit| {delta:.3g} on the probe batch")
    if delta > 1e-4:
        warn(f"the grown model's logits differ from the source's by up to {delta:.3g}")
    print(json.dumps({"model": str(path), **lineage}) if as_json else path)
