"""Depth growth: new transformer blocks that start as the identity.

A pre-norm block computes `x + f(norm(x))` for each sublayer. With the output projections
(attention out, cross-attention out, FFN out, every expert's out) zero, each sublayer adds 0:
the block is exactly the identity, so the model's function is unchanged. The block's other
weights are copies of a neighbour (`copy`, so they start where the old ones are and train like
them) or freshly initialised (`init`). Note: copying a block *without* zeroing, as Staged
Training's released code does, is not the identity.

Placement: `append` adds the new blocks after the last one; `interleave` inserts them after
the old blocks, spread evenly (×2: one after each). A new block is never first, so layer 0
keeps the relative position bias an encoder-decoder stack shares.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..models import build_model
from ..models.config import ModelConfig

OUTPUT_PROJECTIONS = ("c_proj.weight", "c_proj.bias", ".o.weight", "wo.weight")
MODES = ("append", "interleave")
NEW_LAYERS = ("copy", "init")


def layer_plan(old: int, new: int, mode: str) -> list[tuple[bool, int]]:
    """For each new layer: (is it new, the old layer it is or follows)."""
    extra = new - old
    if mode == "append":
        return [(False, i) for i in range(old)] + [(True, old - 1)] * extra
    plan = []
    for i in range(old):
        plan.append((False, i))
        plan += [(True, i)] * (extra // old + (1 if i < extra % old else 0))
    return plan


def _stacks(cfg: ModelConfig, target: ModelConfig) -> list[tuple[str, int, int]]:
    if cfg.arch == "gpt":
        return [("blocks", cfg.n_layers, target.n_layers)]
    return [("encoder", cfg.n_layers, target.n_layers),
            ("decoder", cfg.decoder_layers, target.decoder_layers)]


def grow_depth(state: dict[str, torch.Tensor], cfg: ModelConfig, target: ModelConfig, *,
               mode: str = "append", new_layers: str = "copy",
               seed: int = 0) -> tuple[dict, ModelConfig, dict]:
    """The depth operator: `cfg`'s stacks grown to `target`'s layer counts."""
    grown = replace(cfg, n_layers=target.n_layers,
                    n_decoder_layers=target.decoder_layers if cfg.arch == "encdec" else 0)
    with torch.device("meta"):
        wanted = set(build_model(grown).state_dict())
    fresh = None
    if new_layers == "init":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            fresh = build_model(grown).state_dict()
    out = {name: t for name, t in state.items()
           if not re.match(r"(blocks|encoder|decoder)\.\d+\.", name)}
    placed = {}
    for stack, old, new in _stacks(cfg, target):
        plan = layer_plan(old, new, mode)
        placed[stack] = [j for j, (is_new, _) in enumerate(plan) if is_new]
        for j, (is_new, i) in enumerate(plan):
            source, target_prefix = f"{stack}.{i}.", f"{stack}.{j}."
            for name, tensor in state.items():
                if not name.startswith(source):
                    continue
                new_name = target_prefix + name[len(source):]
                if new_name not in wanted:
                    continue  # the relative position bias stays with layer 0
                if not is_new:
                    out[new_name] = tensor
                elif name.endswith(OUTPUT_PROJECTIONS):
                    out[new_name] = torch.zeros_like(tensor)
                else:
                    out[new_name] = (fresh[new_name] if fresh is not None else tensor).clone()
    return out, grown, {"operator": "depth", "mode": mode, "new_layers": new_layers,
                        **{stack: {"from": old, "to": new, "new": placed[stack]}
                           for stack, old, new in _stacks(cfg, target)}}
