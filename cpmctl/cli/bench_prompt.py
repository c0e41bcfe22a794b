"""`cpmctl bench prompt`: prompt tuning's memory and speed against full fine-tuning and PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def prompt(
    model: Path = typer.Option(..., "--model", "-m",
                               help="A model artifact: its tokenizer encodes the data."),
    task: str = typer.Option("sentiment", "--task", "-t", help="A task name or .toml file."),
    train: Path = typer.Option(..., "--train", help="Training data in the task's format."),
    shape: str = typer.Option("cpm1-small", help="The recipe whose [model] shape is timed."),
    length: int = typer.Option(100, help="Prompt vectors (CPM-2: 100)."),
    batch: int = typer.Option(4, help="Examples per step (all their candidates)."),
    steps: int = typer.Option(3, help="Timed steps per method."),
    warmup: int = typer.Option(1, help="Untimed steps first."),
    precision: str = typer.Option("fp32", help="fp32 or bf16."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Peak memory and steps/s of prompt tuning at CPM-Small's shape (activations kept, and
    recomputed) against full fine-tuning and against PEFT prompt tuning on the same weights
    exported to transformers, same data, batch and prompt length, each in its own process.

    Example: cpmctl bench prompt -m quickstart/runs/tiny-gpt/final --train data/train.jsonl
    """
    # NOTE: imported here: torch takes seconds to import and the other benchmarks need none.
    from cpmctl.prompt.bench import bench_prompt

    report = bench_prompt(model, task, train, shape=shape, length=length, batch=batch,
                          steps=steps, warmup=warmup, precision=precision)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console(highlight=False)
    table = Table(title=f"{report['shape']} ({report['layers']} x {report['d_model']}), prompt "
                        f"{report['length']}, {report['candidates_per_step']} candidates "
                        f"({report['tokens_per_step']:,} tokens) a step, {report['precision']}, "
                        f"{report['threads']} threads", title_justify="left")
    for column in ("method", "steps/s", "peak RSS MB", "RSS before training MB", "weights MB",
                   "trainable"):
        table.add_column(column, justify="right")
    for run in report["runs"]:
        table.add_row(run["method"], f"{run['steps_per_s']:.3f}", f"{run['peak_rss_mb']:,.0f}",
                      f"{run['rss_before_training_mb']:,.0f}", f"{run['weights_mb']:,.0f}",
                      f"{run['trainable_parameters']:,}")
    console.print(table)
    console.print(f"prompt tuning: peak RSS {report['rss_vs_full_finetuning']:.2f}x full "
                  f"fine-tuning's and {report['rss_vs_peft']:.2f}x PEFT's; steps/s "
                  f"{report['speed_vs_peft']:.2f}x PEFT's, "
                  f"{report['speed_vs_full_finetuning']:.2f}x full fine-tuning's")
    console.print(f"with activations recomputed: peak RSS "
                  f"{report['recomputed_rss_vs_full_finetuning']:.2f}x full fine-tuning's and "
                  f"{report['recomputed_rss_vs_peft']:.2f}x PEFT's; steps/s "
                  f"{report['recomputed_speed_vs_peft']:.2f}x PEFT's")


def register(app: typer.Typer) -> None:
    """Add `bench prompt` to the `bench` group."""
    app.command("prompt")(prompt)
