"""The CPM-2 scheme: full-width -> half-width, jieba, then greedy longest match against a
word-level vocabulary (`vocab.txt`, one token a line, id = line number).

Encoding is CPM-2's procedure exactly: Q2B (full-width ASCII to half-width, keeping
，。！（）？、；： and turning the ideographic space into a space), jieba words with ▂/▃, and
for each word the longest vocabulary entry at each position, <unk> for a character matching
none, and a single <unk> for a word longer than 200 characters. Sentinels <s_0>... sit at the
end of the vocabulary. Decoding concatenates the pieces and turns ▂/▃ back.

Round trip: decode(encode(x)) equals Q2B(x) (`round_trip`) when every character is in the
vocabulary and no jieba word is longer than 200 characters.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from cpmctl.errors import CpmError
from cpmctl.tokenizer.base import (
    FROM_SUBSTITUTES,
    SPACE,
    SPECIAL_PIECES,
    Tokenizer,
    jieba_words,
    special_ids,
)

VOCAB_FILE = "vocab.txt"
_MAX_WORD_CHARS = 200
_KEEP_FULL_WIDTH = "，。！（）？、；："
_SENTINEL = re.compile(r"<s_(\d+)>")
Q2B = str.maketrans(
    {code: code - 0xFEE0 for code in range(0xFF00, 0xFF5F) if chr(code) not in _KEEP_FULL_WIDTH}
    | {0x3000: 0x20}
)


def read_vocab(path: Path) -> list[str]:
    """One token a line, stripped as CPM-2's loader strips it."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise CpmError(f"{path}: not a UTF-8 vocabulary ({where})") from None


def _sentinel_range(tokens: list[str], source: str) -> tuple[int, int] | None:
    numbers = [(i, int(m.group(1))) for i, t in enumerate(tokens) if (m := _SENTINEL.fullmatch(t))]
    if not numbers:
        return None
    first = numbers[0][0]
    if [n for _, n in numbers] != list(range(len(numbers))) or numbers[-1][0] != first + len(
            numbers) - 1:
        raise CpmError(f"{source}: the sentinels <s_0>... are not one consecutive run")
    return first, len(numbers)


class Cpm2Tokenizer(Tokenizer):
    scheme = "cpm2"

    def __init__(self, tokens: list[str], source: str):
        self.tokens = tokens
        self.vocab = {}
        for index, token in enumerate(tokens):
            self.vocab[token] = index  # a later duplicate wins, as in CPM-2's loader
        self.vocab_size = len(tokens)
        self.special = special_ids(self.vocab, source)
        self.sentinels = _sentinel_range(tokens, source)
        self.max_piece = max(len(token) for token in self.vocab)

    def _match(self, word: str, out: list[int]) -> None:
        if len(word) > _MAX_WORD_CHARS:
            out.append(self.special["unk"])
            return
        vocab, start, length = self.vocab, 0, len(word)
        while start < length:
            end = min(length, start + self.max_piece)
            while end > start and word[start:end] not in vocab:
                end -= 1
            if end == start:
                out.append(self.special["unk"])
                start += 1
            else:
                out.append(vocab[word[start:end]])
                start = end

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in jieba_words(text.translate(Q2B)):
            self._match(word, ids)
        return ids

    def decode(self, ids) -> str:
        return "".join(self.tokens[i] for i in ids).translate(FROM_SUBSTITUTES)

    def round_trip(self, text: str) -> str:
        return text.translate(Q2B)


def count_words(texts: Iterable[str]) -> Counter:
    """jieba word frequencies of texts, pre-tokenised as `encode` does."""
    words: Counter = Counter()
    for text in texts:
        words.update(jieba_words(text.translate(Q2B)))
    return words


def build_vocab(words: Counter, vocab_size: int, sentinels: int, min_char_count: int) -> list[str]:
    """CPM-2's kind of vocabulary from word counts: the specials, every character seen at least
    `min_char_count` times, the most frequent jieba words in the room left, then sentinels.

    Entries are ordered by frequency (ties by the token), as CPM-2's is. Tokens holding
    whitespace other than ▂/▃ are left out: the vocabulary file strips its lines.
    """
    chars: Counter = Counter()
    for word, count in words.items():
        for char in word:
            chars[char] += count
    # The space substitute ▂ is always in (CPM-2 has it at id 10), whatever the corpus.
    fixed = [*SPECIAL_PIECES, SPACE]
    reserved = len(fixed) + sentinels
    taken = set(fixed)
    kept_chars = {c: n for c, n in chars.items()
                  if n >= min_char_count and c.strip() == c and c not in taken}
    room = vocab_size - reserved - len(kept_chars)
    if room < 0:
        raise CpmError(f"--vocab-size {vocab_size} is too small: {len(SPECIAL_PIECES)} special "
                       f"tokens, {sentinels} sentinels and {len(kept_chars):,} characters seen "
                       f"at least {min_char_count} times need {reserved + len(kept_chars):,}; "
                       "raise --vocab-size or --min-char-count")
    candidates = sorted(((n, w) for w, n in words.items()
                         if len(w) > 1 and w.strip() == w and w not in taken),
                        key=lambda item: (-item[0], item[1]))
    chosen = dict(kept_chars) | {w: n for n, w in candidates[:room]}
    ordered = sorted(chosen.items(), key=lambda item: (-item[1], item[0]))
    return [*fixed, *(token for token, _ in ordered),
            *(f"<s_{i}>" for i in range(sentinels))]
