"""Vocabulary extension: a model's embedding (and untied head) rows re-indexed for a bigger
tokenizer that holds every piece of the old one (docs/design.md §7).

Pieces are matched by their string, so the old and new ids may differ. A new piece's row is the
mean of the rows of the old pieces that spell it (a greedy longest-match of its string over the
old pieces), or the mean of all old rows when the old pieces cannot spell it. Old pieces keep
their rows, so text the old tokenizer encodes the same way the new one does gets the same
hidden states and, for every old piece, the same logit.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import CpmError
from ..models.config import ModelConfig


def token_pieces(tokenizer) -> list[str]:
    """The piece string of every id of a tokenizer, in id order."""
    if hasattr(tokenizer, "sp"):  # cpm1: SentencePiece
        return [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    return list(tokenizer.tokens)  # cpm2: the vocab.txt lines


def id_map(old: list[str], new: list[str], old_name: str, new_name: str) -> list[int]:
    """The new id of each old piece; a CpmError naming the first old piece `new` lacks."""
    index: dict[str, int] = {}
    for i, piece in enumerate(new):
        index.setdefault(piece, i)
    missing = [piece for piece in old if piece not in index]
    if missing:
        raise CpmError(f"{new_name} does not extend {old_name}: {len(missing)} of its "
                       f"{len(old):,} pieces are missing, the first {missing[0]!r}")
    return [index[piece] for piece in old]


def canonical_ids(pieces: list[str]) -> list[int]:
    """The ids a tokenizer emits: of a piece listed twice, the later (CPM-2's loader)."""
    last = {piece: i for i, piece in enumerate(pieces)}
    return sorted(last.values())


def _spelling(piece: str, old_index: dict[str, int], longest: int) -> list[int] | None:
    """Old ids whose strings, left to right, make up `piece`; None if they cannot."""
    ids, start = [], 0
    while start < len(piece):
        for end in range(min(len(piece), start + longest), start, -1):
            if piece[start:end] in old_index:
                ids.append(old_index[piece[start:end]])
                start = end
                break
        else:
            return None
    return ids


def extend_rows(rows: torch.Tensor, mapping: list[int], old: list[str], new: list[str],
                new_rows: int) -> torch.Tensor:
    """[old vocab, d] -> [new_rows, d]: old pieces' rows moved to their new ids, the others
    initialised as the module doc says (rows past the new tokenizer: the mean of all)."""
    out = rows.mean(0, keepdim=True).repeat(new_rows, 1)
    for old_id in canonical_ids(old):
        out[mapping[old_id]] = rows[old_id]
    old_index = {piece: i for i, piece in enumerate(old)}
    longest = max(map(len, old))
    taken = set(mapping)
    for new_id, piece in enumerate(new):
        if new_id in taken:
            continue
        spelled = _spelling(piece, old_index, longest)
        if spelled:
            out[new_id] = rows[spelled].mean(0)
    return out


def grow_vocab(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int,
               old: list[str], new: list[str]) -> tuple[dict, ModelConfig, dict]:
    """The vocabulary operator on a state dict: every [vocab, d] tensor (embedding, untied
    head) re-indexed for the new pieces."""
    if vocab_size < len(new):
        raise CpmError(f"model.vocab_size {vocab_size} is smaller than the new tokenizer "
                       f"({len(new):,} pieces)")
    mapping = id_map(old, new, "the source model's tokenizer", "--tokenizer")
    names = ("wte.weight", "lm_head.weight") if cfg.arch == "gpt" else \
        ("shared.weight", "lm_head.weight")
    out = dict(state)
    for name in names:
        out[name] = extend_rows(state[name], mapping, old, new, vocab_size)
    if cfg.arch == "gpt":
        out["lm_head.weight"] = out["wte.weight"]  # tied
    return out, replace(cfg, vocab_size=vocab_size), {
        "operator": "vocab", "from": cfg.vocab_size, "to": vocab_size,
        "new_pieces": len(new) - len(old)}
