"""Metrics of generated text against references (the `generate` rule, STC).

- Dist-n (Li et al. 2016), at corpus level: distinct character n-grams over all character
  n-grams of every generated text together, reported as both counts and the ratio, the way
  the CPM-1 model card's table writes "3,229 / 0.007". Characters, because Chinese has no
  spaces and the model-independent unit is the character.
- BLEU-1/2: sacrebleu's corpus BLEU with its `zh` tokenizer (every CJK character a token,
  runs of other characters split as in 13a) and max n-gram order 1 or 2: the cumulative
  BLEU-n with the brevity penalty, one reference per example.
- Embedding Average / Extrema / Greedy (Liu et al. 2016): text -> unit vectors, then
  Average: cosine of the mean vectors; Extrema: cosine of the per-dimension extreme values
  (the value of largest magnitude, its sign kept); Greedy: each unit's best cosine against the
  other text, averaged, taken both ways and averaged. Mean over the examples that have units
  on both sides. Units: the model's tokens and its input embedding rows by default, or jieba
  words and a word2vec text file's vectors (`Word2Vec`); units without a vector are left out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from cpmctl.errors import CpmError


def distinct_n(texts: list[str], n: int) -> dict:
    """{"distinct": count, "total": count, "ratio": distinct / total} of character n-grams."""
    grams: Counter = Counter()
    for text in texts:
        grams.update(text[i:i + n] for i in range(len(text) - n + 1))
    total = sum(grams.values())
    return {"distinct": len(grams), "total": total, "ratio": len(grams) / total if total else 0.0}


def bleu(hypotheses: list[str], references: list[str], n: int) -> float:
    """Corpus BLEU-n (0-100) with sacrebleu's zh tokenizer; needs the lm-eval extra."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise CpmError("BLEU needs sacrebleu: pip install 'cpmctl[lm-eval]'") from None
    metric = BLEU(tokenize="zh", max_ngram_order=n, effective_order=True)
    return metric.corpus_score(hypotheses, [references]).score


class ModelEmbeddings:
    """Units: the model's tokens; vectors: its input embedding rows (fp32)."""

    def __init__(self, model, tokenizer):
        table = model.wte if model.cfg.arch == "gpt" else model.shared
        self.table = table.weight.detach().float().cpu()
        self.tokenizer = tokenizer

    def vectors(self, text: str) -> torch.Tensor:
        ids = [i for i in self.tokenizer.encode(text) if i < self.table.shape[0]]
        return self.table[ids] if ids else torch.zeros(0, self.table.shape[1])


class Word2Vec:
    """Units: jieba words; vectors: a word2vec text file (`word v1 ... vd` a line, an optional
    `count dim` header line)."""

    def __init__(self, path: Path):
        self.table: dict[str, torch.Tensor] = {}
        dim = None
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    parts = line.rstrip("\n").split(" ")
                    if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                        continue
                    try:
                        values = [float(v) for v in parts[1:] if v]
                    except ValueError:
                        raise CpmError(f"{path}:{number}: not a word2vec line (word then "
                                       "numbers)") from None
                    if dim is None:
                        dim = len(values)
                    if not values or len(values) != dim:
                        raise CpmError(f"{path}:{number}: {len(values)} values, expected "
                                       f"{dim}")
                    self.table[parts[0]] = torch.tensor(values)
        except OSError as exc:
            raise CpmError(f"{path}: cannot read the word vectors ({exc.strerror})") from None
        if not self.table:
            raise CpmError(f"{path}: no word vectors")
        self.dim = dim

    def vectors(self, text: str) -> torch.Tensor:
        import jieba

        found = [self.table[w] for w in jieba.cut(text) if w in self.table]
        return torch.stack(found) if found else torch.zeros(0, self.dim)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a[None], b[None]).item()


def _extrema(v: torch.Tensor) -> torch.Tensor:
    high, low = v.max(0).values, v.min(0).values
    return torch.where(high.abs() >= low.abs(), high, low)


def _greedy(a: torch.Tensor, b: torch.Tensor) -> float:
    sims = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return sims.max(1).values.mean().item()


def embedding_metrics(hypotheses: list[str], references: list[str], embedder) -> dict:
    """{"average", "extrema", "greedy", "pairs"}: the means over the pairs with vectors."""
    totals = {"average": 0.0, "extrema": 0.0, "greedy": 0.0}
    pairs = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        h, r = embedder.vectors(hypothesis), embedder.vectors(reference)
        if not len(h) or not len(r):
            continue
        pairs += 1
        totals["average"] += _cosine(h.mean(0), r.mean(0))
        totals["extrema"] += _cosine(_extrema(h), _extrema(r))
        totals["greedy"] += (_greedy(h, r) + _greedy(r, h)) / 2
    return {**{k: v / pairs if pairs else 0.0 for k, v in totals.items()}, "pairs": pairs}


def generation_summary(hypotheses: list[str], references: list[str], embedder) -> dict:
    """Every metric above for one run."""
    return {"dist_1": distinct_n(hypotheses, 1), "dist_2": distinct_n(hypotheses, 2),
            "bleu_1": bleu(hypotheses, references, 1), "bleu_2": bleu(hypotheses, references, 2),
            "embedding": embedding_metrics(hypotheses, references, embedder)}
