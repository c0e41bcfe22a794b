"""Exact and near-duplicate detection (cpmctl/data/dedup.py)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from cpmctl.data.dedup import (
    LshIndex,
    MinHashSettings,
    band_keys,
    exact_hash,
    signatures,
)
from cpmctl.errors import CpmError

# A pool of 3000 common CJK ideographs to draw random "Chinese-like" documents from.
POOL = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]


def random_document(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(POOL) for _ in range(length))


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


# --- exact_hash ------------------------------------------------------------------------


def test_exact_hash_is_blake2b_64():
    text = "你好世界"
    expected = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    assert exact_hash(text) == expected == 0x1EDDC5AE0EEDD9AA
    assert exact_hash(text) == exact_hash("你好" + "世界")  # stable


def test_exact_hash_differs():
    hashes = {exact_hash(t) for t in ["你好世界", "你好世界。", "你好 世界", "", "a", "A"]}
    assert len(hashes) == 6
    assert all(0 <= h < 2**64 for h in hashes)


# --- MinHashSettings -------------------------------------------------------------------


@pytest.mark.parametrize(("bands", "rows"), [(10, 8), (20, 5), (1, 1), (32, 4)])
def test_threshold(bands, rows):
    settings = MinHashSettings(bands=bands, rows=rows)
    assert settings.threshold == pytest.approx((1 / bands) ** (1 / rows))


def test_threshold_default_and_catch_probability():
    settings = MinHashSettings()
    assert (settings.bands, settings.rows, settings.shingle) == (10, 8, 5)
    assert settings.threshold == pytest.approx(0.7499, abs=1e-4)
    assert settings.catch_probability(1.0) == 1.0
    assert settings.catch_probability(0.0) == 0.0
    assert settings.catch_probability(0.5) == pytest.approx(1 - (1 - 0.5**8) ** 10)
    assert settings.catch_probability(0.95) > 0.999


@pytest.mark.parametrize(
    "kwargs", [{"bands": 0}, {"rows": 0}, {"bands": -1, "rows": 4}, {"shingle": 0}]
)
def test_minhash_settings_validation(kwargs):
    with pytest.raises(CpmError):
        MinHashSettings(**kwargs)


# --- signatures ------------------------------------------------------------------------


def test_signatures_shape_and_determinism():
    texts = ["北京是中国的首都", "上海是一座大城市", "北京是中国的首都"]
    settings = MinHashSettings(bands=4, rows=3, seed=7)
    first = signatures(texts, settings)
    assert first.shape == (3, 12)
    assert first.dtype == np.uint64
    assert np.array_equal(first, signatures(texts, settings))
    assert np.array_equal(first[0], first[2])  # identical texts, identical signatures
    assert not np.array_equal(first[0], first[1])
    other_seed = signatures(texts, MinHashSettings(bands=4, rows=3, seed=8))
    assert not np.array_equal(first, other_seed)


def test_signatures_independent_of_batch():
    rng = random.Random(3)
    texts = [random_document(rng, rng.randrange(1, 60)) for _ in range(30)]
    settings = MinHashSettings()
    together = signatures(texts, settings)
    alone = np.vstack([signatures([t], settings) for t in texts])
    split = np.vstack([signatures(texts[:11], settings), signatures(texts[11:], settings)])
    assert np.array_equal(together, alone)
    assert np.array_equal(together, split)


def test_signature_fraction_approximates_jaccard():
    rng = random.Random(0)
    settings = MinHashSettings(bands=32, rows=8)  # 256 values: standard error <= 0.032
    base = random_document(rng, 400)
    checked = []
    for keep in (50, 100, 150, 200, 250, 300, 350, 390):
        other = base[:keep] + random_document(rng, 400 - keep)
        truth = jaccard(base, other)
        sig = signatures([base, other], settings)
        estimate = float(np.mean(sig[0] == sig[1]))
        assert estimate == pytest.approx(truth, abs=0.1), (keep, truth, estimate)
        checked.append(truth)
    # The pairs cover the whole range of similarities.
    assert min(checked) < 0.1 and max(checked) > 0.9
    unrelated = signatures([base, random_document(rng, 400)], settings)
    assert float(np.mean(unrelated[0] == unrelated[1])) < 0.05


def test_short_texts_get_a_signature():
    settings = MinHashSettings()
    sig = signatures(["ab", "ab", "abc", "", "a"], settings)
    assert sig.shape == (5, 80)
    assert np.array_equal(sig[0], sig[1])
    assert not np.array_equal(sig[0], sig[2])
    assert not np.array_equal(sig[3], sig[4])
    # Exactly the shingle length is one shingle too, distinct from its padded prefix.
    sig5 = signatures(["abcde", "abcd"], settings)
    assert not np.array_equal(sig5[0], sig5[1])


# --- band_keys -------------------------------------------------------------------------


def test_band_keys():
    settings = MinHashSettings(bands=4, rows=2)
    sig = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 9, 9, 5, 6, 0, 0]], dtype=np.uint64)
    keys = band_keys(sig, settings)
    assert keys.shape == (2, 4)
    assert keys.dtype == np.uint64
    assert keys[0, 0] == keys[1, 0]  # same rows in band 0
    assert keys[0, 2] == keys[1, 2]  # same rows in band 2
    assert keys[0, 1] != keys[1, 1]
    assert keys[0, 3] != keys[1, 3]
    # Salted by the band index: equal rows in different bands give different keys.
    same = np.array([[7, 7, 7, 7, 7, 7, 7, 7]], dtype=np.uint64)
    assert len(set(band_keys(same, settings)[0].tolist())) == 4


# --- LshIndex --------------------------------------------------------------------------


def test_lsh_index_clusters_transitively():
    index = LshIndex()
    assert index.add(0, [1, 2]) is None
    assert index.add(1, [3, 2]) == 0  # shares key 2 with document 0
    assert index.add(2, [4, 3]) == 0  # shares key 3 with document 1 only: still cluster 0
    assert index.add(3, [5, 6]) is None
    assert index.add(4, [6]) == 3
    assert index.add(5, [7, 8]) is None
    assert index.add(6, [8, 4]) == 5  # the first key in band order decides: key 8 -> doc 5
    assert index.cluster_sizes == {0: 3, 3: 2, 5: 2}
    assert index.duplicate_clusters == 3


def test_lsh_index_first_document_kept():
    index = LshIndex()
    assert index.add(10, [42]) is None
    assert [index.add(d, [42]) for d in (11, 12, 13)] == [10, 10, 10]
    assert index.cluster_sizes == {10: 4}
    assert index.duplicate_clusters == 1
    assert LshIndex().duplicate_clusters == 0


def test_near_duplicates_end_to_end():
    rng = random.Random(0)
    originals = [random_document(rng, 300) for _ in range(200)]
    copies = []
    for source in rng.sample(range(200), 20):
        text = list(originals[source])
        count = rng.choice((2, 3))
        # Positions at least a shingle apart, each replaced by a different character.
        positions = [20 + 100 * k + rng.randrange(50) for k in range(count)]
        for position in positions:
            text[position] = rng.choice([c for c in POOL[:50] if c != text[position]])
        copy = "".join(text)
        assert jaccard(copy, originals[source]) > 0.85  # far above the threshold of 0.75
        copies.append((source, copy))

    # The distinct documents really are distinct.
    assert max(jaccard(originals[0], other) for other in originals[1:]) < 0.05

    settings = MinHashSettings()
    texts = originals + [copy for _, copy in copies]
    keys = band_keys(signatures(texts, settings), settings)
    index = LshIndex()
    results = [index.add(i, keys[i].tolist()) for i in range(len(texts))]
    assert results[:200] == [None] * 200
    assert results[200:] == [source for source, _ in copies]
    assert index.duplicate_clusters == len({source for source, _ in copies})
