"""The optimizer: AdamW with weight decay on weight matrices only.

    optimizer = build_optimizer(model, recipe.train)

Which parameters decay (Megatron's and nanoGPT's practice, which CPM-1 and CPM-2 inherit): only
the weight matrices of `nn.Linear` layers (attention, FFN, experts, an untied LM head). No
decay for biases, norm scales (LayerNorm, RMSNorm), embeddings (word, position, relative
position bias) and other parameters such as the MoE router centroids: decay pulls those towards
0, which means something different for them (a norm scale of 0 kills its layer; a rare word's
embedding would shrink merely for being rare). A weight shared by an embedding and a Linear (GPT's
head, tied to the word embedding) counts as an embedding, and appears once. Frozen parameters
(requires_grad False) are left out of the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..recipe import TrainConfig

__all__ = ["build_optimizer", "decay_split", "parameter_groups"]


def decay_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]],
                                           list[tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters as (name, parameter), each tensor once
    (under its first name), in `named_parameters` order."""
    linear: set[int] = set()
    embedding: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.ndim >= 2:
            linear.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            embedding.add(id(module.weight))
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # removes duplicates (tied weights) itself
        if not p.requires_grad:
            continue
        if id(p) in linear and id(p) not in embedding:
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    return decay, no_decay


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: {"params", "weight_decay", "names"}, the decayed group
    first; an empty group is left out. The extra "names" key is kept by torch in
    `optimizer.param_groups` (and the state dict), which makes a checkpoint readable."""
    decay, no_decay = decay_split(model)
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd,
                           "names": [name for name, _ in members]})
    return groups


def _fused_ok(model: nn.Module) -> bool:
    """Fused AdamW (one kernel per step; on CPU since torch 2.4) needs every parameter floating
    point on a CPU or CUDA device; anything else (meta, mixed) takes the default path."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


def build_optimizer(model: nn.Module, train: TrainConfig, *,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, train.weight_decay)` with train.lr (the trainer
    overwrites each group's lr every step from the schedule), betas (beta1, beta2) and eps.

    `fused` None means fused wherever torch supports it (CPU and CUDA floating-point
    parameters): one multi-tensor kernel instead of a Python loop over parameters, same math;
    False gives torch's default (foreach on CUDA, the for-loop on CPU)."""
    use_fused = _fused_ok(model) if fused is None else fused
    groups = parameter_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
                  weight_decay=train.weight_decay)
    if use_fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            if fused:
                raise
    return torch.optim.AdamW(groups, **kwargs)
