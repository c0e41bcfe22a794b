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
                  f"{report['speed_vs_full_finetuning']:.2f}x full fine-tuning's (in CPU "
                  f"seconds a step: {report['cpu_speed_vs_peft']:.2f}x and "
                  f"{report['cpu_speed_vs_full_finetuning']:.2f}x)")
    console.print(f"with activations recomputed: peak RSS "
                  f"{report['recomputed_rss_vs_full_finetuning']:.2f}x full fine-tuning's and "
                  f"{report['recomputed_rss_vs_peft']:.2f}x PEFT's; steps/s "
                  f"{report['recomputed_speed_vs_peft']:.2f}x PEFT's")


def prompt_accuracy(
    model: Path = typer.Option(..., "--model", "-m", help="A dense gpt model artifact."),
    task: str = typer.Option("sentiment", "--task", "-t", help="A task name or .toml file."),
    train: Path = typer.Option(..., "--train", help="Training data in the task's format."),
    test: Path = typer.Option(..., "--test", help="Held-out data both ways are scored on."),
    length: int = typer.Option(20, help="Prompt vectors, in front (PEFT's place)."),
    steps: int = typer.Option(300, help="Optimizer steps, each way."),
    batch: int = typer.Option(16, help="Examples per step."),
    lr: float = typer.Option(None, help="Learning rate (default: tune-prompt's, 5e-3)."),
    init: str = typer.Option("mask", help="mask, vocab or text:SOME TEXT (both start there)."),
    seed: int = typer.Option(0, help="Seeds the init and the data order."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Accuracy of cpmctl's prompt tuning and of PEFT's, trained alike (same model exported
    with `model convert --to hf`, same initial prompt, examples in the same order, AdamW, loss
    and steps) and scored on the same held-out examples, with 95% Wilson intervals.

    Example: cpmctl bench prompt-accuracy -m model -t t.toml --train tr.jsonl --test te.jsonl
    """
    from cpmctl.prompt.accuracy import compare_accuracy

    report = compare_accuracy(model, task, train, test, length=length, steps=steps,
                              batch=batch, lr=lr, init=init, seed=seed)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console(highlight=False)
    table = Table(title=f"{report['task']}: prompt {report['length']} in front, "
                        f"{report['steps']} steps of {report['batch']}, lr {report['lr']:g}, "
                        f"{report['test_examples']:,} test examples", title_justify="left")
    for column in ("way", "accuracy", "95% interval", "correct", "train s"):
        table.add_column(column, justify="right")
    for name, way in report["ways"].items():
        table.add_row(name, f"{way['value']:.1%}", f"{way['low']:.1%}-{way['high']:.1%}",
                      f"{way['correct']:,} / {way['n']:,}", f"{way['train_seconds']:.1f}")
    console.print(table)
    console.print(f"the same prediction on {report['same_prediction']:.1%} of the examples")


def register(app: typer.Typer) -> None:
    """Add `bench prompt` and `bench prompt-accuracy` to the `bench` group."""
    app.command("prompt")(prompt)
    app.command("prompt-accuracy")(prompt_accuracy)
