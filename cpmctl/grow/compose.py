"""`cpmctl grow`: compare the source model's architecture with the recipe's, apply the
operators that bridge them (vocabulary, width, depth, dense -> MoE, in that order), and measure
how much the function moved on a probe batch.

Fields no operator changes must be equal; a field that would shrink, another architecture,
or a shape no operator reaches is a CpmError naming the `model.*` key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..artifacts import open_artifact
from ..errors import CpmError
from ..models import build_model
from ..models.artifact import TOKENIZER_DIR, load_model, save_model
from ..models.config import ModelConfig
from ..tokenizer import from_folder, load_tokenizer
from .depth import grow_depth
from .moe import grow_moe
from .vocab import canonical_ids, grow_vocab, id_map, token_pieces
from .width import grow_width

#: fields no operator changes: the recipe must keep the source's value
FIXED = ("head_size", "max_positions", "relative_buckets", "relative_max_distance", "eps")
#: the same fields as recipe keys, for the error message
_KEYS = {"head_size": "d_head", "eps": "layer_norm_eps"}
PROBE_TOKENS = 32  # per row of the probe batch (2 rows); encdec: half as many decoder tokens


@dataclass
class GrowOptions:
    """How the operators grow what the recipe asks for (`cpmctl grow --help`)."""

    depth_mode: str = "append"
    new_layers: str = "copy"
    allow_inexact: bool = False
    split_noise: float = 0.0
    router_init: str = "zero"
    expert_noise: float = 0.0
    seed: int = 0


def _bad(key: str, why: str) -> CpmError:
    return CpmError(f"model.{key}: {why}")


def check_growable(source: ModelConfig, target: ModelConfig, *, new_tokenizer: bool,
                   allow_inexact: bool) -> None:
    """Raise the CpmError naming the first field no operator grows `source` to."""
    if source.arch != target.arch:
        raise _bad("arch", f"the source model is {source.arch}, the recipe's is {target.arch}; "
                           "cpmctl grow keeps the architecture")
    for name in FIXED:
        if getattr(source, name) != getattr(target, name):
            raise _bad(_KEYS.get(name, name), f"{getattr(target, name)} differs from the source "
                       f"model's {getattr(source, name)}, and no growth operator changes it")
    sizes = [("vocab_size", source.vocab_size, target.vocab_size),
             ("d_model", source.d_model, target.d_model),
             ("n_heads", source.n_heads, target.n_heads),
             ("d_ff", source.ffn_size, target.ffn_size),
             ("n_layers", source.n_layers, target.n_layers)]
    if source.arch == "encdec":
        sizes.append(("n_decoder_layers", source.decoder_layers, target.decoder_layers))
    for key, old, new in sizes:
        if new < old:
            raise _bad(key, f"{new} is smaller than the source model's {old}; cpmctl grow "
                            "only grows")
    if target.vocab_size != source.vocab_size and not new_tokenizer:
        raise _bad("vocab_size", f"{source.vocab_size} -> {target.vocab_size} needs the bigger "
                                 "tokenizer: pass --tokenizer")
    if target.d_model % source.d_model and not allow_inexact:
        raise _bad("d_model", f"{source.d_model} -> {target.d_model} is not an integer "
                              "multiple, and LayerNorm/RMSNorm over the hidden state then "
                              "change the function; pass --allow-inexact to accept (the "
                              "deviation is measured and reported)")
    if source.moe.experts:
        for key in ("experts", "router", "top_k"):
            if getattr(source.moe, key) != getattr(target.moe, key):
                raise _bad(f"moe.{key}", f"{getattr(target.moe, key)} differs from the source "
                           f"MoE's {getattr(source.moe, key)}; only a dense model grows into "
                           "an MoE")


def _probe(source, grown, source_cfg: ModelConfig, ids: list[int] | None,
           usable_ids: list[int] | None, seed: int) -> float:
    """max |logit(grown) - logit(source)| on a seeded random batch of `usable_ids` (default:
    all), over the source's ids (`ids`: their ids in the grown model, None when the same),
    both in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    vocab = source_cfg.vocab_size if ids is None else len(ids)
    usable = torch.arange(vocab) if usable_ids is None else torch.tensor(usable_ids)
    length = min(PROBE_TOKENS, source_cfg.max_positions) if source_cfg.arch == "gpt" \
        else PROBE_TOKENS
    tokens = usable[torch.randint(len(usable), (2, length), generator=generator)]
    decoder = usable[torch.randint(len(usable), (2, length // 2), generator=generator)]
    lookup = None if ids is None else torch.tensor(ids)
    translate = (lambda t: t) if lookup is None else (lambda t: lookup[t])  # noqa: E731
    source.eval()
    grown.eval()
    with torch.no_grad():
        if source_cfg.arch == "gpt":
            old, new = source(tokens), grown(translate(tokens))
        else:
            old = source(tokens, decoder)
            new = grown(translate(tokens), translate(decoder))
    old = old[..., :vocab][..., usable]
    new = (new[..., :vocab] if lookup is None else new[..., lookup])[..., usable]
    return float((new - old).abs().max())


def grow_model(source_path: str | Path, target: ModelConfig, options: GrowOptions,
               tokenizer: str | Path | None = None):
    """(grown model, its config = `target`, lineage, tokenizer folder of the grown model)."""
    artifact = open_artifact(source_path, expect="model", option="--from")
    source, cfg = load_model(artifact.path, option="--from")
    source_cfg = cfg
    check_growable(cfg, target, new_tokenizer=tokenizer is not None,
                   allow_inexact=options.allow_inexact)
    state, records, probe_ids, usable_ids = dict(source.state_dict()), [], None, None
    tokenizer_dir = artifact.path / TOKENIZER_DIR
    if tokenizer is not None:
        if not tokenizer_dir.is_dir():
            raise CpmError(f"--from {source_path} has no {TOKENIZER_DIR}/: --tokenizer needs the "
                           "old tokenizer to match pieces against")
        new_tok = load_tokenizer(tokenizer)
        old_pieces, new_pieces = token_pieces(from_folder(tokenizer_dir)), token_pieces(new_tok)
        state, cfg, record = grow_vocab(state, cfg, target.vocab_size, old_pieces, new_pieces)
        probe_ids = id_map(old_pieces, new_pieces, "the source's tokenizer", "--tokenizer")
        usable_ids = canonical_ids(old_pieces)
        records.append(record)
        tokenizer_dir = Path(tokenizer)
    if (cfg.d_model, cfg.n_heads, cfg.ffn_size) != (target.d_model, target.n_heads,
                                                     target.ffn_size):
        state, cfg, record = grow_width(state, cfg, target, split_noise=options.split_noise,
                                        seed=options.seed)
        records.append(record)
    if (cfg.n_layers, cfg.decoder_layers) != (target.n_layers, target.decoder_layers):
        state, cfg, record = grow_depth(state, cfg, target, mode=options.depth_mode,
                                        new_layers=options.new_layers, seed=options.seed)
        records.append(record)
    if target.moe.experts and not cfg.moe.experts:
        state, cfg, record = grow_moe(state, cfg, target, router_init=options.router_init,
                                      expert_noise=options.expert_noise, seed=options.seed)
        records.append(record)
    grown = build_model(target)
    try:
        grown.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a combination the operators do not reach
        raise CpmError(f"the recipe's [model] is not reachable from {source_path}: "
                       f"{str(exc).strip().splitlines()[-1].strip()}") from None
    delta = _probe(source, grown, source_cfg, probe_ids, usable_ids, options.seed)
    lineage = {"source": str(source_path), "source_digest": artifact.digest,
               "operators": records, "max_abs_logit_delta": delta,
               "probe": {"batch": 2, "tokens": PROBE_TOKENS, "seed": options.seed}}
    return grown, replace(target), lineage, tokenizer_dir if tokenizer_dir.is_dir() else None


def grow(source: str | Path, target: ModelConfig, out: str | Path, options: GrowOptions, *,
         tokenizer: str | Path | None = None, force: bool = False) -> tuple[Path, dict]:
    """Grow `source` into the architecture `target` and write the model artifact `out`."""
    grown, cfg, lineage, tokenizer_dir = grow_model(source, target, options, tokenizer)
    inputs = [("source", str(source), lineage["source_digest"])]
    if tokenizer_dir is not None:
        inputs.append(("tokenizer", str(tokenizer_dir),
                       open_artifact(tokenizer_dir, "tokenizer").digest))
    path = save_model(out, grown, cfg, tokenizer_dir, meta={"lineage": lineage},
                      force=force, inputs=inputs)
    return path, lineage
