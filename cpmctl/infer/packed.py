"""fp32 and bf16 inference on the CPU: linear layers with their weights reordered once for a
fast matmul kernel.

A decoding step multiplies one row (or a few) by every weight matrix: a matrix-vector product,
bound by how fast the weights stream from memory. nn.Linear hands the plain [out, in] weight to
the BLAS on every call, which streams it at a third of the memory's speed here. Two kernels do
better, chosen per layer when it is made (`PackedLinear.kernel`):

- cpmctl's own (dense_matmul.c, in the kernel library int8_kernel.py builds), where the CPU
  has AVX-512 (and AVX-512 BF16 for bf16): the weight in panels of 32 output channels, each a
  run read front to back once per 12 input rows. A CPM-Small token's 49 matmuls (432 MB in
  fp32) stream at 41 GB/s here, the machine's bandwidth (oneDNN: 30; nn.Linear: ~15), and a
  256-row prefill runs no slower than oneDNN's. Each output adds its products in input order
  whatever the batch, so a row's numbers never depend on the other rows.
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
from cpmctl.infer import int8_kernel

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
            self.packed = pack(weight)
            check_layer(self.packed, self.bias, self.out_features, self.in_features)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == CPMCTL:
            return matmul(x, self.packed, self.bias, self.out_features, self.in_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def step_function(self):
        """forward as a closure over the layer's tensors (planned.py calls it ~50 times a
        token; the module call around it costs more than the closure). planned.py's inputs are
        contiguous, in the layer's dtype and width (checked when it plans the step), so
        cpmctl's op is called without matmul's per-call checks."""
        packed, bias, out = self.packed, self.bias, self.out_features
        if self.kernel == CPMCTL:
            return lambda x: _OP(x, packed, bias, out)
        op = torch.ops.mkldnn._linear_pointwise
        return lambda x: op(x, packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")


def kernel_for(dtype: torch.dtype) -> str | None:
    """Which kernel a PackedLinear of `dtype` runs here: CPMCTL, ONEDNN or None (none works:
    keep nn.Linear)."""
    if dtype in _dense_dtypes():
        return CPMCTL
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return None
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ONEDNN if _probe(dtype) else None


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of a CPU model by a PackedLinear, in place, where a kernel runs
    its dtype (kernel_for); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (kernel := kernel_for(module.weight.dtype)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, PackedLinear(module, kernel))
    return model


# --- cpmctl's kernel ------------------------------------------------------------------------

def _dense_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the kernel library's dense matmul was built for on this CPU (none without
    AVX-512; fp32 only without AVX-512 BF16)."""
    lib = int8_kernel.library()
    layout = 0 if lib is None else lib.cpmctl_dense_layout()
    if not layout:
        return ()
    return (torch.float32, torch.bfloat16) if layout >> 16 & 1 else (torch.float32,)


def _panel() -> int:
    return int8_kernel.library().cpmctl_dense_layout() & 0xFFFF


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] → panels of `_panel()` output channels, zero-padded: fp32 [panels, in, NR];
    bf16 [panels, in / 2, NR, 2] (in rounded up to even), as dense_matmul.c reads them."""
    nr = _panel()
    out_features, in_features = weight.shape
    pairs = 2 if weight.dtype == torch.bfloat16 else 1
    width = -(-in_features // pairs) * pairs
    padded = weight.new_zeros(-(-out_features // nr) * nr, width)
    padded[:out_features, :in_features] = weight
    panels = padded.view(-1, nr, width // pairs, pairs).permute(0, 2, 1, 3).contiguous()
    return panels.squeeze(-1) if pairs == 1 else panels


def check_layer(packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                in_features: int) -> None:
    """Refuse a layer whose tensors the C kernel would read out of bounds (ValueError: a
    caller's bug, never user input): contiguous CPU tensors of one supported dtype, of the
    sizes the layer's shapes imply. Checked once, when the layer is made."""
    nr = _panel()
    pairs = 2 if packed.dtype == torch.bfloat16 else 1
    want = (-(-out_features // nr), -(-in_features // pairs)) + ((nr, 2) if pairs == 2 else
                                                                 (nr,))
    problems = []
    if packed.dtype not in _dense_dtypes() or tuple(packed.shape) != want:
        problems.append(f"packed weight {packed.dtype} {tuple(packed.shape)}, expected {want} "
                        f"in one of {_dense_dtypes()}")
    if bias is not None and (bias.dtype != packed.dtype or bias.numel() != out_features):
        problems.append(f"bias {bias.dtype} x {bias.numel()}, expected {packed.dtype} x "
                        f"{out_features}")
    tensors = [t for t in (packed, bias) if t is not None]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        problems.append("the packed weight and the bias must be contiguous CPU tensors")
    if problems:
        raise ValueError("dense layer: " + "; ".join(problems))


def _compute(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
             out_features: int) -> torch.Tensor:
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    if rows and int8_kernel.library().cpmctl_dense_matmul(
            x.data_ptr(), rows, in_features, packed.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
            x.dtype == torch.bfloat16, torch.get_num_threads()):
        raise ValueError(f"dense matmul: the kernel library has no {x.dtype} kernel")
    return y


# NOTE: torch.library.Library rather than @custom_op, for the reason int8_kernel.py gives
_LIBRARY = torch.library.Library("cpmctl", "FRAGMENT")
_LIBRARY.define("dense_matmul(Tensor x, Tensor packed, Tensor? bias, int out_features) -> "
                "Tensor")
_LIBRARY.impl("dense_matmul", _compute, "CPU")


@torch.library.register_fake("cpmctl::dense_matmul")
def _fake(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


_OP = torch.ops.cpmctl.dense_matmul.default


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, in_features: int) -> torch.Tensor:
    """x [..., in] @ weight.T + bias → [..., out], in the packed weight's dtype, through the op
    `cpmctl::dense_matmul`. An input of another width, dtype or device than the layer's is a
    ValueError (as F.linear refuses it), never a call into C."""
    if x.shape[-1] != in_features or x.device.type != "cpu" or x.dtype != packed.dtype:
        raise ValueError(f"dense matmul: a {x.device.type} {x.dtype} input of {x.shape[-1]} "
                         f"features for a CPU {packed.dtype} layer of {in_features}")
    return _OP(x if x.is_contiguous() else x.contiguous(), packed, bias, out_features)


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
