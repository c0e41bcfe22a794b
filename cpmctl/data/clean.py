"""Text normalisation and the per-document quality filters of `cpmctl data build`.

Normalisation (`normalise`), in this order:
1. Width: full-width ASCII variants (U+FF01–FF5E) become half-width, except the Chinese
   punctuation ，！（）？；： which stays full-width; the ideographic space becomes a space.
   NOTE: we chose this CPM-style folding over NFKC. NFKC would also turn ，and ： into ASCII
   (CPM-2's vocabulary keeps them full-width), ① into 1 and ㎡ into m2: it destroys
   information the tokenizers can use. CPM-1's SentencePiece model applies its own nmt_nfkc
   at encode time anyway, so nothing is lost for it by folding less here.
   Control characters (C0/C1 but newline), lone surrogates, zero-width spaces, BOMs and
   bidi marks are removed; CR LF, CR and line/paragraph separators become one newline.
2. HTML: entities unescaped, then `<script>`/`<style>` blocks and comments removed and known
   HTML tags removed (block tags become a newline). Only real tag names followed by a space,
   `/` or `>` match, so `<三国演义>`, `<eod>` or `a<b, c>d` are left alone. Unescaping first
   means escaped markup (`&lt;p&gt;`) is removed like markup; the step repeats until nothing
   changes, so double-escaped markup (`&amp;lt;p&amp;gt;`, common in scraped pages) goes too
   and `normalise` is idempotent.
3. Canonical composition (NFC), so that a decomposed é equals a composed é.
4. Whitespace: runs of spaces/tabs become one space, spaces around newlines go, three or
   more newlines become one blank line, and the ends are stripped.

The ratio filters (CJK, symbols, repeated n-grams) run over a whole chunk at once in NumPy
(`chunk_ratios`), because a Python loop per character would cost more than everything else.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cpmctl.errors import CpmError

_KEEP_FULL_WIDTH = "，！（）？；："

_BLOCK_TAGS = "|".join(
    (
        "address article aside blockquote br dd div dl dt figcaption figure footer form "
        "h[1-6] header hr li main nav ol p pre section table td th tr ul"
    ).split()
)
_INLINE_TAGS = "|".join(
    (
        "a abbr b big body button caption center cite code col colgroup del details dfn "
        "em embed font head html i iframe img input ins kbd label legend link mark meta "
        "object option picture q s samp select small source span strike strong sub "
        "summary sup svg tbody textarea tfoot thead time title tt u var video wbr"
    ).split()
)
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS})(?=[\s/>])[^<>]*>", re.I)
_INLINE_TAG = re.compile(rf"</?(?:{_INLINE_TAGS})(?=[\s/>])[^<>]*>|<!DOCTYPE[^<>]*>", re.I)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def _translation_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in range(0xFF01, 0xFF5F):
        if chr(code) not in _KEEP_FULL_WIDTH:
            table[code] = chr(code - 0xFEE0)
    table[0x3000] = " "
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        table[code] = None
    table[ord("\n")] = "\n"
    table[ord("\t")] = " "
    table[ord("\r")] = "\n"
    for code in (0x200B, 0x200E, 0x200F, 0x2060, 0xFEFF):
        table[code] = None
    table[0x2028] = table[0x2029] = "\n"
    return table


_TABLE = _translation_table()
_NEEDS_TRANSLATE = re.compile(
    "[" + "".join(re.escape(chr(c)) for c in sorted(_TABLE) if chr(c) != "\n") + "]"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_HSPACE = re.compile(r"[^\S\n]+")
_NEWLINE_RUN = re.compile(r" ?\n[\n ]*")


def _newline_run(match: re.Match) -> str:
    return "\n\n" if match.group().count("\n") > 1 else "\n"


def strip_html(text: str) -> str:
    """Entities unescaped and markup removed, repeated until nothing changes (each round
    that changes the text shortens it, so this ends)."""
    while True:
        stripped = text
        if "&" in stripped and _ENTITY.search(stripped):
            stripped = html.unescape(stripped)
        if "<" in stripped:
            stripped = _SCRIPT_STYLE.sub("", stripped)
            stripped = _BLOCK_TAG.sub("\n", stripped)
            stripped = _INLINE_TAG.sub("", stripped)
        if stripped == text:
            return text
        text = stripped


def normalise(text: str) -> str:
    """The documented normalisation (module docstring), applied to every document."""
    if _NEEDS_TRANSLATE.search(text):
        text = text.replace("\r\n", "\n").translate(_TABLE)
    if not text.isascii():
        text = _SURROGATE.sub("", text)
    text = strip_html(text)
    if _NEEDS_TRANSLATE.search(text):  # entities can encode control characters
        text = text.translate(_TABLE)
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
    text = _HSPACE.sub(" ", text)
    if "\n" in text:
        text = _NEWLINE_RUN.sub(_newline_run, text)
    return text.strip()


@dataclass(frozen=True)
class FilterSettings:
    """Quality filters. A document failing one is dropped with that filter's reason."""

    min_chars: int = 10
    """Drop documents shorter than this many characters after cleaning (reason too_short)."""
    max_chars: int = 100_000
    """Drop documents longer than this many characters after cleaning (reason too_long)."""
    min_cjk_ratio: float = 0.3
    """Drop documents whose share of CJK characters among non-space ones is lower (low_cjk)."""
    max_symbol_ratio: float = 0.2
    """Drop documents whose share of symbols (Unicode S*, and #) is higher (high_symbol)."""
    max_repeated_line_ratio: float = 0.3
    """Drop documents where lines repeating an earlier line hold more of the characters
    (repeated_lines; Gopher's duplicate-line character fraction)."""
    max_repeated_ngram_ratio: float = 0.2
    """Drop documents where characters covered by a character n-gram seen twice in the same
    document exceed this share (repeated_ngrams; Gopher's duplicate n-gram fraction, on
    characters since Chinese has no spaces)."""
    repeated_ngram: int = 10
    """The n of the repeated n-gram filter (10 characters is about 6 Chinese words)."""
    blocklist: tuple[str, ...] = ()
    """Drop documents containing any of these phrases (reason blocklist)."""

    def __post_init__(self) -> None:
        for name in ("min_cjk_ratio", "max_symbol_ratio", "max_repeated_line_ratio",
                     "max_repeated_ngram_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise CpmError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise CpmError(
                f"--max-chars ({self.max_chars}) must be at least --min-chars ({self.min_chars})"
            )
        if self.repeated_ngram < 2:
            raise CpmError(f"--repeated-ngram must be at least 2, not {self.repeated_ngram}")


def read_blocklist(path: str) -> tuple[str, ...]:
    """One phrase a line, `#` comments and blank lines ignored, normalised like documents."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise CpmError(f"{path}: blocklist file not found") from None
    except UnicodeDecodeError as exc:
        raise CpmError(f"{path}: blocklist is not UTF-8 ({exc.reason})") from None
    phrases = (normalise(line) for line in lines if not line.lstrip().startswith("#"))
    return tuple(sorted({p for p in phrases if p}))


@lru_cache(maxsize=8)
def _blocklist_pattern(phrases: tuple[str, ...]) -> re.Pattern:
    ordered = sorted(phrases, key=len, reverse=True)
    return re.compile("|".join(re.escape(p) for p in ordered), re.I)


def repeated_line_ratio(text: str) -> float:
    """Share of characters in lines that repeat an earlier line of the same document."""
    seen: set[str] = set()
    repeated = total = 0
    for line in text.split("\n"):
        total += len(line)
        if line in seen:
            repeated += len(line)
        elif line:
            seen.add(line)
    return repeated / total if total else 0.0


def document_reason(text: str, settings: FilterSettings) -> str | None:
    """The cheap per-document filters; the ratio filters run per chunk (`chunk_reasons`)."""
    if not text:
        return "empty"
    if len(text) < settings.min_chars:
        return "too_short"
    if len(text) > settings.max_chars:
        return "too_long"
    if settings.blocklist and _blocklist_pattern(settings.blocklist).search(text):
        return "blocklist"
    if "\n" in text and repeated_line_ratio(text) > settings.max_repeated_line_ratio:
        return "repeated_lines"
    return None


# --- chunk-level ratio filters (NumPy) -------------------------------------------------

# BMP, SMP (emoji) and SIP (CJK extensions B-F); code points beyond map to the last entry,
# which is in no class.
_TABLE_SIZE = 0x30001


@lru_cache(maxsize=1)
def _class_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables by code point: is CJK, is a symbol, is whitespace."""
    codes = np.arange(_TABLE_SIZE)
    cjk = (
        ((codes >= 0x3400) & (codes <= 0x4DBF))
        | ((codes >= 0x4E00) & (codes <= 0x9FFF))
        | ((codes >= 0xF900) & (codes <= 0xFAFF))
        | ((codes >= 0x20000) & (codes < _TABLE_SIZE - 1))
    )
    symbol = np.zeros(_TABLE_SIZE, dtype=bool)
    space = np.zeros(_TABLE_SIZE, dtype=bool)
    for code in range(_TABLE_SIZE - 1):
        if 0xD800 <= code <= 0xF8FF or 0x4E00 <= code <= 0x9FFF or 0x20000 <= code:
            continue  # surrogates, private use, and CJK ideographs are neither
        ch = chr(code)
        if unicodedata.category(ch)[0] == "S":
            symbol[code] = True
        elif ch.isspace():
            space[code] = True
    symbol[ord("#")] = True
    return cjk, symbol, space


def codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts' code points concatenated (uint32) and each text's start offset (+ the end)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    return points, starts


def _per_document_sum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum of `values` within each [starts[i], starts[i+1]) segment; empty segments give 0."""
    cumulative = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[starts[1:]] - cumulative[starts[:-1]]


def ngram_hashes(points: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hash of every length-n window of `points` (len(points) - n + 1 values).

    Windows that cross a document boundary are computed too; callers mask them out.
    """
    count = len(points) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = points.astype(np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    base = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for offset in range(n):
            hashes = hashes * base + values[offset : offset + count]
        hashes ^= hashes >> np.uint64(29)
        hashes *= np.uint64(0xBF58476D1CE4E5B9)
        hashes ^= hashes >> np.uint64(32)
    return hashes


def window_documents(starts: np.ndarray, count: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of `count` windows of length n: its document index and whether it fits inside."""
    positions = np.arange(count, dtype=np.int64)
    document = np.searchsorted(starts, positions, side="right") - 1
    inside = positions + n <= starts[document + 1]
    return document, inside


def repeated_ngram_ratios(points: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """Per document: the share of characters covered by an n-gram occurring twice in it."""
    documents = len(starts) - 1
    hashes = ngram_hashes(points, n)
    if len(hashes) == 0:
        return np.zeros(documents)
    document, inside = window_documents(starts, len(hashes), n)
    # NOTE: salting each hash with its document makes np.unique find repeats within a
    # document only, for the whole chunk in one call.
    with np.errstate(over="ignore"):
        salted = hashes ^ (document.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    salted = salted[inside]
    window_starts = np.flatnonzero(inside)
    _, inverse, counts = np.unique(salted, return_inverse=True, return_counts=True)
    repeated_starts = window_starts[counts[inverse] > 1]
    size = len(points) + n + 1
    coverage = np.bincount(repeated_starts, minlength=size) - np.bincount(
        repeated_starts + n, minlength=size
    )
    covered = np.cumsum(coverage[: len(points)]) > 0
    lengths = np.diff(starts)
    return _per_document_sum(covered, starts) / np.maximum(lengths, 1)


def chunk_reasons(texts: list[str], settings: FilterSettings) -> list[str | None]:
    """The ratio filters for a batch of cleaned documents, vectorised over the batch."""
    if not texts:
        return []
    points, starts = codepoints(texts)
    cjk_table, symbol_table, space_table = _class_tables()
    clipped = np.minimum(points, _TABLE_SIZE - 1)
    cjk = _per_document_sum(cjk_table[clipped], starts)
    symbols = _per_document_sum(symbol_table[clipped], starts)
    visible = np.maximum(np.diff(starts) - _per_document_sum(space_table[clipped], starts), 1)
    repeated = repeated_ngram_ratios(points, starts, settings.repeated_ngram)
    reasons: list[str | None] = []
    for i in range(len(texts)):
        if cjk[i] / visible[i] < settings.min_cjk_ratio:
            reasons.append("low_cjk")
        elif symbols[i] / visible[i] > settings.max_symbol_ratio:
            reasons.append("high_symbol")
        elif repeated[i] > settings.max_repeated_ngram_ratio:
            reasons.append("repeated_ngrams")
        else:
            reasons.append(None)
    return reasons
