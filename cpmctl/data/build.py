"""`cpmctl data build`: inputs -> cleaned, filtered, deduplicated corpus artifact.

The job is a short pipeline, in the spirit of datatrove:

    main process            workers (any number)                 main process
    read + cut chunks  ->   parse, normalise, filter, hash,  ->  exact + near dedup in
    (readers.py)            MinHash signatures (process_chunk)   input order, write shards

Every document that enters is accounted for: documents in = kept + the sum of dropped per
reason, and `--keep-rejected` writes each dropped document with its reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from cpmctl.artifacts import ArtifactWriter
from cpmctl.console import RateMeter, warn
from cpmctl.data.clean import FilterSettings, chunk_reasons, document_reason, normalise
from cpmctl.data.dedup import LshIndex, MinHashSettings, band_keys, exact_hash, signatures
from cpmctl.data.parallel import ordered_map
from cpmctl.data.readers import Chunk, FileReport, read_chunks, record_limit, resolve_inputs
from cpmctl.data.records import parse_chunk
from cpmctl.data.shards import CORPUS_SCHEMA, REJECTED_SCHEMA, ShardWriter, meta_json
from cpmctl.errors import CpmError

DEDUP_MODES = ("none", "exact", "minhash")
SPLIT_MODES = ("line", "paragraph")
_PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class BuildSettings:
    filters: FilterSettings = field(default_factory=FilterSettings)
    minhash: MinHashSettings = field(default_factory=MinHashSettings)
    dedup: str = "minhash"
    split: str = "line"
    text_field: str = "text"
    format: str | None = None
    shard_bytes: int = 128 * 10**6
    keep_rejected: bool = False
    workers: int = 1
    chunk_bytes: int = 2 * 2**20

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP_MODES:
            raise CpmError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, not {self.dedup!r}")
        if self.split not in SPLIT_MODES:
            raise CpmError(f"--split must be one of {', '.join(SPLIT_MODES)}, not {self.split!r}")
        if self.workers < 1:
            raise CpmError(f"--workers must be at least 1, not {self.workers}")

    def recorded(self) -> dict:
        """The settings that decide the output (not the worker count), for stats and meta."""
        settings = asdict(self)
        for key in ("workers", "chunk_bytes", "format"):
            settings.pop(key)
        if self.dedup != "minhash":
            settings.pop("minhash")
        return settings


@dataclass
class ChunkResult:
    source: str
    disk_bytes: int
    documents: int = 0
    bytes_in: int = 0
    kept: list[tuple[str, str, int]] = field(default_factory=list)  # text, meta, raw bytes
    hashes: list[int] = field(default_factory=list)
    bands: list[list[int]] | None = None
    rejected: list[tuple[str, str, str, int]] = field(default_factory=list)  # + reason
    problems: list[str] = field(default_factory=list)


_worker_settings: BuildSettings | None = None


def _init_worker(settings: BuildSettings) -> None:
    global _worker_settings
    _worker_settings = settings


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Parse, normalise and filter one chunk; hash and sign the documents that pass."""
    settings = _worker_settings
    result = ChunkResult(chunk.source, chunk.disk_bytes)
    keep_text = settings.keep_rejected

    def reject(text: str, meta: dict, reason: str, raw_bytes: int) -> None:
        result.rejected.append((text if keep_text else "", meta_json(meta), reason, raw_bytes))

    candidates: list[tuple[str, dict, int]] = []
    for line, raw_bytes in chunk.oversized:  # dropped unread by the reader
        result.documents += 1
        result.bytes_in += raw_bytes
        reject("", {"line": line}, "too_long", raw_bytes)
    for record in parse_chunk(chunk, settings.split, settings.text_field):
        result.documents += 1
        result.bytes_in += record.raw_bytes
        if record.reason is not None:
            reject(record.text, record.meta, record.reason, record.raw_bytes)
            if len(result.problems) < _PROBLEMS_SHOWN:
                where = record.meta.get("line", record.meta.get("row"))
                result.problems.append(f"{chunk.source}:{where}: {record.detail}")
            continue
        text = normalise(record.text)
        reason = document_reason(text, settings.filters)
        if reason is None:
            candidates.append((text, record.meta, record.raw_bytes))
        else:
            reject(text, record.meta, reason, record.raw_bytes)
    reasons = chunk_reasons([text for text, _, _ in candidates], settings.filters)
    for (text, meta, raw_bytes), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            result.kept.append((text, meta_json(meta), raw_bytes))
        else:
            reject(text, meta, reason, raw_bytes)
    texts = [text for text, _, _ in result.kept]
    result.hashes = [exact_hash(text) for text in texts]
    if settings.dedup == "minhash" and texts:
        result.bands = band_keys(signatures(texts, settings.minhash), settings.minhash).tolist()
    return result


@dataclass
class Tally:
    """Documents and bytes in, kept and dropped per reason."""

    documents_in: int = 0
    bytes_in: int = 0
    kept: int = 0
    kept_bytes: int = 0
    kept_clean_bytes: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_bytes: Counter = field(default_factory=Counter)

    def drop(self, reason: str, raw_bytes: int) -> None:
        self.dropped[reason] += 1
        self.dropped_bytes[reason] += raw_bytes

    def as_dict(self) -> dict:
        return {
            "documents": {"in": self.documents_in, "kept": self.kept,
                          "dropped": dict(sorted(self.dropped.items()))},
            "bytes": {"in": self.bytes_in, "kept": self.kept_bytes,
                      "dropped": dict(sorted(self.dropped_bytes.items())),
                      "kept_after_cleaning": self.kept_clean_bytes},
        }


class _Deduplicator:
    """Exact and near-duplicate removal over documents in input order (main process)."""

    def __init__(self, settings: BuildSettings):
        self.mode = settings.dedup
        self.seen: set[int] = set()
        self.lsh = LshIndex()

    def duplicate(self, digest: int, bands: list[int] | None) -> tuple[str, int] | None:
        """None for a new document, else (reason, id of the document it duplicates)."""
        if self.mode == "none":
            return None
        if digest in self.seen:
            return "exact_duplicate", digest
        self.seen.add(digest)
        if bands is not None:
            cluster = self.lsh.add(digest, bands)
            if cluster is not None:
                return "near_duplicate", cluster
        return None


def build_corpus(inputs: list[str], out, settings: BuildSettings, *, force: bool = False,
                 command=None) -> dict:
    """Build a corpus artifact at `out`; returns the stats written to stats.json."""
    sources = resolve_inputs(inputs, settings.format)
    reports: dict[str, FileReport] = {}
    problems: list[str] = []
    tally = Tally()
    dedup = _Deduplicator(settings)

    def chunks():
        for source in sources:
            report = reports[source.name] = FileReport(source.name, source.format)
            yield from read_chunks(source, report, chunk_bytes=settings.chunk_bytes,
                                   split=settings.split, text_field=settings.text_field,
                                   max_record_bytes=record_limit(settings.filters.max_chars))

    total = None if any(s.path is None for s in sources) else sum(
        s.path.stat().st_size for s in sources)
    with ArtifactWriter(out, "corpus", force=force, command=command) as writer:
        kept_shards = ShardWriter(writer.dir / "shards", CORPUS_SCHEMA, settings.shard_bytes)
        rejected_shards = (ShardWriter(writer.dir / "rejected", REJECTED_SCHEMA,
                                       settings.shard_bytes) if settings.keep_rejected else None)
        results = ordered_map(process_chunk, chunks(), workers=settings.workers,
                              initializer=_init_worker, initargs=(settings,))
        with RateMeter("data build", total) as meter:
            for result in results:
                _absorb(result, tally, dedup, kept_shards, rejected_shards)
                reports[result.source].documents += result.documents
                problems += result.problems[: max(0, 20 - len(problems))]
                meter.advance(result.disk_bytes, result.documents)
        shards = kept_shards.close()
        if rejected_shards is not None:
            rejected_shards.close()
        _warn_problems(reports.values(), problems, tally)
        if tally.documents_in == 0:
            raise CpmError(f"no documents in {', '.join(inputs)} (see the warnings above)")
        stats = {
            **tally.as_dict(),
            "near_duplicates": _near_duplicate_stats(settings, dedup),
            "files": [vars(report) for report in reports.values()],
            "problems": problems,
            "settings": settings.recorded(),
        }
        (writer.dir / "stats.json").write_text(
            json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for report in reports.values():
            writer.add_input("source", report.path, report.digest or f"unread: {report.status}")
        meta = {key: stats[key] for key in ("documents", "bytes", "near_duplicates", "settings")}
        writer.commit({**meta, "shards": len(shards)})
    return stats


def _absorb(result: ChunkResult, tally: Tally, dedup: _Deduplicator, kept_shards: ShardWriter,
            rejected_shards: ShardWriter | None) -> None:
    tally.documents_in += result.documents
    tally.bytes_in += result.bytes_in
    for text, meta, reason, raw_bytes in result.rejected:
        tally.drop(reason, raw_bytes)
        if rejected_shards is not None:
            rejected_shards.add((f"{exact_hash(text):016x}", text, result.source, meta, reason))
    bands = result.bands or [None] * len(result.kept)
    rows = zip(result.kept, result.hashes, bands, strict=True)
    for (text, meta, raw_bytes), digest, keys in rows:
        duplicate = dedup.duplicate(digest, keys)
        if duplicate is None:
            tally.kept += 1
            tally.kept_bytes += raw_bytes
            tally.kept_clean_bytes += len(text.encode("utf-8"))
            kept_shards.add((f"{digest:016x}", text, result.source, meta))
            continue
        reason, original = duplicate
        tally.drop(reason, raw_bytes)
        if rejected_shards is not None:
            marked = json.dumps({**json.loads(meta), "duplicate_of": f"{original:016x}"},
                                ensure_ascii=False)
            rejected_shards.add((f"{digest:016x}", text, result.source, marked, reason))


def _near_duplicate_stats(settings: BuildSettings, dedup: _Deduplicator) -> dict | None:
    if settings.dedup != "minhash":
        return None
    minhash = settings.minhash
    return {
        "clusters": dedup.lsh.duplicate_clusters,
        "removed": sum(size - 1 for size in dedup.lsh.cluster_sizes.values()),
        "bands": minhash.bands,
        "rows": minhash.rows,
        "shingle_chars": minhash.shingle,
        "threshold": round(minhash.threshold, 4),
        "catch_probability": {f"{s:.1f}": round(minhash.catch_probability(s), 4)
                              for s in np.arange(0.5, 1.0, 0.1)},
    }


def _warn_problems(reports, problems: list[str], tally: Tally) -> None:
    for report in reports:
        if report.status in ("binary", "unreadable"):
            warn(f"{report.path}: skipped, {report.error}")
        elif report.status == "empty":
            warn(f"{report.path}: empty file")
    parse_reasons = ("invalid_utf8", "malformed_json", "missing_field")
    parse_errors = sum(tally.dropped[reason] for reason in parse_reasons)
    for problem in problems[:_PROBLEMS_SHOWN]:
        warn(f"{problem} (counted as rejected)")
    if parse_errors > _PROBLEMS_SHOWN:
        warn(f"... {parse_errors - _PROBLEMS_SHOWN:,} more unreadable records (stats.json has 20)")
