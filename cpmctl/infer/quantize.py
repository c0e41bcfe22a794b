"""Weight-only int8 (`--quantize int8`), as BMInf runs CPM-2 on small machines.

Every `nn.Linear` (the LM head included) becomes an `Int8Linear`: its weight stored as int8
with one fp scale per output channel (symmetric: scale = max|w| / 127 over the row, w ≈ scale *
q), activations in bf16. The matmul is PyTorch's own int8 weight-only kernel,
`torch._weight_int8pack_mm(x_bf16, w_int8, scales)`, which converts the weights on the fly
inside the kernel: the weights take half of bf16's memory and cross the memory bus at one byte
each.

NOTE: that kernel is compute-bound on the CPU here (2 cores, AVX-512): it converts and scales
every weight before its multiply-add, and runs exactly twice as fast on 2 threads as on 1.
CPM-Small's 49 matmuls of one decoding step take 7.1 ms in int8, 8.9 ms with oneDNN-packed
bf16 weights (packed.py) and ~17 ms with plain bf16 nn.Linear: int8 halves the memory but
decodes only ~1.2x faster than packed bf16.

The rest of the model (embeddings, norms, MoE centroids) goes to bf16. GPT's head is tied to
the word embedding: the head is quantized, the embedding stays a bf16 table for lookups.

NOTE: the CPU kernel (ATen's int8mm_kernel.cpp) reads the activations with aligned 32-byte
loads, 16 bf16 values at a time, and assumes rows packed back to back: an input size that is
not a multiple of 16 or a misaligned input crashes it, and a strided one gives wrong numbers.
A model with such a layer is refused, and `Int8Linear` copies a strided or misaligned input
first. The kernel exists for CPU (and Apple's MPS) only, so int8 runs on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from cpmctl.errors import CpmError

_BLOCK = 16  # bf16 values per load
_ALIGN = 32  # bytes


class Int8Linear(nn.Module):
    """y = x @ (scales[:, None] * weight).T + bias, with weight int8 [out, in]."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantize from the layer's own (full-precision) weight, per output channel.

        NOTE: the weights are rounded against the scales as stored (in `dtype`, as the kernel
        takes them), not the exact ones, so the scales' own rounding adds no error.
        """
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127).to(dtype)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q, scales, bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if not x.is_contiguous() or x.data_ptr() % _ALIGN:
            x = x.clone(memory_format=torch.contiguous_format)
        y = torch._weight_int8pack_mm(x, self.weight, self.scales)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (on the CPU) by an Int8Linear and move the rest to
    bf16, in place; returns the model."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        if linear.in_features % _BLOCK:
            raise CpmError(f"--quantize int8: layer {name} has {linear.in_features} inputs; "
                           f"PyTorch's int8 kernel needs a multiple of {_BLOCK}")
        if linear.weight.device.type != "cpu":
            raise CpmError("int8 weight-only layers run on the CPU: move the model there "
                           "before quantizing it")
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear.from_linear(linear))
    return model.to(torch.bfloat16)
