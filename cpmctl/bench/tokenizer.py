"""`cpmctl bench speed --tokenizer T --corpus C`: `data tokenize` throughput against its bound.

The bound is the bare loop, one process, no I/O: jieba + SentencePiece for cpm1 exactly as
CPM-Generate encodes (`sp.encode(" ".join(jieba words))`), jieba + greedy match for cpm2.
Targets (issue #3): 2 workers >= 1.8x one worker; one worker within 1.3x of the bare loop.
MB/s counts the UTF-8 bytes of the documents' text.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jieba

from cpmctl.console import settings as console_settings
from cpmctl.data.shards import iter_documents
from cpmctl.data.tokenize import tokenize_corpus
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.base import TO_SUBSTITUTES

TARGET_SCALING = 1.8
TARGET_OVERHEAD = 1.3


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


def bench_tokenizer(tokenizer_path: Path, corpus_path: Path, workers: list[int]) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    texts = [row["text"] for row in iter_documents(Path(corpus_path), columns=["text"])]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    jieba.initialize()
    runs = [{"what": "bare loop (1 process, no I/O)", "workers": 1,
             "seconds": _bare_loop(tokenizer, texts)}]
    quiet, console_settings.quiet = console_settings.quiet, True
    try:
        with tempfile.TemporaryDirectory(prefix="cpmctl-bench-") as scratch:
            for count in workers:
                start = time.perf_counter()
                tokenize_corpus(corpus_path, tokenizer_path, Path(scratch) / f"w{count}",
                                workers=count, command=["cpmctl", "bench", "speed"])
                runs.append({"what": "data tokenize", "workers": count,
                             "seconds": time.perf_counter() - start})
    finally:
        console_settings.quiet = quiet
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
        "targets": {
            f"{most['workers']} workers >= {TARGET_SCALING}x one worker": scaling >= TARGET_SCALING,
            f"one worker within {TARGET_OVERHEAD}x of the bare loop": overhead <= TARGET_OVERHEAD,
        },
    }
