"""The training reader: token shards -> fixed-length samples in a seeded, resumable order.

A dataset artifact (docs/design.md §2) holds, per split, parts `part-NNNNN.bin` (flat token ids)
and `part-NNNNN.idx.npy` (document offsets). `open_dataset` memory-maps the parts, so a dataset
of any size costs only address space, and `TokenStream.read` copies out a global token range.

`PackedSamples` cuts the concatenated documents (each ending in `<eod>`) into windows of
seq_len + 1 tokens that overlap by one token (inputs x[:-1], targets x[1:]), and visits them in
a pseudo-random order addressed by one integer, the number of samples consumed so far. The
same (dataset, seq_len, seed, consumed) always gives the same tokens: a trainer that saved
`consumed` resumes with the very next batch (docs/design.md §6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpmctl.artifacts import open_artifact
from cpmctl.errors import CpmError

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_M64 = (1 << 64) - 1
_ROUNDS = 6


class TokenStream:
    """One split of a dataset as a single read-only token sequence over memory-mapped parts."""

    def __init__(self, path: Path, split: str, dtype: np.dtype, eod_id: int | None,
                 parts: list[np.memmap], documents: int, vocab_size: int = 0):
        self.path, self.split, self.dtype, self.eod_id = path, split, dtype, eod_id
        self.vocab_size = vocab_size  # the tokenizer's, from the manifest
        self.parts = parts  # the non-empty parts, in name order
        self.documents = documents
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.starts = np.cumsum(sizes) - sizes  # each part's first global token
        self.tokens = int(sizes.sum())

    def read(self, start: int, length: int) -> np.ndarray:
        """A contiguous int64 copy of the tokens [start, start + length), across parts."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.tokens})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.starts[i])
            piece = self.parts[i][offset:offset + length - done]
            out[done:done + len(piece)] = piece
            done += len(piece)
            i += 1
        return out


def open_dataset(path: str | Path, split: str = "train", *,
                 option: str = "[data] dataset") -> TokenStream:
    """Open one split of a dataset artifact, memory-mapping its parts (nothing is loaded);
    `option` names where the path came from in errors."""
    artifact = open_artifact(path, "dataset", option=option)
    meta = artifact.meta
    splits = meta.get("splits", {})
    folder = artifact.path / split
    if split not in splits or not folder.is_dir():
        available = ", ".join(sorted(splits)) or "none"
        raise CpmError(f"{artifact.path} has no split {split!r} (available: {available})")
    dtype = _DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise CpmError(f"{artifact.path}: unsupported token dtype {meta.get('dtype')!r}")
    for key in ("vocab_size", "eod_id"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CpmError(f"{artifact.path}: the manifest's meta.{key} must be a "
                           f"non-negative integer, got {value!r}")
    parts, documents = [], 0
    for bin_path in sorted(folder.glob("part-*.bin")):
        artifact.file(bin_path.relative_to(artifact.path).as_posix())  # no link leads out
        size = bin_path.stat().st_size
        idx_path = bin_path.with_name(bin_path.name[: -len(".bin")] + ".idx.npy")
        if not idx_path.is_file():
            raise CpmError(f"{bin_path}: its document index {idx_path.name} is missing")
        offsets = np.load(idx_path, mmap_mode="r")
        count = size // dtype.itemsize
        if size % dtype.itemsize or len(offsets) < 1 or int(offsets[-1]) != count:
            raise CpmError(f"{bin_path}: {size} bytes do not match its index {idx_path.name}")
        documents += len(offsets) - 1
        if count:  # np.memmap cannot map an empty file
            parts.append(np.memmap(bin_path, dtype=dtype, mode="r"))
    stream = TokenStream(artifact.path, split, dtype, meta["eod_id"], parts, documents,
                         meta["vocab_size"])
    expected = splits[split].get("tokens") if isinstance(splits[split], dict) else None
    if expected is not None and expected != stream.tokens:
        raise CpmError(f"{folder}: {stream.tokens} tokens in the parts, manifest says {expected}")
    return stream


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays: a bijection whose every output bit depends on
    every input bit. Array arithmetic wraps modulo 2**64, which is what we want."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class PackedSamples:
    """Windows of seq_len + 1 tokens packed across documents, in a seeded order per epoch.

    The order is a keyed bijection on [0, n) rather than a stored permutation, so it costs
    O(1) memory however many samples there are (100M samples would be 800 MB as an array).
    It is a balanced Feistel network over the smallest power of four >= n: each round swaps
    the halves and XORs one with a hash of the other keyed by (seed, epoch, round), which is a
    bijection whatever the hash. Cycle walking (re-applying it while the result is >= n) maps
    [0, n) onto itself, since each cycle of the bijection through [0, n) returns there; the
    domain is < 4n, so few steps are needed.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, *,
                 vocab_size: int | None = None):
        """`vocab_size`: the model's; a token id at or above it is an error naming where it
        is (the model's embedding would otherwise fail on it mid-run)."""
        self.vocab_size = vocab_size
        if seq_len < 1:
            raise CpmError(f"seq_len must be at least 1, got {seq_len}")
        self.stream, self.seq_len, self.seed = stream, int(seq_len), int(seed)
        self.n = (stream.tokens - 1) // self.seq_len if stream.tokens else 0
        if self.n < 1:
            raise CpmError(
                f"{stream.path} split {stream.split!r} has {stream.tokens} tokens; "
                f"seq_len {seq_len} needs at least {seq_len + 1} for one sample"
            )
        self._half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half) - 1)
        self._seed_key = _mix(np.array([self.seed & _M64], dtype=np.uint64))

    def __len__(self) -> int:
        return self.n

    def _keys(self, epochs: np.ndarray) -> list[np.ndarray]:
        """One uint64 key per position and round, from (seed, epoch, round)."""
        base = _mix(epochs.astype(np.uint64) ^ self._seed_key)
        return [_mix(base + np.uint64((r + 1) * 0x9E3779B97F4A7C15 & _M64))
                for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
        shift = np.uint64(self._half)
        left, right = x >> shift, x & self._mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << shift) | right

    def permute(self, positions: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The sample index at each position in [0, n) of each epoch's order."""
        keys = self._keys(np.asarray(epochs, dtype=np.uint64))
        out = self._feistel(np.asarray(positions, dtype=np.uint64), keys)
        walk = np.flatnonzero(out >= self.n)
        while walk.size:
            out[walk] = self._feistel(out[walk], [k[walk] for k in keys])
            walk = walk[out[walk] >= self.n]
        return out.astype(np.int64)

    def _rows(self, consumed: np.ndarray) -> np.ndarray:
        if consumed.size and consumed.min() < 0:
            raise IndexError("consumed must be >= 0")
        indices = self.permute(consumed % self.n, consumed // self.n)
        width = self.seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        for row, index in enumerate(indices):
            out[row] = self.stream.read(int(index) * self.seq_len, width)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            row, column = np.unravel_index(int(out.argmax()), out.shape)
            position = int(indices[row]) * self.seq_len + int(column)
            raise CpmError(f"{self.stream.path} split {self.stream.split!r}: token {position:,} "
                           f"is id {int(out.max())}, outside the model's vocabulary "
                           f"(model.vocab_size {self.vocab_size})")
        return out

    def sample(self, consumed: int) -> np.ndarray:
        """The sample at global position `consumed` (epoch consumed // len, a fresh order each)."""
        return self._rows(np.array([consumed], dtype=np.int64))[0]

    def batch(self, consumed: int, count: int) -> np.ndarray:
        """Samples consumed .. consumed + count - 1 as a [count, seq_len + 1] int64 array."""
        return self._rows(consumed + np.arange(count, dtype=np.int64))

    def shard(self, consumed: int, count: int, rank: int, world_size: int) -> np.ndarray:
        """This rank's rows (rank::world_size) of batch(consumed, count), reading only those."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of size {world_size}")
        return self._rows(consumed + np.arange(rank, count, world_size, dtype=np.int64))
