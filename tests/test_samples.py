"""The training reader: memory-mapped token streams, packed samples, the seeded resumable order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cpmctl.artifacts import ArtifactWriter
from cpmctl.data.samples import PackedSamples, open_dataset
from cpmctl.errors import CpmError

EOD = 7


def write_dataset(out, splits: dict, dtype: str = "uint16", vocab_size: int = 30000):
    """A dataset artifact; `splits` maps a split to its parts, each a list of documents."""
    meta = {"dtype": dtype, "eod_id": EOD, "vocab_size": vocab_size, "splits": {}}
    with ArtifactWriter(out, "dataset", command=["test"]) as writer:
        for split, parts in splits.items():
            folder = writer.dir / split
            folder.mkdir()
            tokens = documents = 0
            for number, docs in enumerate(parts):
                docs = [np.append(np.asarray(d, dtype=np.int64), EOD) for d in docs]
                flat = np.concatenate(docs) if docs else np.empty(0, dtype=np.int64)
                flat.astype(np.dtype(dtype).newbyteorder("<")).tofile(
                    folder / f"part-{number:05d}.bin")
                offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
                np.save(folder / f"part-{number:05d}.idx.npy", offsets.astype(np.int64))
                tokens += len(flat)
                documents += len(docs)
            meta["splits"][split] = {"tokens": tokens, "documents": documents,
                                     "parts": len(parts)}
        writer.commit(meta=meta)
    return out


def all_tokens(parts) -> np.ndarray:
    docs = [np.append(np.asarray(d, dtype=np.int64), EOD) for part in parts for d in part]
    return np.concatenate(docs)


def random_parts(rng, n_parts: int, high: int, empty_at=()):
    parts = []
    for number in range(n_parts):
        if number in empty_at:
            parts.append([])
            continue
        parts.append([rng.integers(10, high, size=rng.integers(0, 40))
                      for _ in range(rng.integers(1, 5))])
    return parts


def stub(n: int, seq_len: int = 1) -> SimpleNamespace:
    """A stand-in stream with room for exactly n samples, for the permutation alone."""
    return SimpleNamespace(tokens=n * seq_len + 1, path="stub", split="train")


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    parts = random_parts(rng, 6, 30000, empty_at=(2, 3))
    valid = random_parts(rng, 1, 30000)
    return write_dataset(tmp_path / "ds", {"train": parts, "valid": valid}), parts


@pytest.mark.parametrize("dtype,high", [("uint16", 30000), ("uint32", 200000)])
def test_read_spans_parts_and_skips_empty_ones(tmp_path, dtype, high):
    rng = np.random.default_rng(1)
    parts = random_parts(rng, 5, high, empty_at=(0, 2))
    path = write_dataset(tmp_path / "ds", {"train": parts}, dtype=dtype, vocab_size=high)
    stream = open_dataset(path)
    expected = all_tokens(parts)
    assert stream.dtype == np.dtype(dtype)
    assert stream.tokens == len(expected)
    assert stream.documents == sum(len(p) for p in parts)
    assert stream.eod_id == EOD
    assert len(stream.parts) == 3  # the two empty parts are not mapped
    assert all(isinstance(p, np.memmap) for p in stream.parts)
    assert expected.max() >= 65536 if dtype == "uint32" else expected.max() < 65536
    for start in range(0, len(expected), 7):
        for length in (0, 1, 13, 50, len(expected) - start):
            length = min(length, len(expected) - start)
            got = stream.read(start, length)
            assert got.dtype == np.int64 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected[start:start + length])
    np.testing.assert_array_equal(stream.read(0, stream.tokens), expected)


def test_read_out_of_range(dataset):
    stream = open_dataset(dataset[0])
    for start, length in [(-1, 2), (0, stream.tokens + 1), (stream.tokens, 1), (3, -1)]:
        with pytest.raises(IndexError):
            stream.read(start, length)
    assert stream.read(stream.tokens, 0).size == 0


def test_splits_are_separate(tmp_path):
    rng = np.random.default_rng(2)
    train, valid = random_parts(rng, 3, 30000), random_parts(rng, 2, 30000)
    path = write_dataset(tmp_path / "ds", {"train": train, "valid": valid})
    for split, parts in (("train", train), ("valid", valid)):
        stream = open_dataset(path, split)
        np.testing.assert_array_equal(stream.read(0, stream.tokens), all_tokens(parts))


def test_windows_are_exact_slices_overlapping_by_one(dataset):
    path, parts = dataset
    expected = all_tokens(parts)
    seq_len = 16
    samples = PackedSamples(open_dataset(path), seq_len, seed=3)
    assert len(samples) == (len(expected) - 1) // seq_len
    windows = [expected[i * seq_len:i * seq_len + seq_len + 1] for i in range(len(samples))]
    assert all(len(w) == seq_len + 1 for w in windows)
    for a, b in zip(windows, windows[1:], strict=False):
        assert a[-1] == b[0]  # the last target of a window is the next window's first input
    epoch = samples.batch(0, len(samples))
    assert epoch.shape == (len(samples), seq_len + 1) and epoch.dtype == np.int64
    order = samples.permute(np.arange(len(samples)), np.zeros(len(samples)))
    for row, index in zip(epoch, order, strict=True):
        np.testing.assert_array_equal(row, windows[index])
    # one epoch sees every window exactly once
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, windows))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1000, 4097, 10007])
def test_permutation_is_a_bijection(n):
    for seed in (0, 1, 2**40 + 5):
        samples = PackedSamples(stub(n), 1, seed)
        for epoch in (0, 1, 9):
            order = samples.permute(np.arange(n), np.full(n, epoch))
            np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_orders_differ_by_seed_and_epoch():
    n = 1000
    positions = np.arange(n)
    a = PackedSamples(stub(n), 1, seed=0)
    b = PackedSamples(stub(n), 1, seed=1)
    orders = [a.permute(positions, np.full(n, e)) for e in range(3)]
    orders.append(b.permute(positions, np.zeros(n)))
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert np.mean(orders[i] == orders[j]) < 0.05
    assert np.mean(orders[0] == positions) < 0.05  # actually shuffled
    np.testing.assert_array_equal(orders[0], PackedSamples(stub(n), 1, 0).permute(
        positions, np.zeros(n)))


def test_batch_matches_samples_across_epochs_and_shards(dataset):
    samples = PackedSamples(open_dataset(dataset[0]), 8, seed=11)
    n = len(samples)
    consumed = n - 5  # the batch crosses into the next epoch
    count = 12
    batch = samples.batch(consumed, count)
    expected = np.stack([samples.sample(consumed + j) for j in range(count)])
    np.testing.assert_array_equal(batch, expected)
    # two consecutive epochs: each a full visit, in different orders
    two = samples.batch(0, 2 * n)
    assert sorted(map(tuple, two[:n])) == sorted(map(tuple, two[n:]))
    assert not np.array_equal(two[:n], two[n:])
    for world_size in range(1, 5):
        shards = [samples.shard(consumed, count, rank, world_size) for rank in range(world_size)]
        assert sum(len(s) for s in shards) == count
        rebuilt = np.empty_like(batch)
        for rank, rows in enumerate(shards):
            rebuilt[rank::world_size] = rows
        np.testing.assert_array_equal(rebuilt, batch)
    with pytest.raises(ValueError):
        samples.shard(0, 4, 2, 2)


def test_resume_continues_with_the_next_batch(dataset):
    path = dataset[0]
    batch_size, seq_len, seed = 6, 8, 42
    straight = PackedSamples(open_dataset(path), seq_len, seed)
    full = [straight.batch(step * batch_size, batch_size) for step in range(10)]
    first = PackedSamples(open_dataset(path), seq_len, seed)
    got = [first.batch(step * batch_size, batch_size) for step in range(5)]
    consumed = 5 * batch_size  # what the trainer saved before it was killed
    del first
    resumed = PackedSamples(open_dataset(path), seq_len, seed)
    got += [resumed.batch(consumed + step * batch_size, batch_size) for step in range(5)]
    np.testing.assert_array_equal(np.stack(got), np.stack(full))
    other = PackedSamples(open_dataset(path), seq_len, seed + 1)
    assert not np.array_equal(other.batch(0, batch_size), full[0])


def test_wrong_kind(tmp_path):
    with ArtifactWriter(tmp_path / "corpus", "corpus", command=["test"]) as writer:
        writer.commit(meta={})
    with pytest.raises(CpmError, match=r"is a corpus; \[data\] dataset needs a dataset"):
        open_dataset(tmp_path / "corpus")


def test_missing_split(dataset):
    with pytest.raises(CpmError, match=r"no split 'test' \(available: train, valid\)"):
        open_dataset(dataset[0], "test")


def test_too_small_for_seq_len(tmp_path):
    path = write_dataset(tmp_path / "ds", {"train": [[[1, 2, 3]], []]})  # 4 tokens
    stream = open_dataset(path)
    assert len(PackedSamples(stream, 3, 0)) == 1
    with pytest.raises(CpmError, match=r"has 4 tokens; seq_len 4 needs at least 5"):
        PackedSamples(stream, 4, 0)


def test_part_not_matching_its_index(tmp_path):
    path = write_dataset(tmp_path / "ds", {"train": [[[1, 2, 3]]]})
    with open(path / "train" / "part-00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(CpmError, match="do not match its index"):
        open_dataset(path)
