"""Weight-only int8 (`--quantize int8`), as BMInf runs CPM-2 on small machines.

Every `nn.Linear` (the LM head included) becomes an `Int8Linear`: its weight stored as int8
with one fp scale per output channel (symmetric: scale = max|w| / 127 over the row, w ≈ scale *
q), activations in bf16. The weights take half of bf16's memory and cross the memory bus at one
byte each. Two kernels run the matmul, chosen when the layer is made:

- cpmctl's own (int8.py), where it builds (x86-64 with AVX2 and a C compiler): a packed
  weight layout, integer dot products; ~2x PyTorch's kernel on CPM-Small's decoding step here.
- PyTorch's `torch._weight_int8pack_mm(x_bf16, w_int8, scales)` everywhere else.

The rest of the model (embeddings, norms, MoE centroids) goes to bf16. GPT's head is tied to
the word embedding: the head is quantized, the embedding stays a bf16 table for lookups.

NOTE: PyTorch's CPU kernel (ATen's int8mm_kernel.cpp) reads the activations with aligned
32-byte loads, 16 bf16 values at a time, and assumes rows packed back to back: an input size
that is not a multiple of 16 or a misaligned input crashes it, and a strided one gives wrong
numbers. With that kernel a model with such a layer is refused, and `Int8Linear` copies a
strided or misaligned input first. It exists for CPU (and Apple's MPS) only, so int8 runs on
the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from cpmctl.errors import CpmError
from cpmctl.kernels import blocks, int8

_BLOCK = 16  # bf16 values per load
_ALIGN = 32  # bytes


class Int8Linear(nn.Module):
    """y = x @ (scales[:, None] * q).T + bias, with q int8 [out, in] — stored in the layout of
    the kernel the layer runs (`self.kernel`): packed for cpmctl's, plain for PyTorch's."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = kernel
        native = kernel != int8.TORCH
        self.register_buffer("weight", int8.pack(q) if native else q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        if native:
            int8.check_layer(self.weight, scales, bias, self.out_features,
                                    self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize from the layer's own (full-precision) weight, per output channel, for the
        kernel that runs here (int8.kernel_name()).

        NOTE: the weights are rounded against the scales as stored (fp32 for cpmctl's kernel,
        bf16 for PyTorch's, as each takes them), so the scales' own rounding adds no error.
        """
        kernel = int8.kernel_name()
        dtype = torch.bfloat16 if kernel == int8.TORCH else torch.float32
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127).to(dtype)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q, scales, bias, kernel)

    def int8_weight(self) -> torch.Tensor:
        """q as int8 [out, in], whatever the layout."""
        if self.kernel == int8.TORCH:
            return self.weight
        return int8.unpack(self.weight, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != int8.TORCH:
            return int8.matmul(x, self.weight, self.scales, self.bias, self.out_features,
                                      self.in_features)
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"int8 linear: input has {shape[-1]} features, the layer "
                             f"{self.in_features}")
        x = x.reshape(-1, shape[-1])
        if not x.is_contiguous() or x.data_ptr() % _ALIGN:
            x = x.clone(memory_format=torch.contiguous_format)
        y = torch._weight_int8pack_mm(x, self.weight, self.scales)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def step_function(self):
        """forward as a closure for planned.py, whose inputs are contiguous bf16 CPU
        tensors of in_features (it checks the widths once, when it plans the step): cpmctl's
        kernel op without int8.matmul's per-call checks; PyTorch's kernel as forward."""
        if self.kernel == int8.TORCH:
            return self.forward
        op, weight, scales, bias, out = (int8.OP, self.weight, self.scales, self.bias,
                                         self.out_features)
        return lambda x: op(x, weight, scales, bias, out)

    def c_linear(self) -> blocks.Linear | None:
        """The layer for kernels/blocks.c to call from C, where it runs on cpmctl's kernel
        (bf16 in, bf16 out)."""
        if self.kernel == int8.TORCH:
            return None
        padded_in = self.weight.shape[1] * self.weight.shape[3]
        return blocks.Linear.of(blocks.INT8, self.out_features, self.in_features, padded_in,
                                  self.weight, self.scales, self.bias, torch.bfloat16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (on the CPU) by an Int8Linear and move the rest to
    bf16, in place; returns the model."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        if linear.in_features % _BLOCK and int8.kernel_name() == int8.TORCH:
            raise CpmError(f"--quantize int8: layer {name} has {linear.in_features} inputs; "
                           f"PyTorch's int8 kernel needs a multiple of {_BLOCK}")
        if linear.weight.device.type != "cpu":
            raise CpmError("int8 weight-only layers run on the CPU: move the model there "
                           "before quantizing it")
    quantized = [(name, Int8Linear.from_linear(linear)) for name, linear in linears]
    # NOTE: cast before swapping the layers in: .to() would cast fp32 scales and biases too
    model.to(torch.bfloat16)
    for name, layer in quantized:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model
