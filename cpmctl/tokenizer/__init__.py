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

__all__ = ["Tokenizer", "load_tokenizer", "from_file", "from_folder"]


#: The vocabulary file each scheme keeps beside tokenizer.json.
SCHEME_FILES = {"cpm1": MODEL_FILE, "cpm2": VOCAB_FILE}


def from_file(path: Path, scheme: str) -> Tokenizer:
    """The tokenizer of a scheme's vocabulary file (spm.model for cpm1, vocab.txt for cpm2)."""
    if scheme == "cpm1":
        return Cpm1Tokenizer(load_processor(path), str(path))
    return Cpm2Tokenizer(read_vocab(path), str(path))


def from_folder(folder: Path) -> Tokenizer:
    """The tokenizer stored in a folder (tokenizer.json + spm.model or vocab.txt)."""
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        scheme = config["scheme"]
    except (OSError, ValueError, KeyError) as exc:
        raise CpmError(f"{config_path}: unreadable tokenizer config ({exc})") from None
    if scheme not in SCHEME_FILES:
        raise CpmError(f"{config_path}: unknown scheme {scheme!r} (expected cpm1 or cpm2)")
    return from_file(folder / SCHEME_FILES[scheme], scheme)


def load_tokenizer(path: str | Path, option: str = "--tokenizer") -> Tokenizer:
    artifact = open_artifact(path, "tokenizer", option=option)
    return from_folder(artifact.path)
