"""The key/value cache for decoding: allocated once, written in place.

Decoding one token at a time recomputes nothing: each attention layer appends the new token's
keys and values to the cache and attends over the filled prefix. The cache holds
[layers, batch, heads, max_len, d_head] for keys and for values, allocated once for the whole
generation, so a decoding step writes into it (`copy_` into a slice) instead of growing it
with `torch.cat`, which would copy the whole cache at every step.

    cache = KVCache.for_model(model.cfg, batch=2, max_len=160, dtype=torch.bfloat16)
    model(prompt_ids, cache=cache)          # prefill: fills slots 0..len-1
    model(next_ids[:, None], cache=cache)   # one step: fills the next slot

The model advances `length` after a forward. An encoder-decoder's cross-attention keys and
values do not grow: they are computed from the encoder output on the first decoder call and
kept in `cross`.

The cache's dtype is the attention's: the models cast the queries to it and the attention
output back. NOTE: on the CPU, a GPT's generation runs through planned.py, whose C attention
reads a bf16 cache as fast as an fp32 one, and keeps a bf16 or int8 model's cache in bf16;
where it does not apply, the module forward keeps the cache in fp32 (generate.py): PyTorch's
CPU attention kernel is 4-5x slower in bf16 than in fp32 for one query over a cached prefix
(66 vs 14 us at 100 keys, 12 heads x 64, measured here).
"""

from __future__ import annotations

import torch

from cpmctl.models.config import ModelConfig
from cpmctl.resources import check_fits


class LayerKV:
    """One layer's slice of the cache; `append` writes the new keys/values after the filled
    prefix and returns the prefix including them."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache = cache
        self.keys = keys  # [batch, heads, max_len, d_head]
        self.values = values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, heads, new, d_head] -> keys, values [batch, heads, length + new, d_head]
        (views into the cache, no copy)."""
        start = self.cache.length
        end = start + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"the KV cache holds {self.keys.shape[2]} positions; "
                             f"{end} were asked for")
        self.keys[:, :, start:end].copy_(k)
        self.values[:, :, start:end].copy_(v)
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Self-attention keys and values of every layer for `batch` rows of up to `max_len`
    positions, plus (encoder-decoder) the cross-attention keys and values in `cross`."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, d_head: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_heads, max_len, d_head)
        elements = n_layers * batch * n_heads * max_len * d_head
        check_fits(2 * elements * dtype.itemsize, torch.device(device),
                   f"a KV cache of {batch} row(s) x {max_len:,} positions",
                   "generate fewer new tokens (--max-new-tokens) or fewer rows at once "
                   "(--batch-size)")
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [LayerKV(self, self.keys[i], self.values[i]) for i in range(n_layers)]
        self.length = 0  # positions filled so far, the same for every row
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, *,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
        """A cache shaped for the GPT's blocks or the encoder-decoder's decoder blocks."""
        layers = cfg.n_layers if cfg.arch == "gpt" else cfg.decoder_layers
        return cls(layers, batch, cfg.n_heads, max_len, cfg.head_size, dtype=dtype,
                   device=device)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype
