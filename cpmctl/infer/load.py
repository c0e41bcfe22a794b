"""A model artifact (or checkpoint) and its tokenizer, ready to generate.

    model, tokenizer = load_for_inference("work/model", dtype="bf16")
    model, tokenizer = load_for_inference("work/model", quantize="int8")   # int8 + bf16
    model = prepare_for_inference(build_model(cfg), dtype="bf16")          # any fp32 model

Precisions: fp32 (exact, the default), bf16 (weights and activations: ~1.7x fp32's decoding
speed on a CPU with native bf16, CPM-Small here), or int8 weights with bf16 activations
(quantize.py: half of bf16's weight memory; ~2x bf16's decoding speed here with cpmctl's own
kernel, int8.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cpmctl.errors import CpmError
from cpmctl.infer.packed import pack_linears
from cpmctl.infer.quantize import quantize_int8
from cpmctl.models.artifact import TOKENIZER_DIR, load_model
from cpmctl.tokenizer import Tokenizer, from_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZATIONS = ("int8",)
PRECISIONS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"},
              "int8": {"dtype": "bf16", "quantize": "int8"}}
"""The precisions the benchmarks compare, by name, as prepare_for_inference's arguments."""


def check_threads(threads: int, option: str = "--threads") -> int:
    """`threads` (0: PyTorch's default) if this machine can run that many, else a CpmError.

    NOTE: OpenMP starts every thread asked for; tens of thousands fail inside the runtime (a
    crash, not an error), and more threads than CPUs only slow the matmuls down."""
    cpus = os.cpu_count() or 1
    if not 0 <= threads <= cpus:
        raise CpmError(f"{option} must be between 0 (PyTorch's default) and {cpus}, the CPUs "
                       f"of this machine; got {threads}")
    return threads


def resolve_device(device: str) -> torch.device:
    """`device` as a torch.device, refusing one this machine does not have."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CpmError(f"--device: unknown device {device!r} (try cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CpmError(f"--device {device}: no CUDA device is available here")
    if resolved.type not in ("cpu", "cuda"):
        raise CpmError(f"--device {device}: only cpu and cuda are supported")
    return resolved


def prepare_for_inference(model: nn.Module, *, dtype: str = "fp32",
                          quantize: str | None = None, device: str = "cpu") -> nn.Module:
    """`model` (fp32 on the CPU, as built or loaded) in eval mode, in the given precision, on
    `device`, with the weight layouts that decode fastest there (packed.py, quantize.py). The
    result is final: it cannot be moved, cast or copied afterwards."""
    if dtype not in DTYPES:
        raise CpmError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise CpmError(f"--quantize: expected one of {', '.join(QUANTIZATIONS)}, "
                       f"got {quantize!r}")
    if quantize == "int8" and dtype != "bf16":
        raise CpmError("--quantize int8 computes in bf16: use it with --dtype bf16 (or no "
                       "--dtype)")
    target = resolve_device(device)
    model.eval()
    if quantize == "int8":
        if target.type != "cpu":
            raise CpmError("--quantize int8 runs on the CPU (both int8 weight-only kernels "
                           "are CPU-only); drop --device or --quantize")
        return quantize_int8(model)
    model = model.to(device=target, dtype=DTYPES[dtype])
    return pack_linears(model) if target.type == "cpu" else model


def load_for_inference(path: str | Path, *, dtype: str = "fp32", quantize: str | None = None,
                       device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """(model ready to generate, tokenizer) from a model or checkpoint artifact."""
    model, cfg = load_model(path)
    tokenizer = model_tokenizer(path, cfg.vocab_size)
    return prepare_for_inference(model, dtype=dtype, quantize=quantize, device=device), tokenizer


def model_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer inside a model artifact, checked to fit the model's vocabulary."""
    tokenizer_dir = Path(path) / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise CpmError(f"{path}: the model has no {TOKENIZER_DIR}/ folder to encode prompts "
                       "with")
    tokenizer = from_folder(tokenizer_dir)
    if tokenizer.vocab_size > vocab_size:
        raise CpmError(f"{path}: its tokenizer has {tokenizer.vocab_size:,} tokens, more than "
                       f"the model's model.vocab_size {vocab_size:,}")
    return tokenizer
