"""`cpmctl bench speed --tokenizer T --corpus C`: `data tokenize` throughput against its bound.

Each `data tokenize` run is the real command in a process of its own. The bound is the bare
loop, in this process, no I/O: jieba + SentencePiece for cpm1 exactly as
CPM-Generate encodes (`sp.encode(" ".join(jieba words))`), jieba + greedy match for cpm2.
Reported: MB/s of each, N workers' speed-up over one, and one worker's time over the bare
loop's. MB/s counts the UTF-8 bytes of the documents' text.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jieba

from cpmctl.data.shards import iter_documents
from cpmctl.errors import CpmError
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.base import TO_SUBSTITUTES


def _bare_loop(tokenizer, texts: list[str]) -> float:
    start = time.perf_counter()
    if tokenizer.scheme == "cpm1":
        sp = tokenizer.sp
        for text in texts:
            sp.encode(" ".join(w.translate(TO_SUBSTITUTES) for w in jieba.cut(text)))
    else:
        for text in texts:
            tokenizer.encode(text)
    return time.perf_counter() - start


def _time_cli(corpus: Path, tokenizer: Path, out: Path, workers: int) -> float:
    """Seconds `cpmctl data tokenize` takes as a user runs it: a process of its own, whose
    start-up (imports, jieba's dictionary) counts as it does for the user."""
    command = [sys.executable, "-m", "cpmctl", "--quiet", "data", "tokenize", str(corpus),
               "--tokenizer", str(tokenizer), "-o", str(out), "--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise CpmError(f"data tokenize failed: {done.stderr.strip()}")
    return seconds


def bench_tokenizer(tokenizer_path: Path, corpus_path: Path, workers: list[int],
                    repeat: int = 1) -> dict:
    """Time the bare loop and `data tokenize` on each worker count; the best of `repeat`."""
    tokenizer = load_tokenizer(tokenizer_path)
    texts = [row["text"] for row in iter_documents(Path(corpus_path), columns=["text"])]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    jieba.initialize()
    runs = [{"what": "bare loop (1 process, no I/O)", "workers": 1,
             "seconds": min(_bare_loop(tokenizer, texts) for _ in range(repeat))}]
    with tempfile.TemporaryDirectory(prefix="cpmctl-bench-") as scratch:
        for count in workers:
            seconds = min(_time_cli(corpus_path, tokenizer_path, Path(scratch) / f"w{count}-{i}",
                                    count) for i in range(repeat))
            runs.append({"what": "cpmctl data tokenize", "workers": count, "seconds": seconds})
    for run in runs:
        run["mb_per_s"] = round(megabytes / run["seconds"], 3)
        run["seconds"] = round(run["seconds"], 3)
    bare, one = runs[0], next(r for r in runs[1:] if r["workers"] == 1)
    most = max(runs[1:], key=lambda r: r["workers"])
    scaling = round(one["seconds"] / most["seconds"], 2)
    overhead = round(one["seconds"] / bare["seconds"], 2)
    return {
        "tokenizer": str(tokenizer_path), "scheme": tokenizer.scheme,
        "corpus": str(corpus_path), "megabytes": round(megabytes, 2), "documents": len(texts),
        "runs": runs,
        "scaling": {"workers": most["workers"], "speedup_vs_1": scaling},
        "overhead_vs_bare_loop": overhead,
    }
