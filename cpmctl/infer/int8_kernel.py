"""cpmctl's own int8 weight-only matmul (int8_matmul.c), compiled for this CPU on first use.

Why not only PyTorch's kernel: `torch._weight_int8pack_mm` converts every weight to fp32
before its multiply-add and reads four rows at once in short strides; on CPM-Small's decoding
step (49 matmuls, 108 MB of int8 weights) it reached 15 GB/s on 2 cores here, while the memory
delivers ~50 GB/s. The C kernel widens each weight once to int16 and multiplies it with integer
dot-product instructions (AVX-512 VNNI: 32 products per instruction; AVX2 everywhere else on
x86-64) against activations quantized to int16 on the fly, from a layout read front to back
(pack()): 30-38 GB/s on the same step with AVX-512 VNNI, 2x PyTorch's kernel.

The library is built with the C compiler ($CC, else cc) for `-march=native` (or
$CPMCTL_INT8_MARCH, e.g. x86-64-v3 for a cluster's oldest CPUs) into
$XDG_CACHE_HOME/cpmctl/kernels (~/.cache by default), named by a hash of the source, the flags
and the CPU, and loaded with ctypes; it runs its threads in the OpenMP runtime PyTorch has
already loaded (the same libgomp), as many as `torch.get_num_threads()`. Where there is no
compiler, no AVX2, or the build fails, `library()` is None and quantize.py uses PyTorch's
kernel; `CPMCTL_INT8_KERNEL=torch` forces that (to compare the two; it also turns off the
library's other kernels: generation's attention, attend.c, and the fp32/bf16 matmul,
dense_matmul.c). A build that fails warns once, with the compiler's last lines.

C trusts its pointers, so `matmul` checks every argument against the layer's shapes, dtypes and
device first (an input wider than the layer would otherwise be read and written past its
buffers). The call is the custom op `cpmctl::int8_matmul` (torch.library), so PyTorch checks
its schema, the profiler names it, and torch.compile traces it through its fake implementation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cpmctl.console import warn

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("int8_matmul.c", "attend.c", "dense_matmul.c"))
HEADERS = (Path(__file__).with_name("bf16.h"),)
"""Built into one library: the int8 matmul, the attention of generation's planned steps
(attention_kernel.py) and the fp32/bf16 matmul of inference's linear layers (packed.py)."""
KERNEL_ENV, MARCH_ENV = "CPMCTL_INT8_KERNEL", "CPMCTL_INT8_MARCH"
TORCH = "torch _weight_int8pack_mm"


def kernel_name() -> str:
    """Which kernel int8 layers made now will run: "cpmctl <variant>" (avx512-vnni, avx-vnni,
    avx2) or TORCH."""
    lib = library()
    return TORCH if lib is None else f"cpmctl {lib.cpmctl_int8_variant().decode()}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built if need be; None where it cannot run here."""
    if os.environ.get(KERNEL_ENV, "auto") == "torch" or platform.machine() not in ("x86_64",
                                                                                    "AMD64"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    path = _cache_dir() / f"int8_matmul-{_build_key(compiler)}.so"
    if not path.exists() and not _build(compiler, path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged file: PyTorch's kernel this time, a fresh build next time
        path.unlink(missing_ok=True)
        return None
    lib.cpmctl_int8_variant.restype = ctypes.c_char_p
    lib.cpmctl_int8_matmul.restype = ctypes.c_int
    lib.cpmctl_int8_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_dense_layout.restype = ctypes.c_int
    lib.cpmctl_dense_matmul.restype = ctypes.c_int
    lib.cpmctl_dense_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_attend.restype = ctypes.c_int
    lib.cpmctl_attend.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return lib


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpmctl" / "kernels"


def _march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def _build_key(compiler: str) -> str:
    """A hash of what the binary depends on: the source, the compiler and its target, the CPU's
    features."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(f"{compiler}\0{_march()}".encode())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        digest.update("".join(line for line in cpuinfo
                              if line.startswith(("flags", "model name"))).encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:16]


def _build(compiler: str, path: Path) -> bool:
    """Compile into a temporary file beside `path`, then rename: a process that finds `path`
    finds a whole library. False when the compiler refuses (no AVX2, no OpenMP)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".so.partial")
        os.close(fd)
    except OSError:
        return False
    try:
        done = subprocess.run(
            [compiler, "-O3", f"-march={_march()}", "-fopenmp", "-fPIC", "-shared",
             *map(str, SOURCES), "-o", temporary], capture_output=True)
        if done.returncode == 0:
            os.replace(temporary, path)
            return True
        _warn_fallback(done.stderr.decode("utf-8", "replace"))
        return False
    except OSError as exc:  # the compiler could not be run
        _warn_fallback(str(exc))
        return False
    finally:
        Path(temporary).unlink(missing_ok=True)


def _warn_fallback(output: str) -> None:
    """Once per process (library() is cached): why int8 runs on PyTorch's slower kernel."""
    last = [line for line in output.strip().splitlines() if line.strip()][-3:]
    warn("cpmctl's int8 kernel did not build, so int8 runs on PyTorch's kernel (about half "
         f"as fast); the compiler said: {' | '.join(last) or 'nothing'}")


def _layout() -> tuple[int, int]:
    """(output channels per block, inputs per slice) of the packed layout, from the library."""
    lib = library()
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
    status = library().cpmctl_int8_matmul(
        x.data_ptr(), rows, in_features, packed.data_ptr(), scales.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
        packed.shape[1] * packed.shape[3], torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"int8 matmul: no memory for {rows} x {in_features} activations")
    return y


# NOTE: registered through torch.library.Library rather than the @custom_op decorator: the
# decorator's Python wrapper costs ~15 us a call here, the plain registration ~3 us, and a
# decoding step makes ~50 of these calls.
_LIBRARY = torch.library.Library("cpmctl", "FRAGMENT")
_LIBRARY.define("int8_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? bias, "
                "int out_features) -> Tensor")
_LIBRARY.impl("int8_matmul", _compute, "CPU")


@torch.library.register_fake("cpmctl::int8_matmul")
def _fake(x, packed, scales, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)


OP = torch.ops.cpmctl.int8_matmul.default


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
