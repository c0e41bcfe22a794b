"""`cpmctl bench data`: throughput of `data build`, 1 worker against N, exact against MinHash.

Reported: MB/s and documents/s per setting, the speed-up of N workers over one, MinHash's cost
over exact dedup, and whether the output bytes are identical for every worker count. MB/s counts
the bytes of the documents read (stats.json bytes.in).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cpmctl.artifacts import open_artifact
from cpmctl.console import settings as console_settings
from cpmctl.data.build import BuildSettings, build_corpus
from cpmctl.quickstart import package_corpus


def _shard_digests(corpus: Path) -> dict:
    files = open_artifact(corpus, "corpus").files
    return {name: entry["sha256"] for name, entry in files.items() if name != "stats.json"}


def bench_data_build(inputs: list[str] | None, workers: list[int], repeat: int = 1) -> dict:
    """Time `data build` for every (dedup mode, worker count); keep the best of `repeat`."""
    with tempfile.TemporaryDirectory(prefix="cpmctl-bench-") as scratch:
        scratch = Path(scratch)
        if not inputs:
            inputs = [str(p) for p in package_corpus(scratch / "raw")]
        runs = []
        quiet, console_settings.quiet = console_settings.quiet, True
        try:
            for mode in ("exact", "minhash"):
                for count in workers:
                    best, stats, digests = None, None, None
                    for attempt in range(repeat):
                        out = scratch / f"{mode}-{count}-{attempt}"
                        start = time.perf_counter()
                        stats = build_corpus(inputs, out, BuildSettings(dedup=mode, workers=count),
                                             command=["cpmctl", "bench", "data"])
                        elapsed = time.perf_counter() - start
                        best = elapsed if best is None else min(best, elapsed)
                        digests = _shard_digests(out)
                    runs.append({
                        "dedup": mode, "workers": count, "seconds": round(best, 3),
                        "mb_per_s": round(stats["bytes"]["in"] / best / 1e6, 2),
                        "docs_per_s": round(stats["documents"]["in"] / best),
                        "kept": stats["documents"]["kept"], "digests": digests,
                    })
        finally:
            console_settings.quiet = quiet
    return summarise(inputs, runs, stats["bytes"]["in"], stats["documents"]["in"])


def summarise(inputs: list[str], runs: list[dict], input_bytes: int, documents: int) -> dict:
    by_key = {(run["dedup"], run["workers"]): run for run in runs}
    most = max(run["workers"] for run in runs)
    identical = {
        mode: len({str(by_key[(mode, w)]["digests"]) for w in {r["workers"] for r in runs}}) == 1
        for mode in ("exact", "minhash")
    }
    for run in runs:
        del run["digests"]
    exact, minhash = by_key[("exact", most)], by_key[("minhash", most)]
    speedup = {mode: round(by_key[(mode, 1)]["seconds"] / by_key[(mode, most)]["seconds"], 2)
               for mode in ("exact", "minhash") if (mode, 1) in by_key and most > 1}
    cost = round(minhash["seconds"] / exact["seconds"], 2)
    return {
        "inputs": inputs,
        "input_mb": round(input_bytes / 1e6, 2),
        "documents": documents,
        "runs": runs,
        "speedup_vs_1_worker": speedup,
        "minhash_cost_vs_exact": cost,
        "identical_output_across_workers": identical,
    }
