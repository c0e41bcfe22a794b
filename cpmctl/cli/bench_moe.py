"""`cpmctl bench moe`: offloaded MoE inference against the resident model and on-demand loading."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cpmctl.console import info
from cpmctl.resources import human_bytes


def moe(
    model: Path = typer.Option(None, "--model", "-m", help="An MoE model artifact."),
    recipe: str = typer.Option(
        None, "--recipe", "-r", help="Or a recipe: its model with random weights, written "
                                     "sharded to a temporary folder (removed afterwards)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a --recipe value: --set model.n_layers=8 (repeatable)."),
    batch: int = typer.Option(8, help="Prompts generated together."),
    prompt_tokens: int = typer.Option(16, help="Tokens per (random) prompt."),
    new_tokens: int = typer.Option(8, help="Tokens generated per prompt (greedy)."),
    resident_fraction: float = typer.Option(
        0.25, help="The memory budget, as a fraction of all the experts' memory."),
    slots: int = typer.Option(3, help="Slots of the offloaded runs (>= 2)."),
    simulate_bandwidth: float = typer.Option(
        0.0, help="GB/s of the SIMULATED load path (0: this machine's read bandwidth x "
                  "PCIe 4 / A100 HBM2)."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    workdir: Path = typer.Option(None, help="Where --recipe's weights are written (default: "
                                            "the system's temporary folder)."),
    disk: bool = typer.Option(True, help="Also run from the model's files, cold and warm."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate with the experts offloaded (25% resident by default, loads throttled to a
    simulated PCIe-like bandwidth), in each expert order, against the fully resident model
    and against synchronous on-demand loading, in one run on the same prompts; then read
    from the model's files for real, with the page cache cold and warm. Every run's tokens
    are compared with the resident model's.

    Example: cpmctl bench moe --recipe tiny-moe --set model.moe.experts=8 --new-tokens 4
    """
    from cpmctl.bench.moe import MoeBenchSettings, bench_moe

    report = bench_moe(MoeBenchSettings(
        model=str(model) if model else None, recipe=recipe, overrides=tuple(overrides),
        batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        resident_fraction=resident_fraction, slots=slots, bandwidth_gb_s=simulate_bandwidth,
        dtype=dtype, workdir=str(workdir) if workdir else None, disk=disk), progress=info)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    console = Console(highlight=False, width=None if Console().is_terminal else 160)
    title = (f"{report['arch']} MoE, {report['moe_layers']} layers x "
             f"{report['experts_per_layer']} experts of {human_bytes(report['expert_bytes'])} "
             f"({human_bytes(report['expert_memory_bytes'])}); budget "
             f"{human_bytes(report['memory_budget_bytes'])} "
             f"({report['resident_experts']} experts); "
             f"batch {report['batch']}, {report['new_tokens']} new tokens; simulated "
             f"{report['simulated_bandwidth_gb_s']:.3f} GB/s ({report['bandwidth_rule']}; "
             f"read {report['read_bandwidth_gb_s']:.1f} GB/s)")
    table = Table(title=title, title_justify="left")
    for column in ("run", "tokens/s", "x resident", "x on-demand", "hit rate",
                   "moved/token", "stall s", "peak resident", "storage read", "same tokens"):
        table.add_column(column, justify="right")
    for run in report["runs"]:
        per_token = run.get("bytes_moved_per_token")
        read = run.get("storage_read_bytes")
        table.add_row(
            run["run"], f"{run['tokens_per_s']:.2f}", f"{run['vs_resident']:.3f}",
            f"{run['vs_on_demand']:.2f}",
            f"{100 * run['hit_rate']:.1f}%" if "hit_rate" in run else "-",
            human_bytes(per_token) if per_token else "-",
            f"{run['stall_s']:.2f}" if "stall_s" in run else "-",
            human_bytes(run["peak_resident_expert_bytes"]) if "layers" in run else "-",
            human_bytes(read) if read is not None else "-", "yes" if run["identical"] else "NO")
    console.print(table)
    main = next(r for r in report["runs"] if r["run"] == "offloaded heavy-first")
    layers = Table(title="hit rate per MoE layer (offloaded heavy-first)", title_justify="left")
    for column in ("layer", "hits", "misses", "hit rate"):
        layers.add_column(column, justify="right")
    for layer in main["layers"]:
        layers.add_row(layer["layer"], str(layer["hits"]), str(layer["misses"]),
                       f"{100 * layer['hit_rate']:.1f}%")
    console.print(layers)


def register(app: typer.Typer) -> None:
    """Add `bench moe` to the `bench` group."""
    app.command("moe")(moe)
