"""cpmctl's fp32/bf16 matmul (dense_matmul.c through packed.py): against a float64 product for
every row-count tail and ragged shape, independent of the batch to the bit, and refusing what it
would read past."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpmctl.infer import int8_kernel, packed
from cpmctl.infer.packed import CPMCTL, PackedLinear


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request, monkeypatch):
    """A dtype the dense kernel runs here (skipped where this CPU or build has none for it)."""
    monkeypatch.delenv(int8_kernel.KERNEL_ENV, raising=False)
    int8_kernel.library.cache_clear()
    if packed.kernel_for(request.param) != CPMCTL:
        pytest.skip(f"no cpmctl dense kernel for {request.param} here (needs AVX-512)")
    yield request.param
    int8_kernel.library.cache_clear()


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


def test_dense_matmul_refuses_what_it_would_read_past(dtype):
    _, ours = layer(40, 24, dtype)
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    for x, what in ((torch.randn(2, 25).to(dtype), "25 features"),
                    (torch.randn(2, 24).to(other), str(other))):
        with pytest.raises(ValueError, match=what):
            ours(x)
    with pytest.raises(ValueError, match="packed weight"):
        packed.check_layer(ours.packed[:1], ours.bias, 40, 24)
    with pytest.raises(ValueError, match="bias"):
        packed.check_layer(ours.packed, ours.bias[:3], 40, 24)


def test_the_dense_op_traces_through_its_fake(dtype):
    _, ours = layer(40, 24, dtype)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.cpmctl.dense_matmul(torch.empty(3, 24, dtype=dtype), ours.packed, None, 40)
    assert y.shape == (3, 40) and y.dtype == dtype
