"""CPM-1: a GPT-2-style decoder-only transformer.

Learned absolute positions, pre-LayerNorm blocks, fused QKV with bias, causal attention,
an MLP d -> d_ff -> d with tanh-GELU, a final LayerNorm and an output head tied to the word
embedding. Parameter names follow GPT-2 (wte, wpe, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f) so a CPM-Generate checkpoint maps across name for name; GPT-2's
Conv1D weights are the transpose of these Linear weights.

Sizes (docs/design.md §5): small 12/768/12, medium 24/1024/16, large 32/2560/32 with d_head 80,
vocab 30,000: 109M, 334M, 2.6B parameters.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CpmError
from .config import ModelConfig
from .dropout import Dropout
from .layers import (
    GeluMLP,
    Linear,
    attention,
    init_normal,
    key_padding_mask,
    merge_heads,
    split_heads,
)
from .moe import MoeFFN, moe_aux_loss

if TYPE_CHECKING:
    from ..infer.cache import KVCache, LayerKV


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection (biases on)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        inner = cfg.n_heads * cfg.head_size
        self.c_attn = Linear(cfg.d_model, 3 * inner)
        self.c_proj = Linear(inner, cfg.d_model)  # output projection, scaled at init
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv: LayerKV | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.c_attn(x).chunk(3, dim=-1))
        dtype = q.dtype
        if kv is not None:
            k, v = kv.append(k, v)
            q = q.to(k.dtype)  # a cache may keep keys in higher precision (infer/cache.py)
        y = attention(q, k, v, mask=mask, causal=True,
                      dropout=self.dropout if self.training else 0.0)
        return self.c_proj(merge_heads(y.to(dtype)))


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) — or, with MoE, moe(x) (its own norm and
    residual)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg)
        if cfg.moe.experts > 0:
            self.moe = MoeFFN(cfg, lambda: GeluMLP(cfg.d_model, cfg.ffn_size),
                              lambda: nn.LayerNorm(cfg.d_model, eps=cfg.eps))
        else:
            self.moe = None
            self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
            self.mlp = GeluMLP(cfg.d_model, cfg.ffn_size)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), mask, kv))
        if self.moe is not None:
            return self.moe(x)
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """CPM-1. `forward(input_ids, attention_mask=None) -> logits [batch, seq, vocab]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, counted once
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; the projections that write into the residual stream
        (attention c_proj, MLP c_proj, experts included) N(0, init_std / sqrt(2 n_layers)), as
        GPT-2 does, so the residual's variance does not grow with depth."""
        init_normal(self, self.cfg.init_std)
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=out_std)
        for block in self.blocks:
            if block.moe is not None:
                nn.init.normal_(block.moe.centroids, mean=0.0, std=self.cfg.init_std)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                return_hidden: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [batch, seq] (or inputs_embeds [batch, seq, d_model], e.g. with a soft
        prompt in it); attention_mask [batch, seq], 1 = real token, for left-padded batches:
        positions then count real tokens only (cumsum(mask) - 1, clamped at 0), so a row reads
        as if it were unpadded. `return_hidden` gives the final hidden states instead of the
        logits, for a loss that applies the head itself (training's fused head + loss).

        With a `cache` (generation, cpmctl.infer), the input continues the `cache.length`
        tokens already cached, and attention_mask covers the cached and the new tokens
        [batch, cache.length + seq]; the new keys and values are written into the cache."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        seq = x.shape[1]
        past = 0 if cache is None else cache.length
        if seq > self.cfg.max_positions or (attention_mask is None
                                            and past + seq > self.cfg.max_positions):
            raise CpmError(f"input of {past + seq} tokens is longer than model.max_positions "
                           f"({self.cfg.max_positions})")
        if attention_mask is None:
            positions = torch.arange(past, past + seq, device=x.device)[None, :]
        else:
            positions = (attention_mask.long().cumsum(-1)[:, past:] - 1).clamp(min=0)
        x = self.drop(x + self.wpe(positions))
        mask = key_padding_mask(attention_mask)
        kvs = [None] * len(self.blocks) if cache is None else cache.layers
        for block, kv in zip(self.blocks, kvs, strict=True):
            x = block(x, mask, kv)
        if cache is not None:
            cache.length += seq
        hidden = self.ln_f(x)
        return hidden if return_hidden else self.lm_head(hidden)

    @property
    def aux_loss(self) -> torch.Tensor:
        """The weighted MoE balance loss of the last forward, to add to the LM loss (0 unless
        the router is 'topk')."""
        return moe_aux_loss(self, self.cfg.moe.aux_loss_weight)
