"""A GPT's blocks for one generation step in one C call (gpt_step.c, in the kernel library:
library.py): the norms, the four matmuls, the attention, GELU and the residual sums of every
layer, with no Python between them.

Why: at batch 1 a CPM-Small decoding step is ~50 matmuls and ~75 small operations. Called one
by one from Python (planned.py's loop) each costs its call: ~5-15 us for a kernel's wrapper and
the tensor it allocates, 2-15 us for a layer norm, a sum or GELU through PyTorch, ~20 us of fixed
cost for the attention's checks and call: 1.6-2.4 ms of a 7-16 ms step on a 2-core Zen 3,
beside the weights' streaming that the step is for. In C the same operations cost their
arithmetic.

It applies where every matmul of the blocks runs on one of cpmctl's kernels (`Linear` from
`c_linear()` of infer/packed.py's PackedLinear and infer/quantize.py's Int8Linear) and the
norms, activations and cache share one dtype; `GptLayers.make` is None otherwise, and
planned.py calls the layers one by one.

C trusts its pointers: the layers' tensors are checked when the step is made (shapes, dtypes,
contiguity), and each call's activations, cache and mask before the call.
"""

from __future__ import annotations

import ctypes

import torch

from cpmctl.kernels import attention, library

DENSE, INT8 = 0, 1


class Linear(ctypes.Structure):
    """gpt_step.c's cpmctl_linear: one linear layer's kernel and tensors (`tensors` keeps them
    alive while C holds their addresses)."""

    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("kp", ctypes.c_int), ("weights", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]

    @classmethod
    def of(cls, kind: int, out_features: int, in_features: int, padded_in: int,
           weights: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None,
           dtype: torch.dtype) -> Linear:
        """A layer whose tensors its kernel's check_layer has accepted; `dtype` is the one its
        inputs and outputs have (bf16 for int8)."""
        layer = cls(kind, out_features, in_features, padded_in, weights.data_ptr(),
                    None if scales is None else scales.data_ptr(),
                    None if bias is None else bias.data_ptr())
        layer.tensors, layer.dtype = (weights, scales, bias), dtype
        return layer


class _Layer(ctypes.Structure):
    """gpt_step.c's cpmctl_gpt_layer."""

    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("qkv", Linear), ("proj", Linear), ("up", Linear), ("down", Linear)]


def _norm_tensors(block, d_model: int, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """ln_1's and ln_2's weights and biases, where each is a contiguous [d_model] tensor of
    `dtype` on the CPU."""
    tensors = [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
    if any(t is None or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()
           or t.shape != (d_model,) for t in tensors):
        return None
    return [t.detach() for t in tensors]


class GptLayers:
    """`run(x, cache, mask)`: every block of the model over x [batch, new, d_model] in place,
    writing the new keys and values into the cache at `cache.length` (not advancing it)."""

    def __init__(self, layers: ctypes.Array, keep: list, cfg, dtype: torch.dtype):
        self.layers, self.keep, self.dtype = layers, keep, dtype
        self.address = ctypes.addressof(layers)
        self.n_layers, self.heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.head_size
        self.d_model, self.ffn, self.eps = cfg.d_model, cfg.ffn_size, cfg.eps

    @classmethod
    def make(cls, model, dtype: torch.dtype) -> GptLayers | None:
        """The step for a GPT whose activations are `dtype`, or None where some layer does
        not run on cpmctl's kernels in that dtype (see the module docstring)."""
        if library.load() is None:
            return None
        cfg = model.cfg
        d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.ffn_size
        shapes = ((3 * inner, d), (d, inner), (ff, d), (d, ff))
        structs, keep = [], []
        for block in model.blocks:
            norms = _norm_tensors(block, d, dtype)
            linears = [getattr(m, "c_linear", lambda: None)() for m in
                       (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
            if norms is None or any(
                    lin is None or lin.dtype != dtype or (lin.n, lin.k) != shape
                    for lin, shape in zip(linears, shapes, strict=True)):
                return None
            structs.append(_Layer(*(t.data_ptr() for t in norms), *linears))
            keep.append((norms, linears))
        return cls((_Layer * len(structs))(*structs), keep, cfg, dtype)

    def run(self, x: torch.Tensor, cache, mask: torch.Tensor | None) -> None:
        if x.dtype != self.dtype or x.dim() != 3 or x.shape[2] != self.d_model or \
                not x.is_contiguous() or x.device.type != "cpu" or cache.dtype != self.dtype or \
                tuple(cache.keys.shape[:1]) != (self.n_layers,):
            raise ValueError(f"GPT step: activations {x.dtype} {tuple(x.shape)} and a cache of "
                             f"{cache.dtype} {tuple(cache.keys.shape)} for {self.n_layers} "
                             f"layers of {self.d_model} in {self.dtype}")
        batch, new, _ = x.shape
        qkv = torch.empty(batch, new, 3 * self.heads * self.d_head, dtype=self.dtype)
        # every layer's cache is a slice of one tensor: the first one's check holds for all
        attention.check(qkv, cache.layers[0].keys, cache.layers[0].values, cache.length, mask)
        if not (cache.keys.is_contiguous() and cache.values.is_contiguous()):
            raise ValueError("GPT step: the cache's keys and values must be contiguous")
        status = library.load().cpmctl_gpt_layers(
            x.data_ptr(), self.dtype == torch.bfloat16, batch, new, self.d_model, self.heads,
            self.d_head, self.ffn, self.address, self.n_layers, self.eps, cache.keys.data_ptr(),
            cache.values.data_ptr(), cache.max_len, cache.length,
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
            qkv.data_ptr(), torch.get_num_threads())
        if status == -1:
            raise MemoryError(f"GPT step: no memory for {batch} x {new} tokens' activations")
        if status != 0:
            raise ValueError(f"GPT step: the kernel library has no {self.dtype} matmul")
