"""Span infilling for the encoder-decoder (CPM-2): the text side of its span-corruption
objective.

A prompt marks each gap with a sentinel, written as text: `<s_0>`, `<s_1>`, ... (a prompt
with none gets `<s_0>` appended: continue the text). The encoder reads the text with each
sentinel as its own id and `<eod>` at the end, as in training; the decoder writes
`<s_0> span <s_1> span ... <eod>`. The spans are then put back where their sentinels were.

NOTE: the tokenizer never turns typed text into a sentinel id (jieba splits "<s_0>"), which
keeps ordinary text safe; only this module reads the markers, with `SENTINEL`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpmctl.errors import CpmError
from cpmctl.tokenizer import Tokenizer

SENTINEL = re.compile(r"<s_(\d+)>")


@dataclass
class InfillPrompt:
    """A prompt's encoder ids and the sentinels it holds."""

    text: str
    """The prompt, with `<s_0>` appended when it had no sentinel."""
    ids: list[int]
    sentinels: list[int]
    """The sentinel numbers in the order they occur."""


def encode_infill(tokenizer: Tokenizer, text: str, where: str) -> InfillPrompt:
    """Encode `text` with its `<s_N>` markers as sentinel ids, closed by <eod>."""
    if not SENTINEL.search(text):
        text += "<s_0>"
    ids: list[int] = []
    sentinels: list[int] = []
    position = 0
    for match in SENTINEL.finditer(text):
        ids += tokenizer.encode(text[position:match.start()])
        number = int(match.group(1))
        if number in sentinels:
            raise CpmError(f"{where}: <s_{number}> appears twice")
        try:
            ids.append(tokenizer.sentinel_id(number))
        except CpmError as exc:
            raise CpmError(f"{where}: {exc}") from None
        sentinels.append(number)
        position = match.end()
    ids += tokenizer.encode(text[position:])
    return InfillPrompt(text, ids + [tokenizer.eod_id], sentinels)


def split_spans(tokenizer: Tokenizer, tokens: list[int]) -> dict[int, list[int]]:
    """The decoder output `<s_i> ids <s_j> ids ...` as {sentinel number: its ids}; tokens
    before the first sentinel and the closing <eod> are dropped."""
    first, count = tokenizer.sentinels
    spans: dict[int, list[int]] = {}
    current = None
    for token in tokens:
        if token == tokenizer.eod_id:
            break
        if first <= token < first + count:
            current = spans.setdefault(token - first, [])
        elif current is not None:
            current.append(token)
    return spans


def fill(tokenizer: Tokenizer, prompt: InfillPrompt, tokens: list[int]) -> tuple[str, list[str]]:
    """(the prompt's text with every sentinel replaced by its span, the spans in the order of
    the prompt's sentinels); a sentinel the model wrote no span for becomes empty."""
    spans = split_spans(tokenizer, tokens)
    texts = [tokenizer.decode(spans.get(number, [])) for number in prompt.sentinels]
    by_number = dict(zip(prompt.sentinels, texts, strict=True))
    return SENTINEL.sub(lambda m: by_number[int(m.group(1))], prompt.text), texts


def ends_infill(tokenizer: Tokenizer, prompt: InfillPrompt, token: int) -> bool:
    """True for a sentinel past the prompt's last one: every gap has its span, the rest would
    be invented."""
    first, count = tokenizer.sentinels
    return first <= token < first + count and token - first > max(prompt.sentinels)
