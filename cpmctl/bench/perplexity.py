"""`cpmctl bench perplexity --model M --dataset D`: what each precision costs in quality.

The perplexity (infer/perplexity.py) of a GPT on a split of a dataset (the validation split,
its first `max_tokens` tokens) with the model prepared as `cpmctl generate` prepares it: fp32,
bf16, and int8 weights with bf16 activations, each as a change against bf16 measured in the same
run.

The dataset must have been tokenized with the model's own tokenizer (the same files): with
another one the ids would mean other tokens and the figure would be noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from cpmctl.artifacts import open_artifact
from cpmctl.errors import CpmError

"""|int8 / bf16 - 1| at most this."""


def _held_out(model: str, dataset: str, split: str, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` ids of the split, after checking the tokenizers are the same."""
    from cpmctl.data.samples import open_dataset
    from cpmctl.models.artifact import TOKENIZER_DIR

    open_artifact(model, ("model", "checkpoint"), option="--model")
    ours = Path(model) / TOKENIZER_DIR
    theirs = Path(dataset) / "tokenizer"
    if not ours.is_dir():
        raise CpmError(f"{model}: the model has no {TOKENIZER_DIR}/ folder to compare the "
                       "dataset's with")
    stream = open_dataset(dataset, split, option="--dataset")
    if open_artifact(ours, "tokenizer").digest != open_artifact(theirs, "tokenizer").digest:
        raise CpmError(f"{dataset} was tokenized with another tokenizer than {model}'s: its "
                       "ids would mean other tokens")
    return torch.from_numpy(stream.read(0, min(stream.tokens, max_tokens)))


def bench_perplexity(*, model: str, dataset: str, split: str, max_tokens: int,
                     window: int | None, precisions: list[str],
                     progress: Callable[[str], None]) -> dict:
    """Perplexity per precision and its change against bf16."""
    from cpmctl.infer import load_for_inference, perplexity
    from cpmctl.infer.load import PRECISIONS
    from cpmctl.kernels.int8 import kernel_name

    ids = _held_out(model, dataset, split, max_tokens)
    runs = []
    for precision in precisions:
        progress(f"{precision} on {ids.numel():,} tokens")
        prepared = load_for_inference(model, **PRECISIONS[precision])[0]
        started = time.perf_counter()
        run = {"precision": precision, "perplexity": perplexity(prepared, ids, window=window,
                                                                batch_size=8),
               "seconds": time.perf_counter() - started}
        if precision == "int8":
            run["int8_kernel"] = kernel_name()
        runs.append(run)
    report = {"model": model, "dataset": dataset, "split": split, "tokens": ids.numel(),
              "window": window or prepared.cfg.max_positions, "runs": runs}
    found = {run["precision"]: run["perplexity"] for run in runs}
    if "bf16" in found:
        for run in runs:
            run["vs_bf16"] = run["perplexity"] / found["bf16"] - 1
    return report
