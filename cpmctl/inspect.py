"""`cpmctl data inspect`: a summary of any artifact kind, a document sample, a digest check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from cpmctl.artifacts import open_artifact
from cpmctl.artifacts import verify as verify_files
from cpmctl.data.shards import reading, shard_paths
from cpmctl.errors import CpmError


def sample_documents(corpus_dir: Path, count: int, seed: int, folder: str = "shards") -> list[dict]:
    """`count` documents drawn uniformly without replacement, in corpus order."""
    paths = shard_paths(corpus_dir, folder)
    rows = []
    for path in paths:
        with reading(path):
            rows.append(pq.ParquetFile(path).metadata.num_rows)
    total = sum(rows)
    if total == 0:
        return []
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
    documents, first = [], 0
    for path, n in zip(paths, rows, strict=True):
        wanted = chosen[(chosen >= first) & (chosen < first + n)] - first
        if len(wanted):
            with reading(path):
                documents += pq.read_table(path).take(wanted).to_pylist()
        first += n
    return documents


def inspect_artifact(path: Path, *, sample: int = 0, seed: int = 0, rejected: bool = False,
                     verify: bool = False) -> dict:
    artifact = open_artifact(path, option="inspect")
    summary = {
        "path": str(path),
        "kind": artifact.kind,
        "format": artifact.format,
        "created": artifact.manifest.get("created"),
        "cpmctl": artifact.manifest.get("cpmctl"),
        "command": " ".join(artifact.manifest.get("command", [])),
        "files": len(artifact.files),
        "bytes": sum(entry["bytes"] for entry in artifact.files.values()),
        "inputs": artifact.inputs,
        "meta": artifact.meta,
    }
    if sample:
        if artifact.kind != "corpus":
            raise CpmError(f"{path} is a {artifact.kind}; --sample needs a corpus")
        folder = "rejected" if rejected else "shards"
        if rejected and not (artifact.path / "rejected").is_dir():
            raise CpmError(f"{path} has no rejected/ documents (build it with --keep-rejected)")
        summary["sample"] = sample_documents(artifact.path, sample, seed, folder)
    if verify:
        summary["verify"] = {"problems": verify_files(artifact)}
    return summary


def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, rows)
    else:
        rows.append((prefix, f"{value:,}" if isinstance(value, int) else str(value)))


def render_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    table = Table(title=f"{summary['path']} ({summary['kind']}, format {summary['format']})",
                  show_header=False, title_justify="left")
    rows: list[tuple[str, str]] = []
    for key in ("created", "cpmctl", "command", "files", "bytes"):
        rows.append((key, f"{summary[key]:,}" if isinstance(summary[key], int) else summary[key]))
    rows.append(("inputs", str(len(summary["inputs"]))))
    _flatten("", summary["meta"], rows)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for i, document in enumerate(summary.get("sample", []), 1):
        header = f"[{i}] {document['id']}  {document['source']}  {document['meta']}"
        if "reason" in document:
            header += f"  reason={document['reason']}"
        console.print(header, style="bold", markup=False)
        console.print(document["text"], markup=False)
    if "verify" in summary:
        problems = summary["verify"]["problems"]
        if problems:
            for problem in problems:
                console.print(f"verify: {problem}", style="red", markup=False)
        else:
            console.print(f"verify: all {summary['files']} files match the manifest", style="green")
