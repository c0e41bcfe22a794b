"""A GPT's generation steps planned once: the prefill and every decoding step through the layers
with no module calls, the attention in one C call per layer (attention.py), the KV cache
in the activations' dtype.

Why: at batch 1 a decoding step's arithmetic is its weight bytes (~108 MB for CPM-Small in
int8, ~3 ms at this machine's bandwidth), but the module forward around it made ~1,000 operator
calls per token (views, splits, transposes, casts, cache slices, SDPA's own dispatch, module
__call__s), which cost nearly as much again. The plan resolves every layer once into direct
calls (`step_function` of each linear layer: the oneDNN-packed op, cpmctl's int8 op or
F.linear) and leaves 9 calls a layer:

    h = layer_norm(x); a = attend(qkv(h), cache); x = x + proj(a)
    h = layer_norm(x); x = x + down(gelu(up(h)))

Where every one of those matmuls runs on cpmctl's kernels (dense_matmul.c, int8_matmul.c), the
blocks go further: all of them in one C call a step (kernels/blocks.py), which takes the
1.6-2.4 ms those ~110 calls cost a CPM-Small token on a 2-core Zen 3 down to their arithmetic.

It computes what the module forward does, with the same layers in the same dtypes; the
attention differs in its fp32 summation order, and in the cache's dtype: bf16 for a bf16 or
int8 model, whose keys and values are bf16 to begin with (so exactly), fp32 for an fp32 one;
in C the norms' sums and GELU's exp differ in their last bits too. With cpmctl's matmul
kernels every operation of the plan computes each row on its own, so the text does not depend
on the batch size, to the bit.

`PlannedGpt.plan(model)` is None where the plan does not apply, and generation then runs the
module forward as before: a non-GPT or MoE model, a model off the CPU, an unknown layer type, or
no kernel library (attention.available()).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl.infer.cache import KVCache
from cpmctl.kernels import attention, blocks
from cpmctl.models.layers import rms_norm

Linear = Callable[[torch.Tensor], torch.Tensor]


def _step_function(module: nn.Module, in_features: int, out_features: int,
                   dtype: torch.dtype) -> Linear | None:
    """The layer as a direct call, if it is one of the kinds prepare_for_inference makes and has
    the expected shape (else None: no plan)."""
    if getattr(module, "in_features", None) != in_features or \
            getattr(module, "out_features", None) != out_features:
        return None
    if hasattr(module, "step_function"):  # PackedLinear, Int8Linear
        return module.step_function()
    if isinstance(module, nn.Linear) and module.weight.dtype == dtype:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return None


def _planned_dtype(model: nn.Module, arch: str) -> torch.dtype | None:
    """The activations' dtype (the word embedding's) where a plan for `arch` applies: a model of
    that architecture without experts, in eval mode, on the CPU, in a dtype the attention
    kernel takes, with the kernel library built; else None."""
    cfg = model.cfg
    if cfg.arch != arch or cfg.moe.experts > 0 or model.training:
        return None
    table = (model.wte if arch == "gpt" else model.shared).weight
    if table.device.type != "cpu" or table.dtype not in attention.DTYPES \
            or not attention.available():
        return None
    return table.dtype


class _Layer:
    """One block's norms and linear calls."""

    def __init__(self, block: nn.Module, qkv: Linear, proj: Linear, up: Linear, down: Linear):
        self.ln_1 = (block.ln_1.weight, block.ln_1.bias)
        self.ln_2 = (block.ln_2.weight, block.ln_2.bias)
        self.qkv, self.proj, self.up, self.down = qkv, proj, up, down


class PlannedGpt:
    """`forward(ids, cache, mask) -> logits of each row's last position`, continuing the cache."""

    def __init__(self, model: nn.Module, layers: list[_Layer], head: Linear):
        cfg = model.cfg
        self.wte, self.wpe = model.wte.weight, model.wpe.weight
        self.ln_f = (model.ln_f.weight, model.ln_f.bias)
        self.layers, self.head = layers, head
        # every block in one C call where all its matmuls run on cpmctl's kernels
        self.in_c = blocks.GptLayers.make(model, self.wte.dtype)
        self.shape, self.eps = (cfg.d_model,), cfg.eps
        self.max_positions = cfg.max_positions

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the activations, keys and values (see the module docstring)."""
        return self.wte.dtype

    @classmethod
    def plan(cls, model: nn.Module) -> PlannedGpt | None:
        dtype = _planned_dtype(model, "gpt")
        if dtype is None:
            return None
        cfg = model.cfg
        d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.ffn_size
        layers = []
        for block in model.blocks:
            calls = [_step_function(block.attn.c_attn, d, 3 * inner, dtype),
                     _step_function(block.attn.c_proj, inner, d, dtype),
                     _step_function(block.mlp.c_fc, d, ff, dtype),
                     _step_function(block.mlp.c_proj, ff, d, dtype)]
            if any(call is None for call in calls):
                return None
            layers.append(_Layer(block, *calls))
        head = _step_function(model.lm_head, d, cfg.vocab_size, dtype)
        return None if head is None else cls(model, layers, head)

    def forward(self, ids: torch.Tensor | None, cache: KVCache, mask: torch.Tensor | None = None,
                *, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """ids [batch, new] (or embeds [batch, new, d_model]) -> logits [batch, vocab] of each
        row's last new position. `mask` [batch, >= cache.length + new] (1 = a real token), when
        a row is padded or has finished: positions then count real tokens only, as in the
        module forward. Writes the new keys and values and advances the cache."""
        x = F.embedding(ids, self.wte) if embeds is None else embeds.to(self.wte.dtype)
        batch, new, _ = x.shape
        length = cache.length
        # with a mask, positions count real tokens only (the cache also holds the padding)
        last_position = length + new if mask is None else new
        if batch != cache.keys.shape[1] or length + new > cache.max_len or \
                last_position > self.max_positions:
            raise ValueError(f"planned step: {batch} x {new} new tokens after {length} do not "
                             f"fit a cache of {cache.keys.shape[1]} x {cache.max_len} or the "
                             f"model's {self.max_positions} positions")
        if mask is None:
            x = x + self.wpe[length:length + new]
        else:
            positions = (mask[:, :length + new].cumsum(-1)[:, length:] - 1).clamp_(min=0)
            x = x + F.embedding(positions, self.wpe)
        if self.in_c is not None:  # x is this call's own tensor (the sum above): in place
            self.in_c.run(x, cache, mask)
        else:
            x = self._layers_one_by_one(x, cache, mask)
        cache.length = length + new
        return self.head(F.layer_norm(x[:, -1].contiguous(), self.shape, *self.ln_f, self.eps))

    def _layers_one_by_one(self, x: torch.Tensor, cache: KVCache, mask: torch.Tensor | None
                           ) -> torch.Tensor:
        shape, eps, attend, length = self.shape, self.eps, attention.attend, cache.length
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            h = F.layer_norm(x, shape, *layer.ln_1, eps)
            x = x + layer.proj(attend(layer.qkv(h), kv.keys, kv.values, length, mask))
            h = F.layer_norm(x, shape, *layer.ln_2, eps)
            x = x + layer.down(F.gelu(layer.up(h), approximate="tanh"))
        return x


class _DecoderLayer:
    """One decoder block's norm weights and linear calls (self-attention q, k, v, o; the
    cross-attention's q and o; the gated FFN's wi_0, wi_1, wo)."""

    def __init__(self, block: nn.Module, calls: list[Linear]):
        self.norms = (block.ln_1.weight, block.ln_2.weight, block.ln_3.weight)
        (self.q, self.k, self.v, self.o, self.cross_q, self.cross_o,
         self.wi_0, self.wi_1, self.wo) = calls


class PlannedEncDec:
    """`forward(ids, cache, encoder_out, encoder_mask) -> logits of each row's last position`:
    decoder steps continuing the cache, over an encoder output computed once."""

    def __init__(self, model: nn.Module, layers: list[_DecoderLayer], head: Linear):
        self.embed, self.final = model.shared.weight, model.decoder_norm.weight
        self.eps = model.cfg.eps
        self.relative_bias = model.decoder[0].self_attn.relative_bias
        self.cross_keys_values = [block.cross_attn.keys_values for block in model.decoder]
        self.layers, self.head = layers, head
        # every decoder block in one C call where all its matmuls run on cpmctl's kernels
        self.in_c = blocks.DecoderLayers.make(model, self.embed.dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def plan(cls, model: nn.Module) -> PlannedEncDec | None:
        dtype = _planned_dtype(model, "encdec")
        if dtype is None:
            return None
        cfg = model.cfg
        d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.ffn_size
        shapes = [(d, inner)] * 3 + [(inner, d), (d, inner), (inner, d), (d, ff), (d, ff),
                                     (ff, d)]
        layers = []
        for block in model.decoder:
            modules = [block.self_attn.q, block.self_attn.k, block.self_attn.v, block.self_attn.o,
                       block.cross_attn.q, block.cross_attn.o, block.ffn.wi_0, block.ffn.wi_1,
                       block.ffn.wo]
            calls = [_step_function(m, n_in, n_out, dtype)
                     for m, (n_in, n_out) in zip(modules, shapes, strict=True)]
            if any(call is None for call in calls):
                return None
            layers.append(_DecoderLayer(block, calls))
        head = _step_function(model.lm_head, d, cfg.vocab_size, dtype)
        return None if head is None else cls(model, layers, head)

    def forward(self, ids: torch.Tensor, cache: KVCache, encoder_out: torch.Tensor,
                encoder_mask: torch.Tensor | None) -> torch.Tensor:
        """ids [batch, new] -> logits [batch, vocab] of each row's last new position, the
        decoder's rows all at the same position (generation's decoder has no padding);
        `encoder_mask` [batch, source] (1 = a real token) or None. The first call computes the
        cross-attention keys and values into `cache.cross`."""
        batch, new = ids.shape
        length = cache.length
        if batch != cache.keys.shape[1] or length + new > cache.max_len:
            raise ValueError(f"planned step: {batch} x {new} new tokens after {length} do not "
                             f"fit a cache of {cache.keys.shape[1]} x {cache.max_len}")
        if cache.cross is None:
            cache.cross = [tuple(t.to(cache.dtype).contiguous()
                                 for t in keys_values(encoder_out))
                           for keys_values in self.cross_keys_values]
        source = encoder_out.shape[1]
        # [heads, new, length + new], the same for every layer (layer 0 owns it, as in T5)
        bias = self.relative_bias(new, length + new, offset=length)[0].float().contiguous()
        x = F.embedding(ids, self.embed)  # this call's own tensor: the C step works in place
        if self.in_c is not None:
            self.in_c.run(x, cache, bias, encoder_mask)
        else:
            x = self._layers_one_by_one(x, cache, bias, encoder_mask, source)
        cache.length = length + new
        return self.head(rms_norm(x[:, -1].contiguous(), self.final, self.eps))

    def _layers_one_by_one(self, x: torch.Tensor, cache: KVCache, bias: torch.Tensor,
                           encoder_mask: torch.Tensor | None, source: int) -> torch.Tensor:
        eps, length = self.eps, cache.length
        for layer, kv, (keys, values) in zip(self.layers, cache.layers, cache.cross,
                                             strict=True):
            h = rms_norm(x, layer.norms[0], eps)
            qkv = torch.cat((layer.q(h), layer.k(h), layer.v(h)), dim=-1)
            x = x + layer.o(attention.attend(qkv, kv.keys, kv.values, length, None, scale=1.0,
                                             bias=bias))
            h = rms_norm(x, layer.norms[1], eps)
            x = x + layer.cross_o(attention.attend_cross(layer.cross_q(h), keys, values, source,
                                                         encoder_mask, scale=1.0))
            h = rms_norm(x, layer.norms[2], eps)
            x = x + layer.wo(F.gelu(layer.wi_0(h), approximate="tanh") * layer.wi_1(h))
        return x
