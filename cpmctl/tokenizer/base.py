"""What both CPM tokenizer schemes share: jieba segmentation, the ▂/▃ substitutes, the
special-token layout, and `tokenizer.json`.

CPM-1 and CPM-2 segment text with jieba (precise mode, HMM on) and, inside each jieba word,
write space as ▂ (U+2582) and newline as ▃ (U+2583) so that whitespace survives as ordinary
pieces. The special tokens sit at CPM-1's ids: <unk> 0, <s> 1, </s> 2, ▃ 3, <sep> 4, <pad> 5,
<mask> 6, <eod> 7. `<eod>` is an ordinary piece in the original models; text a user types as
"<eod>" never becomes id 7 because jieba splits it into "<", "eod", ">".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jieba

from cpmctl.errors import CpmError

SPACE, NEWLINE = "\u2582", "\u2583"
TO_SUBSTITUTES = str.maketrans(" \n", SPACE + NEWLINE)
FROM_SUBSTITUTES = str.maketrans(SPACE + NEWLINE, " \n")
#: The special tokens in id order, as in CPM-1 and CPM-2.
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", NEWLINE, "<sep>", "<pad>", "<mask>", "<eod>")
SPECIAL_NAMES = {"<unk>": "unk", "<s>": "bos", "</s>": "eos", "<sep>": "sep", "<pad>": "pad",
                 "<mask>": "mask", "<eod>": "eod"}
CONFIG_FILE = "tokenizer.json"

jieba.setLogLevel(logging.WARNING)


def jieba_words(text: str) -> list[str]:
    """jieba precise-mode words with ▂/▃ substitutes: the pre-tokenisation of both schemes."""
    return [word.translate(TO_SUBSTITUTES) for word in jieba.cut(text, cut_all=False)]


class Tokenizer:
    """The API both schemes implement.

    Round-trip guarantee: `decode(encode(x)) == round_trip(x)`, a documented normalisation of
    x (see each scheme), whenever every character of x is in the vocabulary (always, for a
    CPM-1 tokenizer built with byte fallback).
    """

    scheme: str
    vocab_size: int
    special: dict[str, int]
    sentinels: tuple[int, int] | None = None  # (first id, count) of <s_0>...

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def round_trip(self, text: str) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def sentinel_id(self, index: int) -> int:
        if self.sentinels is None or not 0 <= index < self.sentinels[1]:
            available = self.sentinels[1] if self.sentinels else 0
            raise CpmError(f"this tokenizer has {available} sentinels; <s_{index}> is not one")
        return self.sentinels[0] + index

    @property
    def eod_id(self) -> int:
        return self.special["eod"]

    @property
    def pad_id(self) -> int:
        return self.special["pad"]

    @property
    def unk_id(self) -> int:
        return self.special["unk"]

    def config(self) -> dict:
        return {
            "scheme": self.scheme,
            "vocab_size": self.vocab_size,
            "special": self.special,
            "substitutes": {"space": SPACE, "newline": NEWLINE},
            "sentinels": None if self.sentinels is None else
            {"first": self.sentinels[0], "count": self.sentinels[1]},
        }


def special_ids(pieces: dict[str, int], source: str) -> dict[str, int]:
    """Map special names to ids; a vocabulary missing one is not a CPM vocabulary."""
    missing = [piece for piece in SPECIAL_NAMES if piece not in pieces]
    if missing:
        raise CpmError(f"{source}: not a CPM vocabulary: no {', '.join(missing)}")
    return {SPECIAL_NAMES[piece]: pieces[piece] for piece in SPECIAL_NAMES}


def write_config(folder: Path, tokenizer: Tokenizer, extra: dict) -> None:
    config = {**tokenizer.config(), **extra}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
