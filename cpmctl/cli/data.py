"""`cpmctl data ...`: build, inspect."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from cpmctl.console import info
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.data.clean import FilterSettings, read_blocklist
from cpmctl.data.dedup import MinHashSettings
from cpmctl.data.shards import parse_size
from cpmctl.data.tokenize import tokenize_corpus
from cpmctl.errors import CpmError
from cpmctl.inspect import inspect_artifact, render_summary

app = typer.Typer(help="Corpora and datasets: build, tokenize, inspect.", no_args_is_help=True)

_defaults = FilterSettings()
_minhash = MinHashSettings()


@app.command("build")
def build(
    inputs: list[str] = typer.Argument(
        ..., help="Text, JSONL or Parquet files (optionally .gz/.zst), folders, or - for stdin."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The corpus artifact to write."),
    text_field: str = typer.Option("text", help="The JSONL field / Parquet column with the text."),
    input_format: str = typer.Option(
        None, "--format", help="Read every input as text, jsonl or parquet (default: by suffix)."
    ),
    split: str = typer.Option("line", help="Plain text: a document per 'line' or per 'paragraph'."),
    min_chars: int = typer.Option(_defaults.min_chars, help="Drop shorter documents."),
    max_chars: int = typer.Option(_defaults.max_chars, help="Drop longer documents."),
    min_cjk_ratio: float = typer.Option(
        _defaults.min_cjk_ratio, help="Drop documents with a lower share of CJK characters."
    ),
    max_symbol_ratio: float = typer.Option(
        _defaults.max_symbol_ratio, help="Drop documents with a higher share of symbols."
    ),
    max_repeated_line_ratio: float = typer.Option(
        _defaults.max_repeated_line_ratio, help="Drop documents whose repeated lines hold more."
    ),
    max_repeated_ngram_ratio: float = typer.Option(
        _defaults.max_repeated_ngram_ratio,
        help="Drop documents with more characters inside repeated character n-grams.",
    ),
    repeated_ngram: int = typer.Option(_defaults.repeated_ngram, help="n of that n-gram filter."),
    blocklist: Path = typer.Option(None, help="Drop documents containing a phrase of this file."),
    dedup: str = typer.Option("minhash", help="none, exact, or minhash (exact + near-duplicate)."),
    minhash_bands: int = typer.Option(_minhash.bands, help="MinHash LSH bands."),
    minhash_rows: int = typer.Option(_minhash.rows, help="MinHash values per band."),
    shingle: int = typer.Option(_minhash.shingle, help="Characters per MinHash shingle."),
    seed: int = typer.Option(_minhash.seed, help="Seed of the MinHash permutations."),
    shard_size: str = typer.Option("128MB", help="Text bytes per output shard."),
    keep_rejected: bool = typer.Option(
        False, help="Also write dropped documents, with their reason, to rejected/."
    ),
    workers: int = typer.Option(0, help="Worker processes (0: one per CPU)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing corpus at OUTPUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the stats as JSON on stdout."),
) -> None:
    """Clean, filter and deduplicate text into a corpus artifact.

    Example: cpmctl data build raw/ reviews.jsonl.zst -o work/corpus --keep-rejected
    """
    filters = FilterSettings(
        min_chars=min_chars,
        max_chars=max_chars,
        min_cjk_ratio=min_cjk_ratio,
        max_symbol_ratio=max_symbol_ratio,
        max_repeated_line_ratio=max_repeated_line_ratio,
        max_repeated_ngram_ratio=max_repeated_ngram_ratio,
        repeated_ngram=repeated_ngram,
        blocklist=read_blocklist(str(blocklist)) if blocklist else (),
    )
    settings = BuildSettings(
        filters=filters,
        minhash=MinHashSettings(bands=minhash_bands, rows=minhash_rows, shingle=shingle, seed=seed),
        dedup=dedup,
        split=split,
        text_field=text_field,
        format=input_format,
        shard_bytes=parse_size(shard_size),
        keep_rejected=keep_rejected,
        workers=workers or os.cpu_count() or 1,
    )
    stats = build_corpus(inputs, output, settings, force=force)
    if as_json:
        print(json.dumps(stats, ensure_ascii=False))
        return
    documents = stats["documents"]
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in documents["dropped"].items())
    info(f"kept {documents['kept']:,} of {documents['in']:,} documents"
         + (f" (dropped: {dropped})" if dropped else ""))
    print(output)


@app.command("tokenize")
def tokenize(
    corpus: Path = typer.Argument(..., help="A corpus artifact (from cpmctl data build)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A tokenizer artifact."),
    output: Path = typer.Option(..., "--output", "-o", help="The dataset artifact to write."),
    valid_fraction: float = typer.Option(0.01, help="Share of documents in the valid split."),
    seed: int = typer.Option(0, help="Seed of the train/valid split."),
    workers: int = typer.Option(0, help="Worker processes (0: one per CPU)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset at OUTPUT."),
) -> None:
    """Tokenize a corpus into a dataset of token shards; an interrupted run resumes.

    Example: cpmctl data tokenize work/corpus -t work/tokenizer -o work/dataset
    """
    meta = tokenize_corpus(corpus, tokenizer, output, valid_fraction=valid_fraction, seed=seed,
                           workers=workers or os.cpu_count() or 1, force=force)
    splits = meta["splits"]
    info(", ".join(f"{name}: {s['tokens']:,} tokens in {s['documents']:,} documents"
                   for name, s in splits.items()))
    print(output)


@app.command("inspect")
def inspect(
    artifact: Path = typer.Argument(..., help="Any cpmctl artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    sample: int = typer.Option(0, help="Also show N documents of a corpus, drawn at random."),
    seed: int = typer.Option(0, help="Seed of the --sample draw."),
    rejected: bool = typer.Option(False, help="Sample from a corpus's rejected/ documents."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against the manifest."),
) -> None:
    """Summarise an artifact; --verify checks its files' digests.

    Example: cpmctl data inspect work/corpus --sample 3 --verify
    """
    summary = inspect_artifact(artifact, sample=sample, seed=seed, rejected=rejected, verify=verify)
    if as_json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        render_summary(summary)
    problems = summary["verify"]["problems"] if verify else []
    if problems:
        raise CpmError(
            f"{artifact}: {len(problems)} file(s) differ from the manifest: {problems[0]}"
        )
