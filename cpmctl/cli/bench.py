"""`cpmctl bench ...`: data, speed, train, perplexity; the zero-shot tasks (bench_tasks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cpmctl.bench.corpus import bench_data_build
from cpmctl.bench.tokenizer import bench_tokenizer
from cpmctl.cli import bench_moe, bench_prompt, bench_tasks
from cpmctl.errors import CpmError

app = typer.Typer(help="Benchmarks, each against a baseline measured in the same run.",
                  no_args_is_help=True)


def _counts(value: str, option: str = "--workers") -> list[int]:
    """A comma-separated list of positive integers (worker counts, batch sizes), sorted."""
    try:
        counts = sorted({int(w) for w in value.split(",")})
    except ValueError:
        raise CpmError(f"{option}: expected numbers like 1,2, not {value!r}") from None
    if counts[0] < 1:
        raise CpmError(f"{option} must be at least 1")
    return counts


def _precisions(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """--precisions: some of `allowed` (inference's fp32, bf16, int8), comma-separated."""
    from cpmctl.infer.load import PRECISIONS

    allowed = allowed or tuple(PRECISIONS)
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    if not chosen or any(p not in allowed for p in chosen):
        raise CpmError(f"--precisions: expected some of {', '.join(allowed)}, got {text!r}")
    return chosen


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple]) -> Console:
    console = Console(highlight=False)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)
    return console


@app.command("data")
def data(
    inputs: list[str] = typer.Argument(
        None, help="Inputs for data build (default: the package corpus of the quick start)."
    ),
    workers: str = typer.Option("1,2", help="Comma-separated worker counts to compare."),
    repeat: int = typer.Option(1, help="Runs per setting; the fastest counts."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Throughput of `data build`: 1 worker against N, exact dedup against MinHash.

    Example: cpmctl bench data --workers 1,2 --repeat 2
    """
    counts = _counts(workers)
    if repeat < 1:
        raise CpmError("--repeat must be at least 1")
    report = bench_data_build(inputs, counts, repeat)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    rows = [(run["dedup"], run["workers"], f"{run['seconds']:.2f}", f"{run['mb_per_s']:.2f}",
             f"{run['docs_per_s']:,}", f"{run['kept']:,}") for run in report["runs"]]
    console = _print_table(f"data build on {report['input_mb']} MB, {report['documents']:,} "
                           "documents", ("dedup", "workers", "seconds", "MB/s", "docs/s", "kept"),
                           rows)
    for mode, ratio in report["speedup_vs_1_worker"].items():
        console.print(f"{mode}: {ratio:.2f}x faster on {counts[-1]} workers than on 1")
    console.print(f"minhash costs {report['minhash_cost_vs_exact']:.2f}x the exact-dedup time")
    for mode, same in report["identical_output_across_workers"].items():
        console.print(f"{mode}: output {'identical' if same else 'DIFFERENT'} across worker counts")


@app.command("speed")
def speed(
    tokenizer: Path = typer.Option(None, "--tokenizer", "-t", help="A tokenizer artifact."),
    corpus: Path = typer.Option(None, "--corpus", help="A corpus artifact to tokenize."),
    workers: str = typer.Option("1,2", help="Tokenizer: comma-separated worker counts (1 is "
                                "needed)."),
    model: Path = typer.Option(None, "--model", "-m", help="Generation: a model artifact."),
    recipe: str = typer.Option(None, "--recipe", "-r", help="Generation: random weights of a "
                               "recipe's shape (file or name, e.g. cpm1-small)."),
    precisions: str = typer.Option("fp32,bf16,int8", "--precisions",
                                   help="Generation: fp32, bf16, int8 (comma-separated)."),
    batches: str = typer.Option("1,8", "--batches", help="Generation: batch sizes."),
    prompt_tokens: int = typer.Option(32, help="Generation: prompt length in tokens."),
    new_tokens: int = typer.Option(128, help="Generation: new tokens per prompt."),
    device: str = typer.Option("cpu", help="Generation: cpu or cuda."),
    threads: int = typer.Option(None, help="Generation: torch threads (default: all cores)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="Generation: also time transformers' GPT-2 generate."),
    module_step: bool = typer.Option(False, "--module-step",
                                     help="Generation: also time each run stepping through "
                                     "the module forward instead of the planned step."),
    repeat: int = typer.Option(1, help="Runs per setting; the fastest counts."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Speed against a baseline. With --tokenizer and --corpus: data tokenize on 1 and N
    workers against the bare jieba + SentencePiece loop. With --model (or --recipe): generation
    prefill and decode tokens/s, peak memory and effective GB/s for fp32, bf16 and int8 at
    batch 1 and 8, against transformers' generate on the same weights and the machine's
    memory bandwidth.

    Example: cpmctl bench speed --recipe cpm1-small --batches 1
    """
    if repeat < 1:
        raise CpmError("--repeat must be at least 1")
    if (model or recipe) and (tokenizer or corpus):
        raise CpmError("--model/--recipe (generation) and --tokenizer/--corpus (tokenizer) "
                       "are two benchmarks: run them separately")
    if model or recipe:
        if model and recipe:
            raise CpmError("--model and --recipe: give one")
        _speed_generation(str(model) if model else None, recipe, precisions, batches,
                          prompt_tokens, new_tokens, repeat, device, threads, baseline, as_json,
                          module_step)
        return
    if not (tokenizer and corpus):
        raise CpmError("bench speed needs --tokenizer and --corpus, or --model / --recipe")
    counts = _counts(workers)
    if counts[0] != 1:
        raise CpmError("--workers must include 1: the other counts are compared with it")
    report = bench_tokenizer(tokenizer, corpus, counts, repeat)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    rows = [(run["what"], run["workers"], f"{run['seconds']:.2f}", f"{run['mb_per_s']:.2f}")
            for run in report["runs"]]
    console = _print_table(f"{report['scheme']} tokenizer on {report['megabytes']} MB, "
                           f"{report['documents']:,} documents",
                           ("run", "workers", "seconds", "MB/s"), rows)
    scaling = report["scaling"]
    console.print(f"{scaling['workers']} workers: {scaling['speedup_vs_1']:.2f}x one worker")
    console.print(f"one worker: {report['overhead_vs_bare_loop']:.2f}x the bare loop's time")


def _speed_generation(model, recipe, precisions, batches, prompt_tokens, new_tokens, repeat,
                      device, threads, baseline, as_json, module_step) -> None:
    # NOTE: imported here: torch takes seconds to import and `import cpmctl.cli` stays free of it.
    from cpmctl.bench.generation import bench_generation
    from cpmctl.console import info
    from cpmctl.infer.load import check_threads

    chosen = _precisions(precisions)
    sizes = _counts(batches, "--batches")
    if threads is not None:
        check_threads(threads)
    if prompt_tokens < 1 or new_tokens < 1:
        raise CpmError("--prompt-tokens and --new-tokens must be at least 1")
    report = bench_generation(model=model, recipe=recipe, precisions=chosen, batches=sizes,
                              prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              repeat=repeat, device=device, threads=threads,
                              baseline=baseline, module_step=module_step,
                              progress=lambda what: info(f"timing {what}"))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    short = {"transformers": "hf", "cpmctl-modules": "modules"}
    rows = [(short.get(r["impl"], r["impl"]), r["precision"], r["batch"],
             f"{r['prefill_tok_s']:,.0f}",
             f"{r['decode_tok_s']:,.1f}", f"{r['weights_mb']:,.0f}", f"{r['peak_mb']:,.0f}",
             f"{r['effective_gb_s']:.2f}") for r in report["runs"]]
    console = _print_table(
        f"{report['model']}: {report['prompt_tokens']}-token prompts, {report['new_tokens']} "
        f"new tokens, {report['device']}, {report['threads']} threads",
        ("impl", "dtype", "batch", "prefill/s", "decode/s", "weights MB", "peak MB", "GB/s"),
        rows)
    console.print("hf: transformers' GPT2LMHeadModel.generate on the same weights; "
                  "modules: ours stepping through the module forward; "
                  "prefill/s, decode/s: tokens per second; weights MB: what a decoding step "
                  "reads (an encoder-decoder's decoder and head); GB/s: those bytes x decoding "
                  f"steps per second, against a memory read bandwidth of "
                  f"{report['memory_bandwidth_gb_s']:.2f} GB/s measured in this run")
    dense = {r["precision"]: r["matmul_kernel"] for r in report["runs"] if "matmul_kernel" in r}
    if dense:
        console.print("fp32/bf16 matmuls: " + ", ".join(f"{p} {k}" for p, k in dense.items()))
    kernels = sorted({r["int8_kernel"] for r in report["runs"] if "int8_kernel" in r})
    if kernels:
        console.print(f"int8 matmuls: {', '.join(kernels)} (CPMCTL_INT8_KERNEL=torch picks "
                      "PyTorch's)")
    for run in report["runs"]:
        if run["impl"] != "cpmctl":
            continue
        parts = []
        if "vs_transformers" in run:
            theirs = "bf16" if run["precision"] == "int8" else run["precision"]
            parts.append(f"{run['vs_transformers']:.2f}x transformers' {theirs}")
        if run.get("of_bandwidth") is not None:
            parts.append(f"{run['of_bandwidth']:.0%} of the measured bandwidth limit")
        if "vs_batch_1" in run:
            parts.append(f"{run['vs_batch_1']:.2f}x batch 1's tokens/s")
        if "vs_module_step" in run:
            parts.append(f"{run['vs_module_step']:.2f}x the module forward's steps (prefill "
                         f"{run['prefill_vs_module_step']:.2f}x)")
        console.print(f"{run['precision']} batch {run['batch']}: decodes at " + ", ".join(parts))


@app.command("perplexity")
def perplexity(
    model: Path = typer.Option(..., "--model", "-m", help="A gpt model artifact."),
    dataset: Path = typer.Option(..., "--dataset", "-d",
                                 help="A dataset tokenized with the model's tokenizer."),
    split: str = typer.Option("valid", help="The dataset split to score."),
    max_tokens: int = typer.Option(100_000, help="Score the split's first N tokens."),
    window: int = typer.Option(0, help="Tokens of context per window (0: the model's)."),
    precisions: str = typer.Option("fp32,bf16,int8", "--precisions",
                                   help="fp32, bf16, int8 (comma-separated)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Perplexity of a gpt model on held-out tokens in fp32, bf16 and int8, each as `cpmctl
    generate` runs it, against bf16 in the same run.

    Example: cpmctl bench perplexity -m quickstart/runs/tiny-gpt/final -d quickstart/dataset
    """
    from cpmctl.bench.perplexity import bench_perplexity
    from cpmctl.console import info

    chosen = _precisions(precisions)
    if max_tokens < 2 or window < 0:
        raise CpmError("--max-tokens must be at least 2 and --window at least 0")
    report = bench_perplexity(model=str(model), dataset=str(dataset), split=split,
                              max_tokens=max_tokens, window=window or None, precisions=chosen,
                              progress=lambda what: info(f"scoring {what}"))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    rows = [(r["precision"], f"{r['perplexity']:.3f}",
             f"{r['vs_bf16']:+.2%}" if "vs_bf16" in r else "", f"{r['seconds']:.1f}")
            for r in report["runs"]]
    console = _print_table(
        f"{report['model']} on {report['tokens']:,} tokens of {report['dataset']} "
        f"({report['split']}), windows of {report['window']}",
        ("precision", "perplexity", "vs bf16", "seconds"), rows)
    kernels = [r["int8_kernel"] for r in report["runs"] if "int8_kernel" in r]
    if kernels:
        console.print(f"int8 matmuls: {kernels[0]}")


@app.command("train")
def train(
    recipe: str = typer.Option("tiny-gpt", "--recipe", "-r", help="A gpt recipe (file or name)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe value."),
    steps: int = typer.Option(20, help="Timed steps per model and precision (after 3 warmup)."),
    precisions: str = typer.Option("fp32,bf16", "--precisions",
                                   help="fp32, bf16 (comma-separated)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Training tokens/s of our GPT against transformers' GPT2LMHeadModel of the same shape,
    batch and optimizer, in fp32 and bf16, with achieved FLOP/s; the two models' steps
    alternate and each side's rate is its median step. Ours runs as `cpmctl train` would run
    the recipe (its blocks compiled with `--set engine.compile=true`).

    Example: cpmctl bench train --recipe tiny-gpt --steps 30
    """
    # NOTE: imported here: torch takes seconds to import and the other benchmarks need none.
    from cpmctl.bench.train import bench_training
    from cpmctl.recipe import load_recipe

    chosen = _precisions(precisions, ("fp32", "bf16"))
    loaded = load_recipe(recipe, overrides)
    if steps < 1:
        raise CpmError("--steps must be at least 1")
    report = bench_training(loaded.model, loaded.train.micro_batch, loaded.data.seq_len, steps,
                            compile=loaded.engine.compile, precisions=chosen)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    shape = report["shape"]
    rows = [(r["model"], r["precision"], f"{r['tokens_per_s']:,.0f}", f"{r['gflop_per_s']:.2f}")
            for r in report["runs"]]
    console = _print_table(
        f"training {shape['layers']} layers x {shape['d_model']}, batch {report['batch']} x "
        f"{report['seq_len']}, {report['threads']} threads"
        + (", cpmctl's blocks compiled" if report["compiled"] else ""),
        ("model", "precision", "tokens/s", "GFLOP/s"), rows)
    for precision, ratio in report["speedup"].items():
        console.print(f"{precision}: cpmctl is {ratio:.2f}x transformers")


# the zero-shot task commands: run, tasks, data-prepare, lm-eval, zeroshot-speed
bench_tasks.register(app)
bench_prompt.register(app)
bench_moe.register(app)


@app.command("ki")
def ki(
    dataset: Path = typer.Option(Path("quickstart/dataset"), "--dataset", "-d",
                                 help="The quick start's dataset (cpmctl quickstart)."),
    workdir: Path = typer.Option(Path("bench-ki"), "--workdir",
                                 help="Where the runs and the grown model are written."),
    steps: int = typer.Option(500, help="Optimizer steps of every run (tiny-gpt's: 500)."),
    teacher: Path = typer.Option(
        None, "--teacher", help="A trained tiny-gpt to use as the teacher instead of training "
        "one (e.g. quickstart/runs/tiny-gpt/final)."),
    split_noise: float = typer.Option(0.5, "--split-noise",
                                      help="cpmctl grow --split-noise for the grown runs."),
    plot: Path = typer.Option(None, "--plot", help="Write the validation curves as this PNG "
                              "(default: WORKDIR/ki-curves.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Knowledge-inherited growth against training from scratch: a student twice tiny-gpt's
    width and depth trained (a) from scratch, (b) with the KI loss, (c) grown from the teacher,
    (d) grown + KI; steps each needs to reach the scratch run's final validation loss.

    Example: cpmctl bench ki --dataset quickstart/dataset --steps 100 --plot docs/ki-curves.png
    """
    # NOTE: imported here: torch takes seconds to import and the other benchmarks need none.
    from cpmctl.bench.ki import KiSettings, bench_ki, plot_ki

    report = bench_ki(KiSettings(dataset=str(dataset), workdir=str(workdir), steps=steps,
                                 teacher=None if teacher is None else str(teacher),
                                 split_noise=split_noise))
    report["plot"] = str(plot_ki(report, plot or workdir / "ki-curves.png"))
    if as_json:
        print(json.dumps(report, indent=2))
        return

    def show(value, fmt):
        return "never" if value is None else format(value, fmt)

    rows = [(r["run"], show(r["steps_to_scratch_final"], ".1f"),
             show(r["ratio_to_scratch"], ".2f"), show(r["steps_with_teacher"], ".1f"),
             show(r["ratio_with_teacher"], ".2f"), f"{r['final_valid_loss']:.4f}",
             f"{r['seconds']:.0f}", f"{r['teacher_seconds']:.1f}") for r in report["rows"]]
    console = _print_table(
        f"tiny-gpt x2 width and depth, {report['steps']} steps each; target: the scratch run's "
        f"final validation loss {report['scratch_final_valid_loss']:.4f}",
        ("run", "steps", "ratio", "+teacher", "ratio", "final", "wall s", "fwd s"), rows)
    for r in report["rows"]:
        console.print(f"{r['run']}: {r['description']}")
    console.print("steps: to the target, interpolated between evaluations; ratio: to the "
                  "scratch run's; final: validation loss; fwd s: in the teacher's forward passes")
    console.print(f"+teacher: adding the teacher's {report['teacher_steps']} training steps and "
                  "its forward passes while distilling, in student steps of equal FLOPs (a "
                  f"teacher token costs {report['teacher_flops_per_student_token']:.2f} of a "
                  "student's)")
    if report["best"] is not None:
        console.print(f"best: {report['best']}, {report['best_ratio']:.2f}x the scratch run's "
                      "steps")
    console.print(f"grown model at init: max |Δlogit| {report['grow_max_abs_logit_delta']:.2g} "
                  f"against the teacher; plot: {report['plot']}")
