"""fp32 and bf16 inference on the CPU: linear layers with their weights reordered once for a
fast matmul kernel.

A decoding step multiplies one row (or a few) by every weight matrix: a matrix-vector product,
bound by how fast the weights stream from memory. nn.Linear hands the plain [out, in] weight to
the BLAS on every call, which streams it at a third of the memory's speed here. Two kernels do
better, chosen per layer when it is made (`PackedLinear.kernel`):

- cpmctl's own (kernels/dense.py), where the CPU has AVX2 + FMA or AVX-512 (bf16 on AVX-512
  needs AVX-512 BF16): the weight in panels of 32 output channels, each a run read front to
  back once per 12 input rows (AVX-512), or per 3 rows and twice per 6, half its width each
  time (AVX2). A CPM-Small token's 49 matmuls (432 MB
  in fp32) stream at 41 GB/s on a Zen 5 VM with AVX-512, the machine's bandwidth (oneDNN: 30;
  nn.Linear: ~15), and at ~22 GB/s on a Zen 3 with AVX2 (oneDNN: ~16); a 256-row prefill runs
  no slower than oneDNN's on either (AVX2 has no oneDNN bf16: nn.Linear's bf16 is 5x slower).
  Each output adds its products in input order whatever the batch, so a row's numbers never
  depend on the other rows.
- oneDNN's, everywhere else PyTorch has it: PyTorch exposes its weight reorder and matmul as the
  ops its own compiler uses for frozen CPU models (`torch.ops.mkldnn._reorder_linear_weight`
  once, `torch.ops.mkldnn._linear_pointwise` per call); its packed weight is an opaque tensor.

Measured here on CPM-Small's shapes, one row, each weight warm in the caches (µs):

    layer              fp32 Linear  oneDNN  cpmctl   bf16 Linear  oneDNN  cpmctl
    fused QKV          145          80-92   66       147          49-59   32
    attention output    38          36-42   16        89          22-38   11
    MLP up             143          98-106  75       190          62-67   41
    MLP down           130          90-111  64       174          52-71   43
    LM head (30,000)   5,870        2,560   2,565    2,153        990     797

A prepared model cannot be moved, cast, saved or deep-copied afterwards (prepare it last): the
packed weights are plain attributes in a layout only their kernel reads. Where neither kernel
runs (no kernel library and no oneDNN, or no bf16 support), the layers stay nn.Linear.

NOTE: GPT's head is tied to the word embedding, which stays a plain table for lookups: the
head's packed copy is a second table (+92 MB for CPM-Small in fp32, +46 MB in bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl.console import warn
from cpmctl.kernels import blocks, dense

CPMCTL, ONEDNN = "cpmctl", "onednn"


class PackedLinear(nn.Module):
    """nn.Linear with its weight reordered once for `kernel` (CPMCTL or ONEDNN), fp32 or bf16
    on the CPU."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel
        weight = linear.weight.detach()
        # NOTE: plain attributes, not buffers: Module.to() would cast the packed layout as if
        # it were a weight, and state_dict() cannot handle oneDNN's opaque tensor
        self.bias = None if linear.bias is None else linear.bias.detach()
        if kernel == CPMCTL:
            self.packed = dense.pack(weight)
            dense.check_layer(self.packed, self.bias, self.out_features, self.in_features)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == CPMCTL:
            return dense.matmul(x, self.packed, self.bias, self.out_features, self.in_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def step_function(self):
        """forward as a closure over the layer's tensors (planned.py calls it ~50 times a
        token; the module call around it costs more than the closure). planned.py's inputs are
        contiguous, in the layer's dtype and width (checked when it plans the step), so
        cpmctl's op is called without matmul's per-call checks."""
        packed, bias, out = self.packed, self.bias, self.out_features
        if self.kernel == CPMCTL:
            op = dense.OP
            return lambda x: op(x, packed, bias, out)
        op = torch.ops.mkldnn._linear_pointwise
        return lambda x: op(x, packed, bias, "none", [], "")

    def c_linear(self) -> blocks.Linear | None:
        """The layer for kernels/blocks.c to call from C, where it runs on cpmctl's kernel."""
        if self.kernel != CPMCTL:
            return None
        return blocks.Linear.of(blocks.DENSE, self.out_features, self.in_features,
                                  self.in_features, self.packed, None, self.bias,
                                  self.packed.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")


def kernel_for(dtype: torch.dtype) -> str | None:
    """Which kernel a PackedLinear of `dtype` runs here: CPMCTL, ONEDNN or None (none works:
    keep nn.Linear)."""
    if dtype in dense.dtypes():
        return CPMCTL
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return None
    if dtype == torch.bfloat16 and not dense.torch_has_native_bf16():
        return None
    return ONEDNN if _probe(dtype) else None


def kernel_name(dtype: torch.dtype) -> str:
    """What PackedLinears of `dtype` run here, for reports: "cpmctl <variant>" (avx512, avx2),
    "onednn" or "torch linear"."""
    kernel = kernel_for(dtype)
    return f"cpmctl {dense.variant()}" if kernel == CPMCTL else kernel or "torch linear"


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a CPU model by a PackedLinear, in place, where a kernel runs
    its dtype (kernel_for); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (kernel := kernel_for(module.weight.dtype)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PackedLinear(module, kernel))
    return model


# --- oneDNN's -------------------------------------------------------------------------------

@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    """oneDNN's packed ops against F.linear on a small layer. NOTE: they are inductor's internal
    ops, not a public API: a PyTorch upgrade may rename or change them, and then every layer
    stays a plain nn.Linear (slower, same numbers) with one warning, instead of failing."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x = torch.randn(3, 64, generator=generator).to(dtype)
    try:
        with torch.no_grad():
            got = PackedLinear(linear, ONEDNN)(x)
        ok = got.shape == (3, 48) and torch.allclose(got.float(), F.linear(x, linear.weight,
                                                     linear.bias).float(), rtol=2e-2, atol=2e-1)
    except (RuntimeError, AttributeError, TypeError) as exc:
        warn(f"oneDNN-packed {str(dtype).removeprefix('torch.')} layers are not available in "
             f"this PyTorch ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); using "
             "plain linear layers")
        return False
    if not ok:
        warn(f"oneDNN-packed {str(dtype).removeprefix('torch.')} layers disagree with "
             "F.linear in this PyTorch; using plain linear layers")
    return ok
