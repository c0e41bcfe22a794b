"""What the GPT (CPM-1) and encoder-decoder (CPM-2) models share: the linear layer, RMSNorm, the
attention call, the two feed-forward networks, and the init helpers.

Shapes: activations are [batch, seq, d_model]; attention works on [batch, heads, seq, d_head].
An attention mask here is boolean, True where a query may look at a key, and broadcastable to
[batch, heads, q_len, k_len].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dense
from .dropout import Dropout, dropout


class Linear(nn.Linear):
    """nn.Linear (the same parameters, state dict and init) whose product runs through cpmctl's
    fp32 CPU kernel where that pays: kernels/dense.py's `linear`, ~2x PyTorch's fp32 matmul on
    CPUs where MKL is slow (AMD), the same speed where it is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (T5's LayerNorm): scale only, no mean, no bias.

    NOTE: the mean square is taken in fp32 whatever the input dtype (bf16 has too few mantissa
    bits for a sum over thousands of squares); the result goes back to the input dtype.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic (the module's forward; generation's planned steps call it direct).

    Where the weight's dtype is the input's, PyTorch's fused `F.rms_norm` does the same fp32
    arithmetic (equal to the bit on CPU) in one call instead of five: ~1.5-2x less time per norm
    in a decoding step. A weight of another dtype takes the composed form below (the fused
    kernel would refuse it and fall back to arithmetic in the input's dtype)."""
    if weight.dtype == x.dtype:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(x.dtype)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, seq, heads * d_head] -> [batch, heads, seq, d_head]."""
    b, s, _ = x.shape
    return x.view(b, s, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, d_head] -> [batch, seq, heads * d_head]."""
    b, _, s, _ = x.shape
    return x.transpose(1, 2).reshape(b, s, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None,
              dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention through `F.scaled_dot_product_attention`.

    `mask` (bool, True = attend) and `bias` (float, added to the scores, e.g. T5's relative
    position bias) are folded into one additive mask. `scale` None is 1/sqrt(d_head); T5 passes
    1.0. With neither mask nor bias, `causal` uses SDPA's own causal path (no mask tensor).

    With cached keys (decoding), the queries are the last q_len of k_len positions: causal
    masking is aligned bottom-right, and a single query (one decoding step) sees every key.

    NOTE: masked scores are set to the dtype's most negative finite value rather than -inf, so
    a query with nothing to attend to (a left-padding position) gets a finite, meaningless
    output instead of NaN, which would otherwise leak into gradients.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    causal = causal and q_len > 1
    own_dropout = dropout > 0.0 and q.device.type != "cuda"  # see _attention_with_dropout
    # NOTE: SDPA's is_causal aligns top-left, right only when the queries are all the keys
    if (mask is None and bias is None and (not causal or q_len == k_len)
            and not own_dropout):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                              scale=scale)
    if causal:
        tril = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        mask = tril if mask is None else mask & tril
    if own_dropout:
        return _attention_with_dropout(q, k, v, mask, bias, scale, dropout)
    scores = (bias.to(q.dtype) if bias is not None
              else torch.zeros((), dtype=q.dtype, device=q.device))
    if mask is not None:
        scores = torch.where(mask, scores, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=scores, dropout_p=dropout,
                                          scale=scale)


def _attention_with_dropout(q, k, v, mask: torch.Tensor | None, bias: torch.Tensor | None,
                            scale: float | None, p: float) -> torch.Tensor:
    """Attention whose probabilities go through cpmctl's dropout (models/dropout.py).

    NOTE: with dropout, SDPA on the CPU takes its unfused math path anyway (its flash kernel
    has no dropout) and draws an fp32 mask [batch, heads, q, k]; this is the same math with a
    one-byte mask. The scores stay in the matmul's dtype: softmax accumulates in fp32 for
    bf16 inputs anyway, and casting [batch, heads, q, k] there and back cost 7% of a bf16
    CPM-Small training step."""
    scores = torch.matmul(q * (scale if scale is not None else q.shape[-1] ** -0.5),
                          k.transpose(-2, -1))
    if bias is not None:
        scores = scores.add_(bias)
    if mask is not None:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(dropout(probs, p, training=True), v)


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [batch, seq] padding mask (1 = real token) -> bool [batch, 1, 1, seq] over the keys."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class GeluMLP(nn.Module):
    """GPT's MLP: d_model -> d_ff -> d_model with tanh-approximated GELU, biases on.

    No dropout inside (GPT-2 has none there); the block drops the output on the residual.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.c_fc = Linear(d_model, d_ff)
        self.c_proj = Linear(d_ff, d_model)  # the "down" projection, scaled at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GatedGeluFFN(nn.Module):
    """T5 v1.1's FFN: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases ("gated-gelu" / "gelu_new").

    Dropout on the hidden activations as in T5; the block drops the output on the residual.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.wi_0 = Linear(d_model, d_ff, bias=False)
        self.wi_1 = Linear(d_model, d_ff, bias=False)
        self.wo = Linear(d_ff, d_model, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(self.dropout(h))


def init_normal(module: nn.Module, std: float) -> None:
    """N(0, std) for every Linear and Embedding weight, zero biases; norms keep ones/zeros."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
