"""fp32 and bf16 generation on the CPU: linear layers with oneDNN-prepacked weights.

A decoding step multiplies one row by every weight matrix: a matrix-vector product, bound by how
fast the weights stream from memory. nn.Linear hands the plain [out, in] weight to the BLAS on
every call; oneDNN, reordering the weight once into its own blocked layout, runs the same
product much faster. PyTorch exposes that reorder and the matching matmul as the ops its own
compiler uses for frozen CPU models: `torch.ops.mkldnn._reorder_linear_weight` (once) and
`torch.ops.mkldnn._linear_pointwise` (per call). Measured here on CPM-Small's shapes, one row:

    layer              fp32 Linear  packed    bf16 Linear  packed
    fused QKV          570 us       281 us    220 us       115 us
    attention output   174 us        97 us     54 us        30 us
    MLP up             716 us       353 us    296 us       175 us
    MLP down           518 us       377 us    250 us       185 us
    LM head (30,000)   6.9 ms       3.2 ms    2.6 ms       1.6 ms

The packed weight is an opaque oneDNN tensor: a prepared model cannot be moved, cast, saved or
deep-copied afterwards (prepare it last). Where PyTorch was built without oneDNN, or the CPU
lacks bf16 support, the layers stay nn.Linear.

NOTE: GPT's head is tied to the word embedding, which stays a plain table for lookups: the
head's packed copy is a second table (+92 MB for CPM-Small in fp32, +46 MB in bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl.console import warn


class PackedLinear(nn.Module):
    """nn.Linear with its weight reordered once for oneDNN (CPU, fp32 or bf16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # NOTE: plain attributes, not buffers: Module.to() and state_dict() cannot handle
        # the opaque tensor
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def step_function(self):
        """forward as a closure over the layer's tensors (planned.py calls it ~50 times a
        token; the module call around it costs more than the closure)."""
        op, packed, bias = torch.ops.mkldnn._linear_pointwise, self.packed, self.bias
        return lambda x: op(x, packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def can_pack(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run oneDNN linear layers in `dtype`, and the ops do
    what nn.Linear does (probed once per dtype)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return dtype in (torch.float32, torch.bfloat16) and _probe(dtype)


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    """The packed ops against F.linear on a small layer. NOTE: they are inductor's internal
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
            got = PackedLinear(linear)(x)
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


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a CPU model by a PackedLinear, in place, when its dtype can
    be packed; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and can_pack(module.weight.dtype):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PackedLinear(module))
    return model
