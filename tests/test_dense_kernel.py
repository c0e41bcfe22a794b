"""cpmctl's fp32/bf16 matmul (dense_matmul.c through kernels/dense.py): inference's packed
layers against a float64 product for every row-count tail and ragged shape, independent of the
batch to the bit, refusing what they would read past; training's fp32 linear and its gradients
against float64, and where it hands over to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpmctl.infer import packed
from cpmctl.infer.packed import CPMCTL, PackedLinear
from cpmctl.kernels import dense, library


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request, monkeypatch):
    """A dtype the dense kernel runs here (skipped where this CPU or build has none for it)."""
    monkeypatch.delenv(library.KERNEL_ENV, raising=False)
    library.load.cache_clear()
    if packed.kernel_for(request.param) != CPMCTL:
        pytest.skip(f"no cpmctl dense kernel for {request.param} here (needs AVX2 + FMA "
                    "or AVX-512)")
    yield request.param
    library.load.cache_clear()


def kernel_for_training(monkeypatch):
    """Training's products on this CPU's kernel variant, whether or not training would pick it
    here (its strided form is compiled, and checked, for every variant)."""
    monkeypatch.delenv(library.KERNEL_ENV, raising=False)
    library.load.cache_clear()
    if dense.variant() is None:
        pytest.skip("no cpmctl dense kernel here (needs AVX2 + FMA or AVX-512)")
    monkeypatch.setattr(dense, "TRAINING_VARIANTS", (dense.variant(),))


def layer(out_features, in_features, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return linear, PackedLinear(linear, CPMCTL)


@pytest.mark.parametrize("shape", [(64, 32), (70, 33), (5, 7), (32, 1), (1000, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matmul_is_the_product(dtype, shape, bias):
    """Every row count from 1 to 2 x 12 + 3 (the kernel's 12-row passes and each tail), output
    widths that end mid-panel, odd input widths (bf16 pairs its inputs), with and without bias."""
    linear, ours = layer(*shape, dtype, bias)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for rows in range(1, 28):
        x = torch.randn(rows, shape[1]).to(dtype)
        with torch.no_grad():
            want = F.linear(x.double(), linear.weight.double(),
                            None if linear.bias is None else linear.bias.double())
            got = ours(x)
        assert got.dtype == dtype and got.shape == (rows, shape[0])
        scale = want.abs().max().item() + 1
        assert (got.double() - want).abs().max().item() <= tolerance * scale, rows


def test_a_rows_result_does_not_depend_on_its_batch(dtype):
    _, ours = layer(100, 48, dtype)
    x = torch.randn(3, 17, 48).to(dtype)
    with torch.no_grad():
        whole = ours(x)
        assert whole.shape == (3, 17, 100)
        for i in range(3):
            for j in (0, 5, 16):
                assert torch.equal(ours(x[i, j:j + 1]), whole[i, j:j + 1])
        assert torch.equal(ours(x.transpose(0, 1)), whole.transpose(0, 1))  # a strided input


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"], indirect=True)
def test_bf16_outputs_round_to_nearest_even_and_keep_nan(dtype):
    """One input (each output one exact product plus its bias, so no summation order): the
    bf16 outputs are the fp32 sums rounded as PyTorch rounds them (to nearest, ties to even),
    for the ties on both sides of an even mantissa, infinities and NaN; in every lane of a
    panel, the last panel's partial columns included."""
    tie = 2.0 ** -8  # half a bf16 unit at 1.0
    weight = torch.tensor([1.0, 1.0 + 2 * tie, -1.0, 3.0, 1.0, 1.0] * 7).to(dtype)[:, None]
    bias = torch.tensor([tie, tie, -tie, 0.0, float("inf"), float("nan")] * 7).to(dtype)
    linear = torch.nn.Linear(1, weight.shape[0]).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    x = torch.ones(2, 1, dtype=dtype)
    with torch.no_grad():
        got = PackedLinear(linear, CPMCTL)(x)
    want = (x.float() @ weight.float().T + bias.float()).to(dtype)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert got[0, 0] == 1.0 and got[0, 1] == 1.0 + 4 * tie  # ties went to the even neighbour


def test_dense_matmul_refuses_what_it_would_read_past(dtype):
    _, ours = layer(40, 24, dtype)
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    for x, what in ((torch.randn(2, 25).to(dtype), "25 features"),
                    (torch.randn(2, 24).to(other), str(other))):
        with pytest.raises(ValueError, match=what):
            ours(x)
    with pytest.raises(ValueError, match="packed weight"):
        dense.check_layer(ours.packed[:1], ours.bias, 40, 24)
    with pytest.raises(ValueError, match="bias"):
        dense.check_layer(ours.packed, ours.bias[:3], 40, 24)


def test_the_dense_op_traces_through_its_fake(dtype):
    _, ours = layer(40, 24, dtype)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.cpmctl.dense_matmul(torch.empty(3, 24, dtype=dtype), ours.packed, None, 40)
    assert y.shape == (3, 40) and y.dtype == dtype


@pytest.mark.parametrize("shape", [(64, 32), (70, 33), (1000, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_training_linear_and_its_gradients_are_the_products(shape, bias, monkeypatch):
    """dense.linear's forward and its three gradients against float64 autograd, for ragged
    widths (a plain B's last panel is read masked) and batched inputs."""
    kernel_for_training(monkeypatch)
    torch.manual_seed(1)
    out_features, in_features = shape
    x = torch.randn(3, 29, in_features, requires_grad=True)  # 87 rows: past MIN_ROWS
    weight = torch.randn(out_features, in_features, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True) if bias else None
    leaves = [x, weight] + ([b] if bias else [])
    grad = torch.randn(3, 29, out_features)
    ours = dense.linear(x, weight, b)
    assert type(ours.grad_fn).__name__ == "_LinearBackward"  # the kernel's, not F.linear's
    got = torch.autograd.grad(ours, leaves, grad)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    want_y = F.linear(doubles[0], doubles[1], doubles[2] if bias else None)
    want = torch.autograd.grad(want_y, doubles, grad.double())
    torch.testing.assert_close(ours.double(), want_y, atol=1e-4, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-3, rtol=1e-5)
    library.load.cache_clear()


def test_training_linear_hands_over_to_f_linear_where_the_kernel_does_not_pay(monkeypatch):
    weight = torch.randn(8, 16)
    for x, why in ((torch.randn(4, 16), "too few rows"),
                   (torch.randn(100, 16, dtype=torch.float64), "not fp32")):
        y = dense.linear(x, weight.to(x.dtype))
        assert torch.equal(y, F.linear(x, weight.to(x.dtype))), why
    monkeypatch.setattr(dense, "TRAINING_VARIANTS", ())  # a variant that loses to MKL
    x = torch.randn(100, 16, requires_grad=True)
    assert type(dense.linear(x, weight).grad_fn).__name__ != "_LinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense.linear(torch.randn(100, 16), weight).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # F.linear's own error for mismatched widths
        dense.linear(torch.randn(100, 15), weight)


def test_the_fused_heads_products(monkeypatch):
    """logits = h @ W.T against the packed weight, and into += g.T @ h (added to what `into`
    holds), against float64, for a vocabulary that ends mid-panel."""
    kernel_for_training(monkeypatch)
    torch.manual_seed(2)
    weight, h, g = torch.randn(1003, 48), torch.randn(100, 48), torch.randn(100, 1003)
    logits, add_weight_grad = dense.head_products(weight, 100)
    torch.testing.assert_close(logits(h).double(), h.double() @ weight.double().T,
                               atol=1e-4, rtol=1e-5)
    into = torch.randn(1003, 48)
    want = into.double() + g.double().T @ h.double()
    assert add_weight_grad(g, h, into) is into
    torch.testing.assert_close(into.double(), want, atol=1e-3, rtol=1e-5)
    library.load.cache_clear()
