"""The models: GPT (CPM-1, gpt.py), encoder-decoder (CPM-2, encdec.py), MoE FFNs (moe.py).

    model = build_model(cfg)          # cfg: ModelConfig, the recipe's [model] section
    n = count_parameters(cfg)         # on the meta device: no memory, no time
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import CpmError
from .config import ARCHS, ROUTERS, ModelConfig, MoeConfig
from .encdec import EncDec
from .gpt import GPT
from .moe import MoeFFN

__all__ = ["ARCHS", "ROUTERS", "EncDec", "GPT", "ModelConfig", "MoeConfig", "MoeFFN",
           "build_model", "checkpoint_activations", "count_parameters", "validate_config"]


def validate_config(cfg: ModelConfig) -> None:
    """Raise CpmError naming the `model.*` key of the first bad value."""

    def bad(key: str, why: str) -> CpmError:
        return CpmError(f"model.{key}: {why}")

    if cfg.arch not in ARCHS:
        raise bad("arch", f"unknown architecture {cfg.arch!r}; expected one of "
                          f"{', '.join(ARCHS)}")
    for key in ("vocab_size", "d_model", "n_heads", "n_layers"):
        if getattr(cfg, key) <= 0:
            raise bad(key, f"must be positive, got {getattr(cfg, key)}")
    for key in ("d_head", "d_ff", "n_decoder_layers"):
        if getattr(cfg, key) < 0:
            raise bad(key, f"must be 0 (the default) or positive, got {getattr(cfg, key)}")
    if cfg.d_head == 0 and cfg.d_model % cfg.n_heads:
        raise bad("d_head", f"model.d_model ({cfg.d_model}) is not divisible by model.n_heads "
                            f"({cfg.n_heads}); set model.d_head or change model.n_heads")
    if cfg.arch == "gpt" and cfg.max_positions <= 0:
        raise bad("max_positions", f"must be positive, got {cfg.max_positions}")
    if cfg.arch == "encdec":
        if cfg.relative_buckets < 4:
            raise bad("relative_buckets", f"must be at least 4, got {cfg.relative_buckets}")
        if cfg.relative_max_distance <= cfg.relative_buckets // 2:
            raise bad("relative_max_distance",
                      f"must exceed model.relative_buckets / 2 ({cfg.relative_buckets // 2}), "
                      f"got {cfg.relative_max_distance}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise bad("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if cfg.layer_norm_eps < 0:
        raise bad("layer_norm_eps", f"must be 0 (the default) or positive, got "
                                    f"{cfg.layer_norm_eps}")
    if cfg.init_std <= 0:
        raise bad("init_std", f"must be positive, got {cfg.init_std}")

    moe = cfg.moe
    if moe.experts < 0:
        raise bad("moe.experts", f"must be 0 (dense) or positive, got {moe.experts}")
    if moe.router not in ROUTERS:
        raise bad("moe.router", f"unknown router {moe.router!r}; expected one of "
                                f"{', '.join(ROUTERS)}")
    if moe.top_k < 1 or (moe.experts and moe.top_k > moe.experts):
        raise bad("moe.top_k", f"must be between 1 and model.moe.experts ({moe.experts}), "
                               f"got {moe.top_k}")
    if moe.capacity_factor <= 0:
        raise bad("moe.capacity_factor", f"must be positive, got {moe.capacity_factor}")
    if moe.aux_loss_weight < 0:
        raise bad("moe.aux_loss_weight", f"must be >= 0, got {moe.aux_loss_weight}")


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


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes, tied weights once, built on the meta device
    (no memory is allocated, so 198B counts as fast as 100M)."""
    with torch.device("meta"):
        model = build_model(cfg)
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(unique.values())
