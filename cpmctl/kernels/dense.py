"""cpmctl's fp32/bf16 matmul (dense_matmul.c, in the kernel library: library.py), for x86 CPUs
with AVX-512 (fp32; bf16 with AVX-512 BF16) or AVX2 + FMA (fp32 and bf16).

Why: on a 2-core AMD EPYC with AVX-512 PyTorch's fp32 matmul (MKL) runs at ~110-180 GFLOP/s,
and its matrix-vector products stream weights at a third of the memory's speed; the kernel's
plain register-blocked loop (12 rows x 32 columns of fp32 accumulators, one FMA each per input)
reaches 300-400 GFLOP/s on CPM-Small's training shapes and the memory's bandwidth on a decoding
step. On a 2-core Zen 3 (AVX2, no AVX-512) it streams a CPM-Small token's weights at ~22 GB/s
(oneDNN's packed layers: ~16), multiplies 8- to 32-row blocks at 110-160 GFLOP/s (MKL:
40-60), and 1,024-row products at MKL's speed (130-160 GFLOP/s), no faster.
Each output adds its products in input order whatever the number of rows, so a row's
result never depends on the batch it is computed in.

Two uses:
- inference (infer/packed.py): `pack` a weight once into panels, `matmul` per call (fp32 and
  bf16), wherever the kernel is built;
- training (`linear`, fp32), on the variants in TRAINING_VARIANTS: the forward packs the weight
  (a copy, ~5% of the product), the backward multiplies the plain weight and activations in
  place through the kernel's strided form, `cpmctl_dense_gemm_f32`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpmctl.kernels import library


def dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the kernel library's dense matmul was built for on this CPU (none without
    AVX2 + FMA; fp32 only on AVX-512 without AVX-512 BF16)."""
    lib = library.load()
    layout = 0 if lib is None else lib.cpmctl_dense_layout()
    if not layout:
        return ()
    return (torch.float32, torch.bfloat16) if layout >> 16 & 1 else (torch.float32,)


TRAINING_VARIANTS = ("avx512",)
"""The kernel variants training's products run on (AVX2's only matches MKL at training's
shapes, and packing the weight each step costs more)."""


def variant() -> str | None:
    """The kernel library's dense variant here ("avx512", "avx2"), None where it has none."""
    lib = library.load()
    return lib.cpmctl_dense_variant().decode() if lib is not None and dtypes() else None


def torch_has_native_bf16() -> bool:
    """Whether PyTorch's own bf16 matmuls (oneDNN) run on bf16 instructions here (AVX-512 BF16
    or AMX); without, they are emulated: on a 2-core Zen 3 a bf16 product ran at 17 GFLOP/s
    against fp32's 105, and a small GPT trained 11x slower in bf16 than in fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _panel() -> int:
    return library.load().cpmctl_dense_layout() & 0xFFFF


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 or bf16 CPU weight → panels of `_panel()` output channels, zero-padded:
    fp32 [panels, in, NR]; bf16 [panels, in / 2, NR, 2] (in rounded up to even), as
    dense_matmul.c reads them; written by the kernel library (PyTorch's permuted copy took 68 ms
    for CPM-Small's 30,000 x 768 head)."""
    if weight.dtype not in dtypes() or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"dense pack: a {weight.device.type} {weight.dtype} "
                         f"{tuple(weight.shape)} weight; expected a 2-d CPU tensor of one of "
                         f"{dtypes()}")
    nr, (out_features, in_features) = _panel(), weight.shape
    bf16 = weight.dtype == torch.bfloat16
    shape = (-(-out_features // nr), -(-in_features // 2), nr, 2) if bf16 else \
        (-(-out_features // nr), in_features, nr)
    packed = torch.empty(shape, dtype=weight.dtype)
    weight = weight.contiguous()
    library.load().cpmctl_dense_pack(weight.data_ptr(), out_features, in_features,
                                     packed.data_ptr(), bf16, torch.get_num_threads())
    return packed


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
    if packed.dtype not in dtypes() or tuple(packed.shape) != want:
        problems.append(f"packed weight {packed.dtype} {tuple(packed.shape)}, expected {want} "
                        f"in one of {dtypes()}")
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
    if rows and library.load().cpmctl_dense_matmul(
            x.data_ptr(), rows, in_features, packed.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
            x.dtype == torch.bfloat16, torch.get_num_threads()):
        raise ValueError(f"dense matmul: the kernel library has no {x.dtype} kernel")
    return y


OP = library.define_op(
    "dense_matmul(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", _compute,
    lambda x, packed, bias, out_features: x.new_empty(*x.shape[:-1], out_features))


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, in_features: int) -> torch.Tensor:
    """x [..., in] @ weight.T + bias → [..., out], in the packed weight's dtype, through the op
    `cpmctl::dense_matmul`. An input of another width, dtype or device than the layer's is a
    ValueError (as F.linear refuses it), never a call into C."""
    if x.shape[-1] != in_features or x.device.type != "cpu" or x.dtype != packed.dtype:
        raise ValueError(f"dense matmul: a {x.device.type} {x.dtype} input of {x.shape[-1]} "
                         f"features for a CPU {packed.dtype} layer of {in_features}")
    return OP(x if x.is_contiguous() else x.contiguous(), packed, bias, out_features)


# --- training: fp32 linear layers ------------------------------------------------------------

MIN_ROWS = 64
"""Below this many rows the forward's weight packing costs more than the kernel saves (a
2304 x 768 weight: ~0.5 ms to pack; 32 rows multiply in ~0.3 ms)."""


def _gemm(a: torch.Tensor, a_row: int, a_col: int, m: int, k: int, b: torch.Tensor,
          b_panel: int, b_row: int, n: int, bias: torch.Tensor | None,
          into: torch.Tensor | None = None) -> torch.Tensor:
    """[m, n] = A @ B (+ bias), or `into` += A @ B, with the strides dense_matmul.c's gemm_f32
    describes; every tensor a contiguous fp32 CPU tensor the strides stay inside (the callers
    below)."""
    out = torch.empty(m, n) if into is None else into
    library.load().cpmctl_dense_gemm_f32(
        a.data_ptr(), m, k, a_row, a_col, b.data_ptr(), b_panel, b_row, n,
        None if bias is None else bias.data_ptr(), out.data_ptr(), n, into is not None,
        torch.get_num_threads())
    return out


class _Linear(torch.autograd.Function):
    """y = x @ weight.T + bias and its gradients, every product through the kernel: the
    forward against the packed weight; d x = d y @ weight and d weight = d y.T @ x with the
    plain tensors read in place (a transposed A is a stride, B is the plain row-major matrix)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out_features, in_features = weight.shape
        rows = x.reshape(-1, in_features).contiguous()
        weight = weight.contiguous()  # the backward reads it in place
        y = _compute(rows, pack(weight.detach()), bias, out_features)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        out_features, in_features = weight.shape
        grad = grad.reshape(-1, out_features).contiguous()
        count, panel = rows.shape[0], _panel()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(grad, out_features, 1, count, out_features, weight, panel,
                           in_features, in_features, None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _gemm(grad, 1, out_features, out_features, count, rows, panel,
                                in_features, in_features, None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear, through the kernel where it pays (`_pays`); F.linear everywhere else."""
    return _Linear.apply(x, weight, bias) if _pays(x, weight, bias) else F.linear(x, weight, bias)


def _pays(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Shapes F.linear would accept, and `_pays_for` their rows and tensors."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return weight.dim() == 2 and x.dim() >= 2 and x.shape[-1] == weight.shape[1] \
        and (bias is None or bias.shape == weight.shape[:1]) \
        and _pays_for(x.numel() // max(weight.shape[1], 1), *tensors)


def _pays_for(rows: int, *tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, at least MIN_ROWS rows, a variant in TRAINING_VARIANTS here, outside
    autocast and torch.compile (which see F.linear and choose their own kernels; checked
    first, so that the compiler never traces into the library's loading)."""
    return not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu") \
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) \
        and rows >= MIN_ROWS and variant() in TRAINING_VARIANTS


# --- training: the fused LM head's products (train/objectives.py) ---------------------------

def head_products(weight: torch.Tensor, rows: int):
    """(logits, add_weight_grad) for the fused head's chunks of `rows` hidden states against
    `weight` [vocab, d_model]: `logits(h)` = h @ weight.T, the weight packed once for every
    chunk; `add_weight_grad(g, h, into)`: into += g.T @ h, g read transposed in place. PyTorch's
    matmul where the kernel does not pay (`_pays_for`). (d hidden = g @ weight, a 30,000-long
    reduction, stays on PyTorch's matmul: the kernel has no blocking for it.)"""
    if not _pays_for(rows, weight):
        return (lambda h: h @ weight.T,
                lambda g, h, into: into.addmm_(g.T, h))
    vocab, width = weight.shape
    packed, panel = pack(weight.detach()), _panel()

    def logits(h: torch.Tensor) -> torch.Tensor:
        return _compute(h.contiguous(), packed, None, vocab)

    def add_weight_grad(g: torch.Tensor, h: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        g, h = g.contiguous(), h.contiguous()
        return _gemm(g, 1, vocab, vocab, g.shape[0], h, panel, width, width, None, into=into)

    return logits, add_weight_grad
