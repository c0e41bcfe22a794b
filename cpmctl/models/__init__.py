"""The models: GPT (CPM-1, gpt.py), encoder-decoder (CPM-2, encdec.py), MoE FFNs (moe.py).

    model = build_model(cfg)          # cfg: ModelConfig, the recipe's [model] section
    n = count_parameters(cfg)         # on the meta device: no memory, no time
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import CpmError
from .config import ARCHS, ROUTERS, ModelConfig, MoeConfig, config_problems
from .encdec import EncDec
from .gpt import GPT
from .moe import MoeFFN

__all__ = ["ARCHS", "ROUTERS", "EncDec", "GPT", "ModelConfig", "MoeConfig", "MoeFFN",
           "build_model", "build_on_meta", "checkpoint_activations", "count_parameters",
           "training_flops_per_token", "validate_config"]


def validate_config(cfg: ModelConfig) -> None:
    """Raise CpmError naming the `model.*` key of the first bad value (config.config_problems
    holds the rules)."""
    problems = config_problems(cfg)
    if problems:
        raise CpmError(problems[0][0])


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes, freshly initialised on the current default device (use
    `with torch.device("meta"):` for a shape-only model)."""
    validate_config(cfg)
    return GPT(cfg) if cfg.arch == "gpt" else EncDec(cfg)


def checkpoint_activations(model: nn.Module) -> None:
    """Make every transformer block recompute its activations in the backward pass instead of
    keeping them (`engine.activation_checkpointing`): activation memory drops from one set
    per block to the blocks' inputs, for about one more forward pass of compute.

    Non-reentrant `torch.utils.checkpoint`, which replays the RNG state: dropout draws the
    same masks when recomputing, so the gradients equal those without checkpointing. Each
    block's submodules still run through their own `__call__`, so DeepSpeed ZeRO-3's
    per-module weight gathering works during the recomputation too."""
    from torch.utils.checkpoint import checkpoint

    blocks = model.blocks if isinstance(model, GPT) else [*model.encoder, *model.decoder]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes on the meta device: shapes only, nothing allocated.

    NOTE: the models initialise their weights as they are built, and `normal_` on a meta
    tensor goes through PyTorch's Python reference implementations, whose first use imports
    them: 2.5 s added to every command that loads a model (measured here). A meta tensor has
    no values to initialise, so normal_ is skipped for meta tensors while building."""
    original = nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    nn.init.normal_ = normal_
    try:
        with torch.device("meta"):
            return build_model(cfg)
    finally:
        nn.init.normal_ = original


def training_flops_per_token(cfg: ModelConfig, seq_len: int, parameters: int | None = None
                             ) -> int:
    """FLOPs of one trained token of a gpt (forward and backward), PaLM's estimate (its
    appendix B): 6 per parameter (the embedding counted as the tied head's matmul) plus 12 per
    layer, head dimension and position for attention's scores and weighted sums, without
    causal masking's halving. A forward alone is a third of it."""
    if parameters is None:
        parameters = count_parameters(cfg)
    return 6 * parameters + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, tied weights once, built on the meta device
    (no memory is allocated, so 198B counts as fast as 100M)."""
    model = build_on_meta(cfg)
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(unique.values())
