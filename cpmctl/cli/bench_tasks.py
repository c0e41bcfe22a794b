"""`cpmctl bench run / tasks / data-prepare / lm-eval / zeroshot-speed`: zero-shot tasks."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cpmctl.errors import CpmError


def _table(title: str, columns: tuple[str, ...], rows) -> Console:
    console = Console(highlight=False)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)
    return console


def run(
    model: Path = typer.Option(..., "--model", "-m", help="A model (or checkpoint) artifact."),
    task: str = typer.Option(..., "--task", "-t",
                             help="A shipped task (see `cpmctl bench tasks`) or a task file."),
    data: Path = typer.Option(None, "--data", "-d", help="The data file, or a folder with the "
                              "task's split files (default: the task's package data)."),
    split: str = typer.Option(None, help="The split to read from a data folder (default: the "
                              "task's, usually dev)."),
    limit: int = typer.Option(None, help="Score the first N examples only."),
    batch_size: int = typer.Option(64, help="Sequences (candidates) per forward pass."),
    seed: int = typer.Option(0, help="Seed of sampled:K candidates and of generation."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    prompt: Path = typer.Option(None, "--prompt", "-p",
                                help="A prompt artifact (tune-prompt) to score with."),
    embeddings: Path = typer.Option(None, help="generate: a word2vec text file for the "
                                    "embedding metrics (default: the model's embeddings)."),
    output: Path = typer.Option(None, "--output", "-o",
                                help="Write the report artifact (results.json, results.md)."),
    force: bool = typer.Option(False, help="Replace an existing report at --output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Zero-shot evaluation of a model on a task: CPM-1's rule (cpm1), lm-eval's multiple
    choice (choice), encoder-decoder span filling (span), generation metrics (generate) or
    perplexity; accuracies with 95% Wilson intervals.

    Example: cpmctl bench run -m quickstart/runs/tiny-gpt/final -t sentiment --limit 200
    """
    from cpmctl.bench.report import metric_rows, write_report
    from cpmctl.bench.zeroshot import RunSettings, run_task, summary
    from cpmctl.console import info

    settings = RunSettings(model=str(model), task=task, data=None if data is None else str(data),
                           split=split, limit=limit, batch_size=batch_size, seed=seed,
                           device=device, dtype=dtype, prompt=None if prompt is None
                           else str(prompt), embeddings=None if embeddings is None
                           else str(embeddings))
    if output is not None:
        from cpmctl.artifacts import check_replaceable

        check_replaceable(output, force)  # before the work, not after it
    report = run_task(settings, progress=info)
    if output is not None:
        write_report(output, report, force=force)
        info(f"report: {output}")
    if as_json:
        print(json.dumps(summary(report), ensure_ascii=False, indent=2))
        return
    where = f"{report.get('data')}" + (f", {report['skipped']} skipped" if report.get("skipped")
                                       else "")
    console = _table(f"{report['task']} ({report['rule']}) on {report['model']}: {where}",
                     ("metric", "value", "detail"), metric_rows(report))
    per_class = report["metrics"].get("per_class")
    if per_class and len(per_class) <= 20:
        console.print("per class (gold n / correct / predicted): " + ", ".join(
            f"{label} {c['n']}/{c['correct']}/{c['predicted']}"
            for label, c in per_class.items()))
    if "examples_per_s" in report:
        console.print(f"{report['examples_read']:,} examples in {report['seconds']:.1f} s "
                      f"({report['examples_per_s']:.1f} examples/s)")


def tasks(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """The shipped tasks, their rules and the data each reads.

    Example: cpmctl bench tasks
    """
    from cpmctl.bench.tasks import load_task, shipped_tasks

    loaded = [load_task(name) for name in shipped_tasks()]
    rows = [(t.name, t.rule, t.candidates if t.rule in ("cpm1", "choice", "span") else "",
             t.package_data and f"installed packages ({t.package_data})" or t.reader,
             t.description) for t in loaded]
    if as_json:
        keys = ("name", "rule", "candidates", "data", "description")
        print(json.dumps([dict(zip(keys, r, strict=True))
                          for r in rows], ensure_ascii=False, indent=2))
        return
    _table("shipped tasks", ("task", "rule", "candidates", "data", "description"), rows)


def data_prepare(
    name: str = typer.Argument(..., help="sentiment or idiom-cloze."),
    output: Path = typer.Option(..., "--output", "-o", help="The folder for the JSONL files."),
    candidates: int = typer.Option(4, help="idiom-cloze: answers per example (4 or 7 as "
                                   "ChID's)."),
    force: bool = typer.Option(False, help="Replace a folder data-prepare wrote before."),
) -> None:
    """Write the data of a task that installed packages ship (train/dev/test JSONL), to see
    it or to use it elsewhere (tune-prompt --train, lm-eval tasks).

    Example: cpmctl bench data-prepare sentiment -o data/sentiment
    """
    from cpmctl.bench.tasks.package_data import write_package_data

    counts = write_package_data(name, output, candidates=candidates, force=force)
    for split, count in counts.items():
        print(f"{output / (split + '.jsonl')}\t{count}")


def lm_eval(
    model: Path = typer.Option(..., "--model", "-m", help="A model (or checkpoint) artifact."),
    task_names: str = typer.Option(..., "--tasks", help="lm-eval task names, comma-separated."),
    include_path: Path = typer.Option(None, help="A folder of your own lm-eval task YAML."),
    limit: int = typer.Option(None, help="Examples per task."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass."),
    num_fewshot: int = typer.Option(None, help="Few-shot examples (default: the task's)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    seed: int = typer.Option(0, help="lm-eval's random, numpy and torch seeds."),
    as_json: bool = typer.Option(False, "--json", help="Print lm-eval's results as JSON."),
) -> None:
    """Run lm-evaluation-harness tasks on a cpmctl model through its LM adapter (any task
    whose data you have: xnli_zh, xcopa_zh, ceval, cmmlu, or local YAML with --include-path).

    Example: cpmctl bench lm-eval -m work/cpm1 --tasks my_task --include-path tasks/
    """
    from cpmctl.bench.lm_eval_adapter import evaluate

    names = [n.strip() for n in task_names.split(",") if n.strip()]
    if not names:
        raise CpmError("--tasks: give at least one lm-eval task name")
    results = evaluate(str(model), names, include_path=include_path, limit=limit,
                       batch_size=batch_size, num_fewshot=num_fewshot, device=device,
                       dtype=dtype, seed=seed)
    if as_json:
        print(json.dumps(results["results"], ensure_ascii=False, indent=2, default=str))
        return
    rows = []
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            if key.endswith("_stderr,none") or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[-1]}")
            rows.append((name, metric, f"{value:.4f}",
                         f"{stderr:.4f}" if isinstance(stderr, float) else ""))
    _table(f"lm-evaluation-harness on {model}", ("task", "metric", "value", "stderr"), rows)


def zeroshot_speed(
    model: Path = typer.Option(None, "--model", "-m", help="A gpt model artifact."),
    recipe: str = typer.Option(None, "--recipe", "-r", help="Random weights of a recipe's "
                               "shape (e.g. cpm1-small) with --tokenizer's vocabulary."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="With --recipe: the tokenizer."),
    task: str = typer.Option("idiom-cloze", "--task", "-t", help="A choice task."),
    data: Path = typer.Option(None, "--data", "-d", help="The task's data (default: its "
                              "package data)."),
    limit: int = typer.Option(64, help="Examples timed per way."),
    batch_size: int = typer.Option(128, help="Candidates per forward pass (batched ways)."),
    lm_eval_hf: bool = typer.Option(True, "--hf/--no-hf", help="Also time `lm_eval --model "
                                    "hf` on the weights exported to Hugging Face format."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Examples/s of zero-shot scoring: batched, each context shared by its candidates,
    against one forward per candidate, against the candidates batched without sharing, and
    against lm-evaluation-harness's hf model on the same weights, in the same run; the
    accuracies of the ways are shown side by side.

    Example: cpmctl bench zeroshot-speed --recipe cpm1-small --tokenizer work/tokenizer
    """
    from cpmctl.bench.zeroshot_speed import bench_zeroshot_speed
    from cpmctl.console import info

    if (model is None) == (recipe is None):
        raise CpmError("give --model or --recipe (with --tokenizer)")
    if recipe is not None and tokenizer is None:
        raise CpmError("--recipe needs --tokenizer (the vocabulary of the random model)")
    report = bench_zeroshot_speed(model=model, recipe=recipe, tokenizer=tokenizer, task=task,
                                  data=data, limit=limit, batch_size=batch_size,
                                  lm_eval_hf=lm_eval_hf, progress=info)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    rows = [(r["way"], f"{r['examples_per_s']:.2f}", f"{r['seconds']:.1f}",
             f"{r['cpu_seconds']:.1f}", f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}")
            for r in report["runs"]]
    console = _table(f"{report['task']}: {report['examples']} examples on {report['model']} "
                     f"({report['threads']} threads)",
                     ("way", "examples/s", "seconds", "CPU seconds", "acc", "acc_norm"), rows)
    for name, ratio in report["ratios"].items():
        console.print(f"{name}: {ratio:.2f}x")


def register(app: typer.Typer) -> None:
    """Add these commands to the `bench` group."""
    app.command("run")(run)
    app.command("tasks")(tasks)
    app.command("data-prepare")(data_prepare)
    app.command("lm-eval")(lm_eval)
    app.command("zeroshot-speed")(zeroshot_speed)
