"""`cpmctl data tokenize`: corpus + tokenizer -> dataset artifact of token shards.

The work unit is a slice of rows of one corpus row group, about 1/64 of the corpus's text
(at least 256 KB, at most 64 MB: small enough to balance the workers, sized from the corpus
alone so that the output never depends on the worker count); unit k writes `train/part-k.bin` and
`valid/part-k.bin` (flat token ids, every document followed by `<eod>`) with their
`.idx.npy` document offsets. A unit's output depends on nothing else, so the bytes are the
same for any worker count, and a unit is done once its marker is in `.progress/`: a rerun of
an interrupted command (same corpus, tokenizer and settings) skips the finished units.

The split is by document: a document goes to valid when the hash of (seed, its id) falls
under `valid_fraction`, so it does not move when the corpus grows or is re-sharded.

NOTE: jieba's own parallel mode gives nothing on 2 cores, so we shard the work ourselves
across worker processes (docs/design.md §4).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cpmctl import __version__
from cpmctl.artifacts import ArtifactWriter, open_artifact
from cpmctl.console import RateMeter, info
from cpmctl.data.parallel import ordered_map
from cpmctl.data.shards import reading, shard_paths
from cpmctl.errors import CpmError
from cpmctl.folders import copy_tree
from cpmctl.tokenizer import from_folder

SPLITS = ("train", "valid")
PROGRESS = ".progress"  # scratch: the artifact writer drops dot-entries at commit
TOKENIZER_FOLDER = "tokenizer"


_UNIT_BYTES = (256 * 1024, 64 * 2**20)


@dataclass(frozen=True)
class Unit:
    index: int
    shard: str
    row_group: int
    start: int
    stop: int
    text_bytes: int


@dataclass(frozen=True)
class UnitJob:
    unit: Unit
    out_dir: str
    dtype: str
    valid_fraction: float
    seed: int


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_valid(document_id: str, seed: int, valid_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{document_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < valid_fraction * 2**64


_tokenizer = None


def _load_worker_tokenizer(folder: str) -> None:
    global _tokenizer
    _tokenizer = from_folder(Path(folder))


def _write_part(folder: Path, index: int, token_lists: list[list[int]], dtype: str) -> int:
    """Write one part atomically (temporary names, then rename); return its token count."""
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for ids in token_lists for i in ids), dtype=dtype, count=int(offsets[-1]))
    name = f"part-{index:05d}"
    flat.astype(np.dtype(dtype).newbyteorder("<")).tofile(folder / f".{name}.bin")
    with open(folder / f".{name}.idx.npy", "wb") as f:
        np.save(f, offsets)
    os.replace(folder / f".{name}.bin", folder / f"{name}.bin")
    os.replace(folder / f".{name}.idx.npy", folder / f"{name}.idx.npy")
    return int(offsets[-1])


def tokenize_unit(job: UnitJob) -> dict:
    """Tokenize one row group into its train and valid parts; returns the counts."""
    unit, eod = job.unit, _tokenizer.eod_id
    with reading(Path(unit.shard)):
        table = pq.ParquetFile(unit.shard).read_row_group(unit.row_group,
                                                          columns=["id", "text"])
    table = table.slice(unit.start, unit.stop - unit.start)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    encoded = _tokenizer.encode_batch(texts)
    documents: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
    for document_id, tokens in zip(ids, encoded, strict=True):
        split = "valid" if is_valid(document_id, job.seed, job.valid_fraction) else "train"
        tokens.append(eod)
        documents[split].append(tokens)
    counts = {}
    for split, token_lists in documents.items():
        tokens = _write_part(Path(job.out_dir) / split, unit.index, token_lists, job.dtype)
        counts[split] = {"tokens": tokens, "documents": len(token_lists)}
    return {"unit": unit.index, "text_bytes": unit.text_bytes, **counts}


def plan_units(corpus_dir: Path) -> list[Unit]:
    groups = []
    for shard in shard_paths(corpus_dir):
        with reading(shard):
            metadata = pq.ParquetFile(shard).metadata
        if "text" not in metadata.schema.names:
            raise CpmError(f"{shard}: not a corpus shard (no 'text' column)")
        text_column = metadata.schema.names.index("text")
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            size = row_group.column(text_column).total_uncompressed_size
            groups.append((str(shard), group, row_group.num_rows, size))
    low, high = _UNIT_BYTES
    unit_bytes = min(max(sum(g[3] for g in groups) // 64, low), high)
    units: list[Unit] = []
    for shard, group, rows, size in groups:
        pieces = max(1, min(rows, -(-size // unit_bytes)))
        step = -(-rows // pieces)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            units.append(Unit(len(units), shard, group, start, stop, size * (stop - start) // rows))
    return units


def tokenize_corpus(corpus_path, tokenizer_path, out, *, valid_fraction: float = 0.01,
                    seed: int = 0, workers: int = 1, force: bool = False, command=None) -> dict:
    if not 0.0 <= valid_fraction < 1.0:
        raise CpmError(f"--valid-fraction must be in [0, 1), not {valid_fraction}")
    corpus = open_artifact(corpus_path, "corpus", option="data tokenize")
    tokenizer_artifact = open_artifact(tokenizer_path, "tokenizer", option="--tokenizer")
    tokenizer = from_folder(tokenizer_artifact.path)
    dtype = dtype_for(tokenizer.vocab_size)
    settings = {"corpus": corpus.digest, "tokenizer": tokenizer_artifact.digest, "dtype": dtype,
                "valid_fraction": valid_fraction, "seed": seed, "cpmctl": __version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    with ArtifactWriter(out, "dataset", force=force, command=command,
                        resume_key=key) as writer:
        units = plan_units(corpus.path)
        if not units:
            raise CpmError(f"{corpus_path} has no documents to tokenize")
        progress = writer.dir / PROGRESS
        progress.mkdir(exist_ok=True)
        done = {int(p.stem.split("-")[1]): json.loads(p.read_text())
                for p in progress.glob("part-*.json")}
        if done:
            info(f"resuming: {len(done)} of {len(units)} parts already done")
        pending = [u for u in units if u.index not in done]
        jobs = (UnitJob(u, str(writer.dir), dtype, valid_fraction, seed) for u in pending)
        total = sum(u.text_bytes for u in pending)
        results = ordered_map(tokenize_unit, jobs, workers=workers,
                              initializer=_load_worker_tokenizer,
                              initargs=(str(tokenizer_artifact.path),))
        try:
            with RateMeter("data tokenize", total) as meter:
                for result in results:
                    marker = progress / f"part-{result['unit']:05d}.json"
                    marker.with_suffix(".partial").write_text(json.dumps(result))
                    os.replace(marker.with_suffix(".partial"), marker)
                    done[result["unit"]] = result
                    meter.advance(result["text_bytes"], sum(result[s]["documents"] for s in SPLITS))
        except KeyboardInterrupt:
            info(f"{len(done)} of {len(units)} parts are done in {writer.dir}; "
                 "rerun the same command to continue")
            raise
        # The dataset carries its tokenizer, so training needs only the dataset to put the
        # tokenizer inside the model it writes. (Replaced whole: a resumed run may find one.)
        shutil.rmtree(writer.dir / TOKENIZER_FOLDER, ignore_errors=True)
        copy_tree(tokenizer_artifact.path, writer.dir / TOKENIZER_FOLDER)
        splits = {split: {"tokens": sum(r[split]["tokens"] for r in done.values()),
                          "documents": sum(r[split]["documents"] for r in done.values()),
                          "parts": len(units)} for split in SPLITS}
        writer.add_input("corpus", str(corpus_path), corpus.digest)
        writer.add_input("tokenizer", str(tokenizer_path), tokenizer_artifact.digest)
        meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "scheme": tokenizer.scheme, "tokenizer": tokenizer_artifact.digest,
                "corpus": corpus.digest, "valid_fraction": valid_fraction, "seed": seed,
                "splits": splits}
        writer.commit(meta)
    return meta

