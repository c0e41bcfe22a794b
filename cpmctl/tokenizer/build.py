"""`cpmctl tokenizer build` and `cpmctl tokenizer import`: tokenizer artifacts.

Building samples the corpus deterministically (documents whose id hash falls under
sample-bytes / corpus-bytes, in corpus order, up to `sample_bytes`), segments the sample with
jieba in worker processes, and trains the scheme's vocabulary on it.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from cpmctl.artifacts import ArtifactWriter, digest_path, open_artifact
from cpmctl.console import RateMeter, info
from cpmctl.data.parallel import ordered_map
from cpmctl.data.shards import iter_documents
from cpmctl.errors import CpmError
from cpmctl.tokenizer import SCHEME_FILES, from_file
from cpmctl.tokenizer.base import write_config
from cpmctl.tokenizer.cpm1 import MODEL_FILE, Cpm1Tokenizer, train_processor
from cpmctl.tokenizer.cpm2 import VOCAB_FILE, build_vocab, count_words

SCHEMES = ("cpm1", "cpm2")
_BATCH_DOCS = 512
_MAX_SENTENCE_BYTES = 1 << 16


def sample_texts(corpus_dir: Path, total_bytes: int, sample_bytes: int) -> Iterator[str]:
    """Documents in corpus order whose id (a content hash) falls under the sampling rate."""
    threshold = min(1.0, sample_bytes / max(total_bytes, 1)) * 2**64
    taken = 0
    for row in iter_documents(corpus_dir, columns=["id", "text"]):
        if int(row["id"], 16) < threshold:
            yield row["text"]
            taken += len(row["text"].encode("utf-8"))
            if taken >= sample_bytes:
                return


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _sentences(texts: list[str]) -> list[str]:
    """jieba-segmented training sentences, a document per sentence, long ones cut at words."""
    sentences = []
    for text in texts:
        words, size = [], 0
        for word in Cpm1Tokenizer.pretokenize(text).split(" "):
            if size + len(word) * 4 >= _MAX_SENTENCE_BYTES and words:
                sentences.append(" ".join(words))
                words, size = [], 0
            words.append(word)
            size += len(word) * 4 + 1
        if words:
            sentences.append(" ".join(words))
    return sentences


def _measured(function, batch: list[str]) -> tuple[int, int, object]:
    return sum(len(t.encode("utf-8")) for t in batch), len(batch), function(batch)


def _segmented(texts: Iterator[str], workers: int, function) -> Iterator:
    """`function(batch)` over batches of texts in worker processes (jieba is the slow part)."""
    with RateMeter("segmenting with jieba", None) as meter:
        for size, count, result in ordered_map(partial(_measured, function), _batches(texts),
                                               workers=workers):
            meter.advance(size, count)
            yield result


def build_tokenizer(corpus_path, out, *, scheme: str, vocab_size: int, sample_bytes: int,
                    workers: int, byte_fallback: bool = True, sentinels: int = 190,
                    min_char_count: int = 2, force: bool = False, command=None) -> Path:
    if scheme not in SCHEMES:
        raise CpmError(f"--scheme must be cpm1 or cpm2, not {scheme!r}")
    corpus = open_artifact(corpus_path, "corpus", option="tokenizer build")
    total = corpus.meta.get("bytes", {}).get("kept_after_cleaning", 0)
    if corpus.meta.get("documents", {}).get("kept", 0) == 0:
        raise CpmError(f"{corpus_path} has no documents to build a tokenizer from")
    texts = sample_texts(corpus.path, total, sample_bytes)
    with ArtifactWriter(out, "tokenizer", force=force, command=command) as writer:
        if scheme == "cpm1":
            sentences = (s for batch in _segmented(texts, workers, _sentences) for s in batch)
            model = train_processor(sentences, vocab_size, byte_fallback, threads=workers)
            (writer.dir / MODEL_FILE).write_bytes(model)
        else:
            words: Counter = Counter()
            for counts in _segmented(texts, workers, count_words):
                words.update(counts)
            tokens = build_vocab(words, vocab_size, sentinels, min_char_count)
            (writer.dir / VOCAB_FILE).write_text("".join(t + "\n" for t in tokens), "utf-8")
        tokenizer = from_file(writer.dir / SCHEME_FILES[scheme], scheme)
        write_config(writer.dir, tokenizer, {"origin": "built"})
        writer.add_input("corpus", str(corpus_path), corpus.digest)
        info(f"{scheme} tokenizer: {tokenizer.vocab_size:,} tokens")
        return writer.commit({"scheme": scheme, "vocab_size": tokenizer.vocab_size,
                              "origin": "built", "corpus": corpus.digest,
                              "sample_bytes": sample_bytes})


def _looks_like_text(path: Path) -> bool:
    head = path.read_bytes()[:4096]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # cut in the middle of a character at the end
    return b"\0" not in head


def import_tokenizer(file, out, *, force: bool = False, command=None) -> Path:
    """Import CPM-1's `chinese_vocab.model` or CPM-2's `vocab.txt`, unchanged."""
    file = Path(file)
    if not file.is_file():
        raise CpmError(f"{file}: no such file")
    scheme = "cpm2" if _looks_like_text(file) else "cpm1"
    with ArtifactWriter(out, "tokenizer", force=force, command=command) as writer:
        shutil.copyfile(file, writer.dir / SCHEME_FILES[scheme])
        tokenizer = from_file(file, scheme)
        write_config(writer.dir, tokenizer, {"origin": f"imported from {file.name}"})
        writer.add_input("vocabulary", str(file), digest_path(file))
        return writer.commit({"scheme": scheme, "vocab_size": tokenizer.vocab_size,
                              "origin": "imported"})

