"""cpmctl's own int8 weight-only matmul (int8_matmul.c, in the kernel library: library.py).

Why not only PyTorch's kernel: `torch._weight_int8pack_mm` converts every weight to fp32
before its multiply-add and reads four rows at once in short strides; on CPM-Small's decoding
step (49 matmuls, 108 MB of int8 weights) it reached 15 GB/s on 2 cores here, while the memory
delivers ~40-50 GB/s. The C kernel widens each weight once to int16 and multiplies it with
integer dot-product instructions (AVX-512 VNNI: 32 products per instruction; AVX2 everywhere
else on x86-64) against activations quantized to int16 on the fly, from a layout read front to
back (pack()): ~40 GB/s on the same step with AVX-512 VNNI. Where the library is not available,
`kernel_name()` is TORCH and quantize.py uses PyTorch's kernel.

`matmul` checks every argument against the layer's shapes, dtypes and device first (an input
wider than the layer would otherwise be read and written past its buffers).
"""

from __future__ import annotations

import torch

from cpmctl.kernels import library

TORCH = "torch _weight_int8pack_mm"


def kernel_name() -> str:
    """Which kernel int8 layers made now will run: "cpmctl <variant>" (avx512-vnni, avx-vnni,
    avx2) or TORCH."""
    lib = library.load()
    return TORCH if lib is None else f"cpmctl {lib.cpmctl_int8_variant().decode()}"


def _layout() -> tuple[int, int]:
    """(output channels per block, inputs per slice) of the packed layout, from the library."""
    lib = library.load()
    return lib.cpmctl_int8_layout(0), lib.cpmctl_int8_layout(1)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] → the kernel's layout [blocks, slices, rows, cols], zero-padded."""
    rows, cols = _layout()
    out_features, in_features = q.shape
    padded = torch.zeros(-(-out_features // rows) * rows, -(-in_features // cols) * cols,
                         dtype=torch.int8)
    padded[:out_features, :in_features] = q
    blocks, width = padded.shape[0] // rows, padded.shape[1]
    return padded.view(blocks, rows, width // cols, cols).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """pack()'s inverse: int8 [out, in]."""
    blocks, slices, rows, cols = packed.shape
    plain = packed.permute(0, 2, 1, 3).reshape(blocks * rows, slices * cols)
    return plain[:out_features, :in_features].contiguous()


def check_layer(packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, in_features: int) -> None:
    """Refuse a layer whose tensors the C kernel would read out of bounds (ValueError: a
    caller's bug, never user input): on the CPU, contiguous, of the dtype and size the layer's
    shapes imply. Checked once, when the layer is made; `matmul` checks each input."""
    rows, cols = _layout()
    want = (-(-out_features // rows), -(-in_features // cols), rows, cols)
    problems = []
    if packed.dtype != torch.int8 or tuple(packed.shape) != want:
        problems.append(f"packed weight {packed.dtype} {tuple(packed.shape)}, expected int8 "
                        f"{want}")
    if scales.dtype != torch.float32 or scales.numel() != out_features:
        problems.append(f"scales {scales.dtype} x {scales.numel()}, expected float32 x "
                        f"{out_features}")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != out_features):
        problems.append(f"bias {bias.dtype} x {bias.numel()}, expected float32 x "
                        f"{out_features}")
    tensors = [t for t in (packed, scales, bias) if t is not None]
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        problems.append("weights, scales and bias must be contiguous CPU tensors")
    if problems:
        raise ValueError("int8 layer: " + "; ".join(problems))


def _compute(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    if rows == 0:
        return y
    status = library.load().cpmctl_int8_matmul(
        x.data_ptr(), rows, in_features, packed.data_ptr(), scales.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
        packed.shape[1] * packed.shape[3], torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"int8 matmul: no memory for {rows} x {in_features} activations")
    return y


OP = library.define_op(
    "int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int out_features) -> "
    "Tensor", _compute,
    lambda x, packed, scales, bias, out_features: x.new_empty(*x.shape[:-1], out_features,
                                                              dtype=torch.bfloat16))


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None, out_features: int, in_features: int) -> torch.Tensor:
    """x [..., in] bf16 @ (scales[:, None] * weight).T + bias → [..., out] bf16, through the op
    `cpmctl::int8_matmul`; scales and bias fp32 (checked by check_layer). An input of another
    width or on another device than the layer's is a ValueError, never a call into C.

    NOTE: called ~50 times per decoded token, so it skips the conversions it can: each torch
    call costs about a microsecond, the kernel itself ~4 for a small layer."""
    if x.shape[-1] != in_features or x.device.type != "cpu":
        raise ValueError(f"int8 matmul: a {x.device.type} input of {x.shape[-1]} features for "
                         f"a CPU layer of {in_features}")
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    if not x.is_contiguous():
        x = x.contiguous()
    return OP(x, packed, scales, bias, out_features)
