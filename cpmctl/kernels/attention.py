"""Generation's attention in C (attend.c): append new tokens' keys and values to the KV cache
and attend their queries over the cached prefix, causally, every row and head in one call; or
(an encoder-decoder's cross-attention) attend queries over an encoder's cached keys.

Why: a decoding step has one query per row. Through PyTorch that is a split of the fused QKV
output, two cache writes, a cast, `scaled_dot_product_attention` and a merge of the heads per
layer, ~25 operator calls whose fixed costs (not the arithmetic: 12 heads x 160 keys x 64 is
~250k multiply-adds) dominate; and PyTorch's CPU attention is several times slower over a bf16
cache than over an fp32 one, so the cache was kept in fp32, twice the bytes a bf16 model's keys
need. The kernel reads the QKV output as it is, writes the keys and values into the cache in its
dtype, and writes the attention output with the heads already merged: one call per layer, over
a bf16 cache (exact for a bf16 model, whose keys and values are bf16 to begin with).

It also runs the prefill (many new tokens per row), for a second reason: each query is computed
on its own over its visible keys in order, so a row's numbers do not depend on the batch it is
in or the padding before it, which SDPA's masked and unmasked paths do not promise; with
row-independent matmuls (cpmctl's int8 and dense kernels) the batch size cannot change the text.

It lives in cpmctl's kernel library (library.py, built on first use);
where that library is not available, `available()` is False and generation uses PyTorch.
`attend` checks every tensor against the others before the call: C trusts its pointers.
"""

from __future__ import annotations

import torch

from cpmctl.kernels import library

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return library.load() is not None


def check(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
          mask: torch.Tensor | None, *, cross: bool = False,
          bias: torch.Tensor | None = None) -> None:
    """ValueError unless the call reads and writes inside its tensors: qkv [batch, new, 3 *
    heads * d_head] (cross: the queries, [batch, new, heads * d_head]) and keys/values [batch,
    heads, max_len, d_head] contiguous CPU tensors of fp32 or bf16; length + new <= max_len
    (cross: 1 <= length <= max_len); mask (if any) int64 [batch, >= the keys read] with unit
    column stride; bias (if any) contiguous fp32 [heads, new, >= the keys read]."""
    problems = []
    tensors = [t for t in (qkv, keys, values, mask, bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        problems.append("every tensor must be on the CPU")
    new = qkv.shape[1] if qkv.dim() == 3 else 0
    seen = length if cross else length + new
    if keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
        problems.append(f"keys {tuple(keys.shape)} {keys.dtype} and values "
                        f"{tuple(values.shape)} {values.dtype} must be one 4-d shape and dtype")
    elif qkv.dim() != 3 or qkv.shape[0] != keys.shape[0] or \
            qkv.shape[2] != (1 if cross else 3) * keys.shape[1] * keys.shape[3]:
        problems.append(f"{'query tensor' if cross else 'qkv'} {tuple(qkv.shape)} does not "
                        f"match a cache of {tuple(keys.shape)}")
    elif cross and not (new >= 1 and 1 <= length <= keys.shape[2]):
        problems.append(f"{new} queries over {length} keys of a cache of {keys.shape[2]}")
    elif not cross and not (0 <= length and 1 <= new <= keys.shape[2] - length):
        problems.append(f"{new} new positions after {length} do not fit a cache of "
                        f"{keys.shape[2]}")
    if qkv.dtype not in DTYPES or keys.dtype not in DTYPES:
        problems.append(f"qkv {qkv.dtype} and the cache {keys.dtype} must be fp32 or bf16")
    if not (qkv.is_contiguous() and keys.is_contiguous() and values.is_contiguous()):
        problems.append("qkv, keys and values must be contiguous")
    if mask is not None and (mask.dtype != torch.int64 or mask.dim() != 2
                             or mask.shape[0] != qkv.shape[0]
                             or mask.shape[1] < seen or mask.stride(1) != 1):
        problems.append(f"mask {mask.dtype} {tuple(mask.shape)} must be int64 [batch, >= "
                        f"{seen}] with contiguous rows")
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 3
                             or not bias.is_contiguous() or keys.dim() != 4
                             or tuple(bias.shape[:2]) != (keys.shape[1], new)
                             or bias.shape[2] < seen):
        problems.append(f"bias {bias.dtype} {tuple(bias.shape)} must be contiguous fp32 "
                        f"[heads, {new}, >= {seen}]")
    if problems:
        raise ValueError("attention kernel: " + "; ".join(problems))


def _compute(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
             mask: torch.Tensor | None, cross: bool, scale: float,
             bias: torch.Tensor | None) -> torch.Tensor:
    batch, heads, max_len, d_head = keys.shape
    new = qkv.shape[1]
    out = torch.empty(batch, new, heads * d_head, dtype=qkv.dtype)
    status = library.load().cpmctl_attend(
        qkv.data_ptr(), qkv.dtype == torch.bfloat16, batch, new, heads, d_head,
        keys.data_ptr(), values.data_ptr(), keys.dtype == torch.bfloat16, max_len, length,
        None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
        out.data_ptr(), cross, scale, None if bias is None else bias.data_ptr(),
        0 if bias is None else bias.shape[2], torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"attention kernel: no memory for {length + new} scores")
    return out


OP = library.define_op(
    "attend(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, int length, Tensor? mask, "
    "bool cross, float scale, Tensor? bias) -> Tensor",
    _compute, lambda qkv, keys, values, length, mask, cross, scale, bias: qkv.new_empty(
        qkv.shape[0], qkv.shape[1], keys.shape[1] * keys.shape[3]))


def attend(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
           mask: torch.Tensor | None = None, *, scale: float | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention: qkv [batch, new, 3 * heads * d_head] -> the attention output [batch,
    new, heads * d_head] in qkv's dtype. The new tokens' keys and values are written into
    keys/values [batch, heads, max_len, d_head] at positions length .. length + new - 1, and
    token s's query attends positions 0 .. length + s where `mask` [batch, >= length + new]
    (1 = attend; None: all) allows. Scores are q.k times `scale` (None: 1/sqrt(d_head)) plus
    `bias` [heads, new, >= length + new] (fp32) where given."""
    check(qkv, keys, values, length, mask, bias=bias)
    return OP(qkv, keys, values, length, mask, False, scale or 0.0, bias)


def attend_cross(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                 mask: torch.Tensor | None = None, *, scale: float | None = None
                 ) -> torch.Tensor:
    """Cross-attention: queries [batch, new, heads * d_head] over the `length` keys and values
    already in keys/values [batch, heads, >= length, d_head] (an encoder's output), where
    `mask` [batch, >= length] allows; the output as `attend`'s."""
    check(queries, keys, values, length, mask, cross=True)
    return OP(queries, keys, values, length, mask, True, scale or 0.0, None)
