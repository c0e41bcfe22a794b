"""`cpmctl model convert`: Hugging Face GPT-2 checkpoints <-> cpmctl model artifacts.

    convert_from_hf("CPM-Generate/", "work/cpm1", tokenizer=None)   # -> a model artifact
    convert_to_hf("work/cpm1", "work/cpm1-hf")                      # -> a transformers folder

The format itself (config keys, tensor names, Conv1D layout) is in hf.py. Every check that
can fail (config, tokenizer, output path, every tensor) runs before anything is written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..artifacts import check_replaceable, digest_path, open_artifact
from ..console import info, warn
from ..errors import CpmError
from ..tokenizer import load_tokenizer
from ..tokenizer.build import import_tokenizer
from .artifact import (
    MODEL_JSON,
    TOKENIZER_DIR,
    load_model,
    parameter_count,
    read_model_json,
    save_model,
)
from .config import ModelConfig
from .hf import (
    CONFIG,
    check_gpt2_compatible,
    check_hf_output,
    read_hf_config,
    read_hf_weights,
    write_hf_folder,
)

#: Vocabulary files that may sit beside Hugging Face weights: CPM-Generate's own, and
#: transformers' CpmTokenizer's name for the same SentencePiece model.
VOCABULARY_FILES = ("chinese_vocab.model", "spiece.model")


def find_tokenizer(folder: Path) -> Path:
    """The tokenizer beside a checkpoint: the `tokenizer/` artifact that `--to hf` writes, else
    the first of VOCABULARY_FILES there."""
    for name in (TOKENIZER_DIR, *VOCABULARY_FILES):
        if (folder / name).exists():
            return folder / name
    raise CpmError(f"{folder}: no tokenizer found (looked for {TOKENIZER_DIR}/, "
                   f"{', '.join(VOCABULARY_FILES)}); pass --tokenizer with a tokenizer "
                   f"artifact or CPM-1's chinese_vocab.model")


def _tokenizer_artifact(source: Path, scratch: Path) -> tuple[Path, tuple[str, str, str]]:
    """(a tokenizer artifact for `source`, the manifest input that records it). A vocabulary
    file is imported into `scratch` the way `cpmctl tokenizer import` does it."""
    if source.is_dir():
        artifact = open_artifact(source, expect="tokenizer", option="--tokenizer")
        return source, ("tokenizer", str(source), artifact.digest)
    if not source.is_file():
        raise CpmError(f"{source}: no such file or folder (for --tokenizer)")
    imported = import_tokenizer(source, scratch / TOKENIZER_DIR)
    return imported, ("vocabulary", str(source), digest_path(source))


def _check_fits(tokenizer_dir: Path, source: Path, cfg: ModelConfig, config: Path) -> None:
    size = load_tokenizer(tokenizer_dir).vocab_size
    if size > cfg.vocab_size:
        raise CpmError(f"{source}: the tokenizer has {size:,} tokens, more than the model's "
                       f"vocab_size {cfg.vocab_size:,} in {config}")


def convert_from_hf(folder: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                    force: bool = False, command=None) -> Path:
    """A model artifact at `out` from a Hugging Face GPT-2 folder; `tokenizer` (a tokenizer
    artifact or an original vocabulary file) defaults to the one `find_tokenizer` finds."""
    folder, out = Path(folder), Path(out)
    cfg = read_hf_config(folder)
    check_replaceable(out, force)  # NOTE: save_model checks again; this fails before the load
    source = Path(tokenizer) if tokenizer is not None else find_tokenizer(folder)
    with tempfile.TemporaryDirectory(prefix="cpmctl-convert-") as scratch:
        tokenizer_dir, tokenizer_input = _tokenizer_artifact(source, Path(scratch))
        _check_fits(tokenizer_dir, source, cfg, folder / CONFIG)
        model, files = read_hf_weights(folder, cfg)
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        info(f"{folder}: {cfg.n_layers} layers x {cfg.d_model}, "
             f"{parameter_count(model):,} parameters ({', '.join(dtypes)}) from "
             f"{', '.join(p.name for p in files)}")
        inputs = [("config", str(folder / CONFIG), digest_path(folder / CONFIG)),
                  *(("weights", str(p), digest_path(p)) for p in files), tokenizer_input]
        return save_model(out, model, cfg, tokenizer_dir, force=force, command=command,
                          inputs=inputs, meta={"lineage": {"converted_from": str(folder),
                                                           "format": "huggingface-gpt2"}})


def convert_to_hf(model_path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """A folder that `transformers.GPT2LMHeadModel.from_pretrained` loads, from a dense GPT
    model (or checkpoint) artifact; its tokenizer goes along as `tokenizer/`."""
    out = Path(out)
    artifact = open_artifact(model_path, expect=("model", "checkpoint"), option="--to hf")
    cfg, _ = read_model_json(artifact.path)
    check_gpt2_compatible(cfg, artifact.path / MODEL_JSON)
    check_hf_output(out, force)  # NOTE: write_hf_folder checks again; this fails before the load
    tokenizer_dir = artifact.path / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        warn(f"{artifact.path} has no {TOKENIZER_DIR}/: {out} will have no tokenizer")
        tokenizer_dir = None
    model, cfg = load_model(artifact.path, option="--to hf")
    return write_hf_folder(out, model, cfg, tokenizer_dir, force=force)
