"""A model's blocks for one generation step in one C call (blocks.c, in the kernel library:
library.py): the norms, the matmuls, the attention, GELU and the residual sums of every layer,
with no Python between them. `GptLayers`: a GPT's blocks; `DecoderLayers`: an
encoder-decoder's decoder blocks (the encoder runs once per prompt, through its modules).

Why: at batch 1 a CPM-Small decoding step is ~50 matmuls and ~75 small operations. Called one
by one from Python (planned.py's loop) each costs its call: ~5-15 us for a kernel's wrapper and
the tensor it allocates, 2-15 us for a layer norm, a sum or GELU through PyTorch, ~20 us of fixed
cost for the attention's checks and call: 1.6-2.4 ms of a 7-16 ms step on a 2-core Zen 3,
beside the weights' streaming that the step is for. In C the same operations cost their
arithmetic.

It applies where every matmul of the blocks runs on one of cpmctl's kernels (`Linear` from
`c_linear()` of infer/packed.py's PackedLinear and infer/quantize.py's Int8Linear) and the
norms, activations and cache share one dtype; `make` is None otherwise, and planned.py calls
the layers one by one.

C trusts its pointers: the layers' tensors are checked when the step is made (shapes, dtypes,
contiguity), and each call's activations, caches, bias and masks before the call.
"""

from __future__ import annotations

import ctypes

import torch

from cpmctl.kernels import attention, library

DENSE, INT8 = 0, 1


class Linear(ctypes.Structure):
    """blocks.c's cpmctl_linear: one linear layer's kernel and tensors (`tensors` keeps them
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


class _GptLayer(ctypes.Structure):
    """blocks.c's cpmctl_gpt_layer."""

    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p),
                ("qkv", Linear), ("proj", Linear), ("up", Linear), ("down", Linear)]


class _DecoderLayer(ctypes.Structure):
    """blocks.c's cpmctl_decoder_layer."""

    _fields_ = [("norms", ctypes.c_void_p * 3),
                *((name, Linear) for name in ("q", "k", "v", "o", "cross_q", "cross_o", "wi_0",
                                              "wi_1", "wo"))]


def _vectors(tensors: list, width: int, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The norms' tensors, where each is a contiguous [width] CPU tensor of `dtype`."""
    if any(t is None or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()
           or t.shape != (width,) for t in tensors):
        return None
    return [t.detach() for t in tensors]


def _linears(modules: list, shapes: list[tuple[int, int]], dtype: torch.dtype
             ) -> list[Linear] | None:
    """Each module's Linear, where every one runs on cpmctl's kernels with (out, in) as in
    `shapes` and inputs of `dtype`."""
    linears = [getattr(m, "c_linear", lambda: None)() for m in modules]
    if any(lin is None or lin.dtype != dtype or (lin.n, lin.k) != shape
           for lin, shape in zip(linears, shapes, strict=True)):
        return None
    return linears


class _Blocks:
    """What both steps share: the layers as a C array, the shapes, and the per-call checks of
    the activations and the self-attention cache."""

    def __init__(self, structs: list, keep: list, cfg, n_layers: int, dtype: torch.dtype):
        self.layers = (type(structs[0]) * len(structs))(*structs)
        self.address = ctypes.addressof(self.layers)
        self.keep, self.dtype, self.n_layers = keep, dtype, n_layers
        self.heads, self.d_head = cfg.n_heads, cfg.head_size
        self.d_model, self.ffn, self.eps = cfg.d_model, cfg.ffn_size, cfg.eps

    def _scratch_qkv(self, x: torch.Tensor, cache, mask: torch.Tensor | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """ValueError unless x [batch, new, d_model] and the cache are this step's dtype and
        shape; the QKV scratch the C call writes, checked against the cache as attend checks
        it (every layer's cache is a slice of one tensor: the first one's check holds for
        all)."""
        if x.dtype != self.dtype or x.dim() != 3 or x.shape[2] != self.d_model or \
                not x.is_contiguous() or x.device.type != "cpu" or cache.dtype != self.dtype or \
                cache.keys.shape[0] != self.n_layers:
            raise ValueError(f"model step: activations {x.dtype} {tuple(x.shape)} and a cache "
                             f"of {cache.dtype} {tuple(cache.keys.shape)} for {self.n_layers} "
                             f"layers of {self.d_model} in {self.dtype}")
        if not (cache.keys.is_contiguous() and cache.values.is_contiguous()):
            raise ValueError("model step: the cache's keys and values must be contiguous")
        qkv = torch.empty(*x.shape[:2], 3 * self.heads * self.d_head, dtype=self.dtype)
        attention.check(qkv, cache.layers[0].keys, cache.layers[0].values, cache.length, mask,
                        bias=bias)
        return qkv

    def _raise_for(self, status: int, x: torch.Tensor) -> None:
        if status == -1:
            raise MemoryError(f"model step: no memory for {x.shape[0]} x {x.shape[1]} tokens' "
                              f"activations")
        if status != 0:
            raise ValueError(f"model step: the kernel library has no {self.dtype} matmul")


class GptLayers(_Blocks):
    """`run(x, cache, mask)`: every block of a GPT over x [batch, new, d_model] in place,
    writing the new keys and values into the cache at `cache.length` (not advancing it)."""

    @classmethod
    def make(cls, model, dtype: torch.dtype) -> GptLayers | None:
        """The step for a GPT whose activations are `dtype`, or None where some layer does
        not run on cpmctl's kernels in that dtype (see the module docstring)."""
        if library.load() is None:
            return None
        cfg = model.cfg
        d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.ffn_size
        structs, keep = [], []
        for block in model.blocks:
            norms = _vectors([block.ln_1.weight, block.ln_1.bias, block.ln_2.weight,
                              block.ln_2.bias], d, dtype)
            linears = _linears([block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                block.mlp.c_proj], [(3 * inner, d), (d, inner), (ff, d), (d, ff)],
                               dtype)
            if norms is None or linears is None:
                return None
            structs.append(_GptLayer(*(t.data_ptr() for t in norms), *linears))
            keep.append((norms, linears))
        return cls(structs, keep, cfg, cfg.n_layers, dtype) if structs else None

    def run(self, x: torch.Tensor, cache, mask: torch.Tensor | None) -> None:
        qkv = self._scratch_qkv(x, cache, mask)
        with library.profiled("cpmctl::gpt_layers"):
            status = library.load().cpmctl_gpt_layers(
                x.data_ptr(), self.dtype == torch.bfloat16, x.shape[0], x.shape[1],
                self.d_model, self.heads, self.d_head, self.ffn, self.address, self.n_layers,
                self.eps, cache.keys.data_ptr(), cache.values.data_ptr(), cache.max_len,
                cache.length, None if mask is None else mask.data_ptr(),
                0 if mask is None else mask.stride(0), qkv.data_ptr(), torch.get_num_threads())
        self._raise_for(status, x)


class DecoderLayers(_Blocks):
    """`run(x, cache, bias, encoder_mask)`: every decoder block of an encoder-decoder over x
    [batch, new, d_model] in place, writing the new keys and values into the cache at
    `cache.length` (not advancing it), attending over the encoder's keys and values in
    `cache.cross`; `bias` fp32 [heads, new, >= cache.length + new] (the relative position
    bias), `encoder_mask` int64 [batch, >= source] or None."""

    @classmethod
    def make(cls, model, dtype: torch.dtype) -> DecoderLayers | None:
        if library.load() is None:
            return None
        cfg = model.cfg
        d, inner, ff = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.ffn_size
        shapes = [(inner, d)] * 3 + [(d, inner), (inner, d), (d, inner), (ff, d), (ff, d),
                                     (d, ff)]
        structs, keep = [], []
        for block in model.decoder:
            norms = _vectors([block.ln_1.weight, block.ln_2.weight, block.ln_3.weight], d,
                             dtype)
            attn, cross, ffn = block.self_attn, block.cross_attn, block.ffn
            linears = _linears([attn.q, attn.k, attn.v, attn.o, cross.q, cross.o, ffn.wi_0,
                                ffn.wi_1, ffn.wo], shapes, dtype)
            if norms is None or linears is None:
                return None
            structs.append(_DecoderLayer((ctypes.c_void_p * 3)(*(t.data_ptr() for t in norms)),
                                         *linears))
            keep.append((norms, linears))
        return cls(structs, keep, cfg, cfg.decoder_layers, dtype) if structs else None

    def run(self, x: torch.Tensor, cache, bias: torch.Tensor,
            encoder_mask: torch.Tensor | None) -> None:
        if bias is None:
            raise ValueError("model step: a decoder step needs its relative position bias")
        qkv = self._scratch_qkv(x, cache, None, bias)
        cross = [t for keys_values in cache.cross or () for t in keys_values]
        if len(cross) != 2 * self.n_layers:
            raise ValueError(f"model step: {len(cross) // 2} layers of the encoder's keys and "
                             f"values for {self.n_layers} decoder layers")
        source = cross[0].shape[2] if cross[0].dim() == 4 else 0
        queries = qkv.new_empty(*x.shape[:2], self.heads * self.d_head)  # what C writes
        attention.check(queries, cross[0], cross[1], source, encoder_mask, cross=True)
        if any(t.shape != cross[0].shape or t.dtype != self.dtype or not t.is_contiguous()
               for t in cross):
            raise ValueError("model step: the encoder's keys and values must be contiguous "
                             f"{self.dtype} tensors of one shape")
        pointers = (ctypes.c_void_p * len(cross))(*(t.data_ptr() for t in cross))
        with library.profiled("cpmctl::decoder_layers"):
            status = library.load().cpmctl_decoder_layers(
                x.data_ptr(), self.dtype == torch.bfloat16, x.shape[0], x.shape[1],
                self.d_model, self.heads, self.d_head, self.ffn, self.address, self.n_layers,
                self.eps, cache.keys.data_ptr(), cache.values.data_ptr(), cache.max_len,
                cache.length, bias.data_ptr(), bias.shape[2], pointers, source,
                None if encoder_mask is None else encoder_mask.data_ptr(),
                0 if encoder_mask is None else encoder_mask.stride(0), qkv.data_ptr(),
                torch.get_num_threads())
        self._raise_for(status, x)
