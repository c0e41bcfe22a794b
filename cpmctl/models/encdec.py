"""CPM-2: a T5 v1.1-style encoder-decoder.

RMSNorm (fp32) before every sublayer, no biases anywhere, attention without the 1/sqrt(d_head)
scaling (scale=1.0; the relative position bias is added to raw scores), gated-GELU FFNs
(wi_0, wi_1, wo), a relative position bias held by layer 0 of each stack and reused by the
others (bidirectional buckets in the encoder, causal in the decoder, none in cross-attention),
one input embedding shared by encoder and decoder, and a separate, untied LM head applied to
the decoder output as is (T5 v1.1 with untied embeddings does not rescale by d_model^-0.5).

CPM-2 (docs/design.md §5): 24+24 layers, d_model 4096, d_ff 10240, 64 heads x 64, vocab 26,240:
11B parameters; with 32 experts per FFN (moe.py), 198B.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dropout import Dropout
from .layers import (
    GatedGeluFFN,
    Linear,
    RMSNorm,
    attention,
    init_normal,
    key_padding_mask,
    merge_heads,
    split_heads,
)
from .moe import MoeFFN, moe_aux_loss

if TYPE_CHECKING:
    from ..infer.cache import KVCache, LayerKV


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of (key position - query position).

    Bidirectional: half the buckets for keys after the query, half for keys before. Within a
    half, distances below half of its buckets get a bucket each; longer ones share log-spaced
    buckets up to max_distance, beyond which all fall into the last bucket. Causal (decoder):
    keys after the query all map to bucket 0 (the causal mask hides them anyway).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp: log(0) would be -inf; those distances take the exact branch below anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(
        max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))
        self.bidirectional = bidirectional
        self.max_distance = cfg.relative_max_distance

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """-> [1, heads, q_len, k_len]; `offset` is the position of the first query (for
        decoding with cached keys)."""
        device = self.weight.device
        query = torch.arange(q_len, device=device)[:, None] + offset
        key = torch.arange(k_len, device=device)[None, :]
        bucket = relative_position_bucket(key - query, self.bidirectional,
                                          self.weight.shape[0], self.max_distance)
        return F.embedding(bucket, self.weight).permute(2, 0, 1)[None]


class Attention(nn.Module):
    """Self- or cross-attention, no biases, unscaled scores; layer 0 of a stack owns the
    relative position bias (`relative_bias`), which the stack computes once and hands to all."""

    def __init__(self, cfg: ModelConfig, relative_bias: bool = False,
                 bidirectional: bool = True):
        super().__init__()
        self.n_heads = cfg.n_heads
        inner = cfg.n_heads * cfg.head_size
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        self.relative_bias = RelativePositionBias(cfg, bidirectional) if relative_bias else None
        self.dropout = cfg.dropout

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `source` [batch, seq, d_model], split into heads."""
        return (split_heads(self.k(source), self.n_heads),
                split_heads(self.v(source), self.n_heads))

    def forward(self, x: torch.Tensor,
                kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None, *,
                mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                causal: bool = False, cache: LayerKV | None = None) -> torch.Tensor:
        """`kv`: what the keys and values come from (x itself when None), or those keys and
        values already computed (`keys_values`: cross-attention while decoding). `cache`:
        self-attention while decoding, the new keys and values are appended to it."""
        q = split_heads(self.q(x), self.n_heads)
        dtype = q.dtype
        if isinstance(kv, tuple):
            k, v = kv
        else:
            k, v = self.keys_values(x if kv is None else kv)
            if cache is not None:
                k, v = cache.append(k, v)
        q = q.to(k.dtype)  # a cache may keep keys in higher precision (infer/cache.py)
        y = attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=1.0,
                      dropout=self.dropout if self.training else 0.0)
        return self.o(merge_heads(y.to(dtype)))


def make_ffn(cfg: ModelConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """(norm, ffn) for a dense block, or (None, MoeFFN) when the model has experts (the MoE
    layer carries its own RMSNorm and residual)."""
    if cfg.moe.experts > 0:
        return None, MoeFFN(cfg, lambda: GatedGeluFFN(cfg.d_model, cfg.ffn_size, cfg.dropout))
    return RMSNorm(cfg.d_model, cfg.eps), GatedGeluFFN(cfg.d_model, cfg.ffn_size, cfg.dropout)


class EncoderBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)) (or moe(x))."""

    def __init__(self, cfg: ModelConfig, first: bool):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, relative_bias=first, bidirectional=True)
        norm, ffn = make_ffn(cfg)
        if norm is None:
            self.moe = ffn
        else:
            self.moe, self.ln_2, self.ffn = None, norm, ffn
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x), mask=mask, bias=bias))
        if self.moe is not None:
            return self.moe(x)
        return x + self.dropout(self.ffn(self.ln_2(x)))


class DecoderBlock(nn.Module):
    """x + causal self-attn, x + cross-attn over the encoder output, x + ffn (or moe(x))."""

    def __init__(self, cfg: ModelConfig, first: bool):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.eps)
        self.self_attn = Attention(cfg, relative_bias=first, bidirectional=False)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.eps)
        self.cross_attn = Attention(cfg)
        norm, ffn = make_ffn(cfg)
        if norm is None:
            self.moe = ffn
        else:
            self.moe, self.ln_3, self.ffn = None, norm, ffn
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor,
                encoder_out: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                bias: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, kv: LayerKV | None = None) -> torch.Tensor:
        """`encoder_out`: the encoder output, or its cross-attention keys and values (cached
        decoding); `kv`: this block's self-attention cache."""
        x = x + self.dropout(self.self_attn(self.ln_1(x), mask=self_mask, bias=bias,
                                            causal=True, cache=kv))
        x = x + self.dropout(self.cross_attn(self.ln_2(x), encoder_out, mask=cross_mask))
        if self.moe is not None:
            return self.moe(x)
        return x + self.dropout(self.ffn(self.ln_3(x)))


class EncDec(nn.Module):
    """CPM-2. `forward(input_ids, decoder_input_ids, attention_mask=None,
    decoder_attention_mask=None) -> logits [batch, target_seq, vocab]`; `encode` once and
    `decode` many times for generation. Masks are [batch, seq], 1 = real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # encoder and decoder input
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg, i == 0) for i in range(cfg.n_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.decoder = nn.ModuleList(
            DecoderBlock(cfg, i == 0) for i in range(cfg.decoder_layers))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere, except the queries: N(0, init_std / sqrt(d_head)).

        NOTE: with no 1/sqrt(d_head) in the attention, Mesh TensorFlow's T5 folds that factor
        into the query initialisation instead (HF's T5 init has the same q:k ratio); without it
        the initial attention is nearly one-hot at d_head 64.
        """
        std = self.cfg.init_std
        init_normal(self, std)
        for name, p in self.named_parameters():
            if name.endswith(".q.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(self.cfg.head_size))
            elif name.endswith(("relative_bias.weight", "centroids")):
                nn.init.normal_(p, mean=0.0, std=std)

    def encode(self, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, *,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """-> the encoder output [batch, seq, d_model] (after its final norm)."""
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.drop(x)
        seq = x.shape[1]
        bias = self.encoder[0].attn.relative_bias(seq, seq)
        mask = key_padding_mask(attention_mask)
        for block in self.encoder:
            x = block(x, bias, mask)
        return self.drop(self.encoder_norm(x))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None, *,
               cache: KVCache | None = None) -> torch.Tensor:
        """-> logits [batch, target_seq, vocab]; attention_mask is the encoder's padding.

        With a `cache` (generation, cpmctl.infer), the decoder input continues the
        `cache.length` tokens already cached; decoder_attention_mask, if any, covers the cached
        and the new tokens. The cross-attention keys and values are computed from encoder_out
        on the first call and reused from the cache after."""
        y = self.drop(self.shared(decoder_input_ids))
        seq = y.shape[1]
        past = 0 if cache is None else cache.length
        bias = self.decoder[0].self_attn.relative_bias(seq, past + seq, offset=past)
        self_mask = key_padding_mask(decoder_attention_mask)
        cross_mask = key_padding_mask(attention_mask)
        if cache is None:
            sources, kvs = [encoder_out] * len(self.decoder), [None] * len(self.decoder)
        else:
            if cache.cross is None:
                cache.cross = [tuple(t.to(cache.dtype) for t in
                                     block.cross_attn.keys_values(encoder_out))
                               for block in self.decoder]
            sources, kvs = cache.cross, cache.layers
        for block, source, kv in zip(self.decoder, sources, kvs, strict=True):
            y = block(y, source, bias, self_mask, cross_mask, kv)
        if cache is not None:
            cache.length += seq
        return self.lm_head(self.drop(self.decoder_norm(y)))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_out, attention_mask,
                           decoder_attention_mask)

    @property
    def aux_loss(self) -> torch.Tensor:
        """The weighted MoE balance loss of the last forward, to add to the LM loss (0 unless
        the router is 'topk')."""
        return moe_aux_loss(self, self.cfg.moe.aux_loss_weight)
