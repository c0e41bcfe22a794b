"""`cpmctl tokenizer ...`: build, import, encode, decode."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import typer

from cpmctl.cli.stdin import json_field, stdin_lines
from cpmctl.data.shards import parse_size
from cpmctl.errors import CpmError
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.build import build_tokenizer, import_tokenizer

app = typer.Typer(help="Tokenizers: build, import, encode, decode.", no_args_is_help=True)


@app.command("build")
def build(
    corpus: Path = typer.Argument(..., help="A corpus artifact (from cpmctl data build)."),
    output: Path = typer.Option(..., "--output", "-o", help="The tokenizer artifact to write."),
    scheme: str = typer.Option("cpm1", help="cpm1 (jieba + SentencePiece) or cpm2 (word-level)."),
    vocab_size: int = typer.Option(30000, help="Vocabulary size (CPM-1: 30000; CPM-2: 26240)."),
    sample_bytes: str = typer.Option("100MB", help="Train on a deterministic sample this big."),
    byte_fallback: bool = typer.Option(
        True, help="cpm1: spell characters outside the vocabulary as UTF-8 bytes, not <unk>."
    ),
    sentinels: int = typer.Option(190, help="cpm2: <s_0>... sentinels at the end (CPM-2: 190)."),
    min_char_count: int = typer.Option(2, help="cpm2: keep every character seen this often."),
    workers: int = typer.Option(0, help="Worker processes for jieba (0: one per CPU)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer at OUTPUT."),
) -> None:
    """Build a CPM-1 or CPM-2 tokenizer from a corpus.

    Example: cpmctl tokenizer build work/corpus -o work/tokenizer --scheme cpm1 --vocab-size 8000
    """
    path = build_tokenizer(corpus, output, scheme=scheme, vocab_size=vocab_size,
                           sample_bytes=parse_size(sample_bytes, "--sample-bytes"),
                           workers=workers or os.cpu_count() or 1, byte_fallback=byte_fallback,
                           sentinels=sentinels, min_char_count=min_char_count, force=force)
    print(path)


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="CPM-1's chinese_vocab.model or CPM-2's vocab.txt."),
    output: Path = typer.Option(..., "--output", "-o", help="The tokenizer artifact to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer at OUTPUT."),
) -> None:
    """Import an original CPM-1 or CPM-2 vocabulary unchanged (the ids stay the same).

    Example: cpmctl tokenizer import chinese_vocab.model -o work/cpm1-tokenizer
    """
    print(import_tokenizer(file, output, force=force))


@app.command("encode")
def encode(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A tokenizer artifact."),
    jsonl: bool = typer.Option(False, "--jsonl", help='Read {"text": ...}, write + "ids".'),
) -> None:
    """Encode stdin, one text a line, into space-separated ids (or JSONL).

    Example: echo 今天天气很好 | cpmctl tokenizer encode -t work/tokenizer
    """
    tok = load_tokenizer(tokenizer)
    for number, line in stdin_lines():
        if jsonl:
            record, text = json_field(number, line, "text")
            if not isinstance(text, str):
                raise CpmError(f"stdin line {number}: 'text' must be a string")
            print(json.dumps({**record, "ids": tok.encode(text)}, ensure_ascii=False))
        else:
            print(" ".join(map(str, tok.encode(line))))


_DIGITS = re.compile(r"[0-9]+")


def _ids(number: int, values: list, vocab_size: int, written: bool) -> list[int]:
    """Token ids as written: ASCII digit strings (`written`: text input) or JSON integers;
    anything else (a float, a boolean, "١٢", an id outside the vocabulary) is an error."""
    ids = []
    for value in values:
        if written and isinstance(value, str) and _DIGITS.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CpmError(f"stdin line {number}: ids must be integers written in ASCII "
                           f"digits, got {json.dumps(value, ensure_ascii=False)}")
        if not 0 <= value < vocab_size:
            raise CpmError(f"stdin line {number}: id {value} is outside the vocabulary "
                           f"(0..{vocab_size - 1})")
        ids.append(value)
    return ids


@app.command("decode")
def decode(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="A tokenizer artifact."),
    jsonl: bool = typer.Option(False, "--jsonl", help='Read {"ids": [...]}, write + "text".'),
) -> None:
    """Decode stdin, space-separated ids a line (or JSONL), into text.

    Without --jsonl a decoded newline ends the output line early; use --jsonl to keep one
    record a line.

    Example: echo 837 259 497 | cpmctl tokenizer decode -t work/tokenizer
    """
    tok = load_tokenizer(tokenizer)
    for number, line in stdin_lines():
        if jsonl:
            record, values = json_field(number, line, "ids")
            if not isinstance(values, list):
                raise CpmError(f"stdin line {number}: 'ids' must be a JSON array of integers")
            ids = _ids(number, values, tok.vocab_size, written=False)
            print(json.dumps({**record, "text": tok.decode(ids)}, ensure_ascii=False))
        else:
            print(tok.decode(_ids(number, line.split(), tok.vocab_size, written=True)))
