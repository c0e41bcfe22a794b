"""cpmctl's int8 matmul (cpmctl/infer/int8_matmul.c): its numbers against the dequantized
product for awkward shapes, NaN, sums that would overflow int32 unflushed; the packed layout; its
build (cached, atomic) and the fall-back to PyTorch's kernel where it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cpmctl.errors import CpmError
from cpmctl.infer.quantize import Int8Linear, quantize_int8
from cpmctl.kernels import int8, library


@pytest.fixture(params=["native", "x86-64-v3"])
def native(request, monkeypatch):
    """cpmctl's kernel built for this CPU, and for AVX2 alone (x86-64-v3: what a CPU without
    AVX-512 VNNI runs); skipped only on a machine that cannot build it."""
    monkeypatch.delenv(library.KERNEL_ENV, raising=False)
    monkeypatch.setenv(library.MARCH_ENV, request.param)
    library.load.cache_clear()
    if library.load() is None:
        pytest.skip(f"cpmctl's int8 kernel cannot be built here for {request.param}")
    if request.param == "x86-64-v3":
        assert int8.kernel_name() == "cpmctl avx2"
    yield
    monkeypatch.undo()
    library.load.cache_clear()


def exact(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The product in fp64 from the layer's own int8 weights and scales."""
    weight = layer.int8_weight().double() * layer.scales.double()[:, None]
    y = x.double() @ weight.T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize(("rows", "inputs", "outputs", "bias"), [
    (1, 64, 48, True),     # a decoding step
    (3, 48, 50, False),    # inputs not a multiple of 32, outputs not of 4, an odd row count
    (8, 768, 2304, True),  # a batch of 8 through CPM-Small's fused QKV
    (37, 100, 7, True),    # a prefill: many rows, fewer outputs than a block
])
def test_matches_the_dequantized_product(native, rows, inputs, outputs, bias):
    torch.manual_seed(rows)
    layer = Int8Linear.from_linear(torch.nn.Linear(inputs, outputs, bias=bias))
    x = torch.randn(rows, inputs).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, outputs)
    reference = exact(x, layer)
    # bf16 output rounding (2^-9) dominates; the int16 activations add ~1e-5 of max |x|
    assert ((y.double() - reference).abs() <= 2 ** -8 * reference.abs() + 1e-3).all()


def test_no_rows_and_rows_of_zeros_or_almost(native):
    """1e-36 is a valid bf16 value, but 32767 / 1e-36 overflows fp32: taken for zeros."""
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 8))
    assert layer(torch.zeros(0, 64, dtype=torch.bfloat16)).shape == (0, 8)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[1] = 1e-36
    torch.testing.assert_close(layer(x), layer.bias.bfloat16().expand(2, 8))


def test_a_row_with_nan_or_inf_gives_nan_and_leaves_the_others_alone(native):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 8, bias=False))
    x = torch.randn(3, 64).bfloat16()
    x[0, 5], x[2, 9] = float("nan"), float("inf")
    y = layer(x)
    assert y[0].isnan().all() and y[2].isnan().all()
    torch.testing.assert_close(y[1].double(), exact(x[1:2], layer)[0], rtol=2 ** -8, atol=1e-3)


def test_a_rows_scale_sees_every_input_eight_at_a_time_and_in_the_tail(native):
    """67 inputs: the quantizer takes 64 eight at a time, the last 3 one by one."""
    layer = Int8Linear.from_linear(torch.nn.Linear(67, 8, bias=False))
    torch.manual_seed(0)
    x = torch.randn(4, 67).bfloat16()
    x[0, 66], x[1, 3], x[2, 65] = float("nan"), float("-inf"), 40.0  # [2]: its max in the tail
    x[3, 7] = -40.0  # the max in the last lane of a vector, negative
    y = layer(x)
    assert y[0].isnan().all() and y[1].isnan().all()
    torch.testing.assert_close(y[2:].double(), exact(x[2:], layer), rtol=2 ** -8, atol=1e-3)


def test_long_rows_of_extreme_values_do_not_overflow(native):
    """10,240 inputs (CPM-2's FFN) at full scale: 127 x 32767 per product, 640 products per
    int32 lane (2.7e9 > 2^31): right only if the lanes are flushed to fp32 in time."""
    inputs = 10_240
    linear = torch.nn.Linear(inputs, 4, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.weight[1] = -1.0
        linear.weight[2, ::2] = -1.0
    layer = Int8Linear.from_linear(linear)
    y = layer(torch.full((1, inputs), 3.0, dtype=torch.bfloat16)).double()[0]
    torch.testing.assert_close(y, torch.tensor([3.0 * inputs, -3.0 * inputs, 0.0, 3.0 * inputs],
                                               dtype=torch.float64), rtol=2 ** -8, atol=0.0)


def test_pack_and_unpack_are_inverse(native):
    q = torch.randint(-127, 128, (10, 70), dtype=torch.int8)
    packed = int8.pack(q)
    assert packed.shape == (3, 3, 4, 32)  # 10 rows -> 3 blocks of 4, 70 inputs -> 3 slices
    assert torch.equal(int8.unpack(packed, 10, 70), q)
    assert packed.view(-1)[:32].tolist() == q[0, :32].tolist()  # a block's first slice, row 0
    assert packed.view(-1)[32:64].tolist() == q[1, :32].tolist()  # ... then row 1


def test_both_kernels_agree(native, monkeypatch):
    torch.manual_seed(3)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(5, 96).bfloat16()
    with torch.no_grad():
        ours = Int8Linear.from_linear(linear)
        assert ours.kernel == int8.kernel_name() != int8.TORCH
        ours = ours(x).float()
        monkeypatch.setenv(library.KERNEL_ENV, "torch")
        library.load.cache_clear()
        theirs = Int8Linear.from_linear(linear)(x).float()
    assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()


def test_the_build_is_cached_and_leaves_no_partial_file(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library.load.cache_clear()
    if library.load() is None:
        pytest.skip("cpmctl's int8 kernel cannot be built here (no C compiler or AVX-512 VNNI)")
    built = list((tmp_path / "cpmctl" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    library.load.cache_clear()
    assert library.load() is not None
    assert [p.stat().st_mtime_ns for p in built[0].parent.iterdir()] == [stamp]  # not rebuilt
    library.load.cache_clear()
    # damaged (a full disk): dropped, then rebuilt. In a new file and a new process: this one
    # has the library mapped (writing into it would crash us) and dlopen would reuse that.
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not a library")
    damaged.replace(built[0])
    probe = ("from cpmctl.kernels import library as k\n"
             "print(k.load() is None, k.load.cache_clear() or k.load() is not None)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, timeout=120)
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert built[0].stat().st_size > 1000


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_int8_runs_on_pytorchs_kernel(monkeypatch, tmp_path,
                                                                   compiler):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    library.load.cache_clear()
    try:
        assert int8.kernel_name() == int8.TORCH
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 8))
        assert layer.kernel == int8.TORCH and layer.weight.shape == (8, 64)
        assert not list(tmp_path.rglob("*.so*"))  # a failed build leaves nothing behind
    finally:
        library.load.cache_clear()


def test_input_sizes_pytorchs_kernel_cannot_take(int8_kernel_choice):
    """PyTorch's kernel needs inputs in multiples of 16 (a model with other sizes is refused);
    cpmctl's pads them."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 8))
    x = torch.randn(2, 40)
    if int8_kernel_choice == int8.TORCH:
        with pytest.raises(CpmError, match=r"layer 0 has 40 inputs; .* multiple of 16"):
            quantize_int8(model)
        return
    with torch.no_grad():
        reference = model(x)
        y = quantize_int8(model)(x.bfloat16()).float()
    assert (y - reference).abs().max() < 0.02 * reference.abs().max()
