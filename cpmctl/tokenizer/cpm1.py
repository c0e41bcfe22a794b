"""The CPM-1 scheme: jieba words joined by spaces, then a SentencePiece unigram model.

Encoding is CPM-Generate's procedure exactly: `sp.encode(" ".join(jieba words with ▂/▃))`.
Decoding: SentencePiece decode, delete every space (they only separated jieba words), then
▂ -> space and ▃ -> newline.

Round trip: decode(encode(x)) equals x after SentencePiece's own normaliser (nmt_nfkc: NFKC,
full-width -> half-width, control characters dropped) with every whitespace character other
than space and newline removed (`round_trip`). Characters outside the vocabulary come back as
⁇, unless the model has byte fallback, as `tokenizer build` makes by default.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from cpmctl.errors import CpmError
from cpmctl.tokenizer.base import (
    FROM_SUBSTITUTES,
    NEWLINE,
    SPECIAL_PIECES,
    TO_SUBSTITUTES,
    Tokenizer,
    jieba_words,
    special_ids,
)

MODEL_FILE = "spm.model"
_BYTE_PIECES = 256


def load_processor(path: Path) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as exc:
        raise CpmError(f"{path}: not a loadable SentencePiece model ({exc})") from None
    return processor


class Cpm1Tokenizer(Tokenizer):
    scheme = "cpm1"

    def __init__(self, processor: spm.SentencePieceProcessor, source: str):
        self.sp = processor
        self.vocab_size = processor.get_piece_size()
        pieces = {processor.id_to_piece(i): i for i in range(self.vocab_size)}
        self.special = special_ids(pieces, source)
        self.byte_fallback = "<0x00>" in pieces

    @staticmethod
    def pretokenize(text: str) -> str:
        return " ".join(jieba_words(text))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(self.pretokenize(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # NOTE: one thread: parallelism comes from worker processes, not from SentencePiece.
        return self.sp.encode([self.pretokenize(t) for t in texts], num_threads=1)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids)).replace(" ", "").translate(FROM_SUBSTITUTES)

    def round_trip(self, text: str) -> str:
        normalised = self.sp.normalize(text.translate(TO_SUBSTITUTES))
        return normalised.replace("\u2581", "").translate(FROM_SUBSTITUTES)

    def config(self) -> dict:
        return {**super().config(), "byte_fallback": self.byte_fallback}


def train_processor(sentences: Iterable[str], vocab_size: int, byte_fallback: bool,
                    threads: int) -> bytes:
    """Train a unigram model on jieba-segmented sentences; returns the serialised model.

    Special ids follow CPM-1: <unk>/<s>/</s> are SentencePiece's own ids 0-2, <pad> its pad
    at 5, and ▃ <sep> <mask> <eod> user-defined symbols, which SentencePiece places at the
    free ids 3, 4, 6, 7 in order. Byte pieces (with byte fallback) come right after.
    """
    minimum = len(SPECIAL_PIECES) + (_BYTE_PIECES if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise CpmError(f"--vocab-size {vocab_size} is too small: the {len(SPECIAL_PIECES)} "
                       f"special tokens{' and 256 byte pieces' if byte_fallback else ''} "
                       f"need {minimum - 1}, plus the text's own pieces")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences), model_writer=model, minloglevel=2,
            model_type="unigram", vocab_size=vocab_size, character_coverage=0.9995,
            normalization_rule_name="nmt_nfkc", byte_fallback=byte_fallback,
            unk_id=0, bos_id=1, eos_id=2, pad_id=5, pad_piece="<pad>",
            user_defined_symbols=[NEWLINE, "<sep>", "<mask>", "<eod>"],
            max_sentence_length=1 << 16, input_sentence_size=0, num_threads=threads,
        )
    except RuntimeError as exc:
        raise _vocab_size_error(vocab_size, str(exc)) from None
    return model.getvalue()


def _vocab_size_error(vocab_size: int, message: str) -> Exception:
    """SentencePiece's two vocabulary-size failures, said in terms of the --vocab-size flag."""
    if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return CpmError(f"--vocab-size {vocab_size} is too small for this corpus: its characters "
                        f"(99.95% coverage) and the special pieces need {match.group(1)}; "
                        "raise --vocab-size")
    if match := re.search(r"Vocabulary size too high \(\d+\)\. .* <= (\d+)", message):
        return CpmError(f"--vocab-size {vocab_size} is too large for this corpus: it yields at "
                        f"most {match.group(1)} pieces; lower --vocab-size or give more text")
    return RuntimeError(message)
