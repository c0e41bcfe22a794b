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
    threads: int = typer.Option(0, help="PyTorch's compute threads (0: its default); the "
                                        "loader thread comes on top."),
    prefill_tokens: int = typer.Option(
        0, help="Also the prompt-heavy regime: prompts of this many tokens, one new token, "
                "in prompt tokens/s (0: off)."),
    prefill_batches: int = typer.Option(
        3, help="Batches of prompt-heavy prompts, generated in turn by one engine (its cache "
                "kept between them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate with the experts offloaded (25% resident by default, loads throttled to a
    simulated PCIe-like bandwidth), in each expert order, against the fully resident model
    and against synchronous on-demand loading, in one run on the same prompts: LRU and
    frequency caches, with and without the cross-layer prefetch, and pin; then read from the model's
    files for real, with the page cache cold and warm. Every run's tokens are compared with
    the resident model's. Beside the runs: the fewest loads any cache of the budget's size
    needs for this routing (Belady), and the ceiling on x resident they leave.

    Example: cpmctl bench moe --recipe tiny-moe --set model.moe.experts=8 --new-tokens 4
    """
    from cpmctl.bench.moe import MoeBenchSettings, bench_moe

    report = bench_moe(MoeBenchSettings(
        model=str(model) if model else None, recipe=recipe, overrides=tuple(overrides),
        batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        resident_fraction=resident_fraction, slots=slots, bandwidth_gb_s=simulate_bandwidth,
        dtype=dtype, workdir=str(workdir) if workdir else None, disk=disk, threads=threads,
        prefill_tokens=prefill_tokens, prefill_batches=prefill_batches), progress=info)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    console = Console(highlight=False, width=None if Console().is_terminal else 160)
    title = (f"{report['arch']} MoE, {report['moe_layers']} layers x "
             f"{report['experts_per_layer']} experts of {human_bytes(report['expert_bytes'])} "
             f"({human_bytes(report['expert_memory_bytes'])}); budget "
             f"{human_bytes(report['memory_budget_bytes'])} "
             f"({report['resident_experts']} experts); "
             f"batch {report['batch']}, {report['new_tokens']} new tokens; "
             f"{report['threads']} thread(s); simulated "
             f"{report['simulated_bandwidth_gb_s']:.3f} GB/s ({report['bandwidth_rule']}; "
             f"read {report['read_bandwidth_gb_s']:.1f} GB/s)")
    table = Table(title=title, title_justify="left")
    for column in ("run", "tokens/s", "x resident", "x on-demand", "decode tok/s",
                   "decode x res.", "hit rate", "moved/token", "stall s", "peak resident",
                   "storage read", "same tokens"):
        table.add_column(column, justify="right")
    for run in report["runs"]:
        table.add_row(run["run"], f"{run['tokens_per_s']:.2f}", f"{run['vs_resident']:.3f}",
                      f"{run['vs_on_demand']:.2f}", _number(run["decode_tokens_per_s"]),
                      _number(run["vs_resident_decode"], 3), *_offload_cells(run))
    console.print(table)
    bound = report["bound"]
    console.print(
        f"fewest loads for this routing with {bound['capacity_experts']} experts resident "
        f"(Belady): {bound['min_loads']} of {bound['uses']} uses "
        f"({bound['distinct_experts']} distinct experts), {bound['min_bus_s']:.2f} s of bus "
        f"-> at most {bound['ceiling_vs_resident']:.3f}x resident; decoding alone "
        f"({bound['decode_steps']} steps): {bound['decode_min_loads']} of "
        f"{bound['decode_uses']}, {bound['decode_min_bus_s']:.2f} s -> at most "
        f"{_number(bound['decode_ceiling_vs_resident'], 3)}x resident (with "
        + ", ".join(f"{float(f):.0%} resident: {_number(c, 3)}x"
                    for f, c in bound["decode_ceiling_by_resident_fraction"].items()) + ")")
    for regime in report["regimes"]:
        console.print(f"{regime['regime']}: {regime['tokens_per_expert']:.1f} tokens per "
                      f"expert; an A100's load / compute there "
                      f"{regime['a100_load_over_compute']:.1f} (this simulation: "
                      + (f"{regime['simulated_load_over_compute']:.1f})"
                         if "simulated_load_over_compute" in regime else
                         f"{report['simulated_load_over_read']:.1f} where compute reads "
                         f"weights at the read bandwidth)"))
    prefetching = next(r for r in report["runs"] if r.get("prefetch"))
    p = prefetching["prefetch"]
    console.print(f"prefetch ({prefetching['run']}): {p['correct']} of {p['used']} experts "
                  f"used were predicted (recall {100 * p['recall']:.1f}%, precision "
                  f"{100 * p['precision']:.1f}%); {p['loads']} prefetch loads, {p['wasted']} "
                  f"never used")
    if report["prefill_runs"]:
        regime = report["regimes"][-1]
        console.print("warm: the batches after the first, which fills the cache")
        rows = Table(title=f"prompt-heavy regime: {report['prefill_batches']} batches of "
                           f"{report['batch']} prompts of {report['prefill_tokens']} tokens, "
                           f"1 new token; simulated {regime['simulated_bandwidth_gb_s']:.3f} "
                           f"GB/s ({regime['bandwidth_rule']})", title_justify="left")
        for column in ("run", "prompt tok/s", "x resident", "x on-demand", "warm tok/s",
                       "warm x res.", "warm x on-d.", "hit rate", "moved/token", "stall s",
                       "peak resident", "storage read", "same tokens"):
            rows.add_column(column, justify="right")
        for run in report["prefill_runs"]:
            rows.add_row(run["run"], f"{run['prompt_tokens_per_s']:.1f}",
                         f"{run['vs_resident']:.3f}", f"{run['vs_on_demand']:.2f}",
                         _number(run["warm_prompt_tokens_per_s"], 1),
                         _number(run["vs_resident_warm"], 3),
                         _number(run["vs_on_demand_warm"]), *_offload_cells(run))
        console.print(rows)
    main = next(r for r in report["runs"] if r["run"] == "offloaded heavy-first")
    layers = Table(title="hit rate per MoE layer (offloaded heavy-first; with frequency + "
                         "prefetch)", title_justify="left")
    for column in ("layer", "hits", "misses", "hit rate", "frequency+prefetch"):
        layers.add_column(column, justify="right")
    for layer, other in zip(main["layers"], prefetching["layers"], strict=True):
        layers.add_row(layer["layer"], str(layer["hits"]), str(layer["misses"]),
                       f"{100 * layer['hit_rate']:.1f}%", f"{100 * other['hit_rate']:.1f}%")
    console.print(layers)


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _offload_cells(run: dict) -> list[str]:
    """hit rate, moved/token, stall, peak resident, storage read, same tokens."""
    per_token = run.get("bytes_moved_per_token")
    read = run.get("storage_read_bytes")
    return [f"{100 * run['hit_rate']:.1f}%" if "hit_rate" in run else "-",
            human_bytes(per_token) if per_token else "-",
            f"{run['stall_s']:.2f}" if "stall_s" in run else "-",
            human_bytes(run["peak_resident_expert_bytes"]) if "layers" in run else "-",
            human_bytes(read) if read is not None else "-",
            "yes" if run["identical"] else "NO"]


def register(app: typer.Typer) -> None:
    """Add `bench moe` to the `bench` group."""
    app.command("moe")(moe)
