"""Tokenizers: the CPM-1 (jieba + SentencePiece) and CPM-2 (jieba + word vocabulary) schemes.

`load_tokenizer(path)` opens a tokenizer artifact (or a model's `tokenizer/` folder);
`cpmctl.tokenizer.build` builds and imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpmctl.artifacts import open_artifact
from cpmctl.errors import CpmError
from cpmctl.tokenizer.base import CONFIG_FILE, Tokenizer
from cpmctl.tokenizer.cpm1 import MODEL_FILE, Cpm1Tokenizer, load_processor
from cpmctl.tokenizer.cpm2 import VOCAB_FILE, Cpm2Tokenizer, read_vocab

__all__ = ["Tokenizer", "load_tokenizer", "from_folder"]


def from_folder(folder: Path) -> Tokenizer:
    """The tokenizer stored in a folder (tokenizer.json + spm.model or vocab.txt)."""
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        scheme = config["scheme"]
    except (OSError, ValueError, KeyError) as exc:
        raise CpmError(f"{config_path}: unreadable tokenizer config ({exc})") from None
    if scheme == "cpm1":
        return Cpm1Tokenizer(load_processor(folder / MODEL_FILE), str(folder / MODEL_FILE))
    if scheme == "cpm2":
        return Cpm2Tokenizer(read_vocab(folder / VOCAB_FILE), str(folder / VOCAB_FILE))
    raise CpmError(f"{config_path}: unknown scheme {scheme!r} (expected cpm1 or cpm2)")


def load_tokenizer(path: str | Path, option: str = "--tokenizer") -> Tokenizer:
    artifact = open_artifact(path, "tokenizer", option=option)
    return from_folder(artifact.path)
