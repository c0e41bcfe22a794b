"""cpmctl's C kernels (int8_matmul.c, attend.c, dense_matmul.c, blocks.c), compiled for this
CPU into one library on first use.

The library is built with the C compiler ($CC, else cc) for `-march=native` (or
$CPMCTL_INT8_MARCH, e.g. x86-64-v3 for a cluster's oldest CPUs) into
$XDG_CACHE_HOME/cpmctl/kernels (~/.cache by default), named by a hash of the sources, the flags
and the CPU, and loaded with ctypes; it runs its threads in the OpenMP runtime PyTorch has
already loaded (the same libgomp), as many as `torch.get_num_threads()`. Where there is no
compiler, no AVX2 + FMA, or the build fails, `load()` is None and every caller uses PyTorch
instead: int8 layers PyTorch's int8 kernel (int8.py), generation PyTorch's attention
(attention.py) through the module forward, fp32/bf16 layers oneDNN or PyTorch's matmul
(dense.py). `CPMCTL_INT8_KERNEL=torch` forces that
(the variable's name is older than the other kernels), to compare. A build that fails warns
once, with the compiler's last lines.

C trusts its pointers: each kernel's module checks every argument against the others before the
call. Each kernel is also a custom op (torch.library), which torch.compile traces through its
fake implementation and the profiler names; outside those, calls skip the dispatcher
(define_op).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cpmctl.console import warn

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("int8_matmul.c", "attend.c", "dense_matmul.c", "blocks.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("bf16.h", "simd.h"))
KERNEL_ENV, MARCH_ENV = "CPMCTL_INT8_KERNEL", "CPMCTL_INT8_MARCH"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, built if need be; None where it cannot run here."""
    if os.environ.get(KERNEL_ENV, "auto") == "torch" or platform.machine() not in ("x86_64",
                                                                                    "AMD64"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    path = _cache_dir() / f"cpmctl-kernels-{_build_key(compiler)}.so"
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
    lib.cpmctl_dense_variant.restype = ctypes.c_char_p
    lib.cpmctl_dense_matmul.restype = ctypes.c_int
    lib.cpmctl_dense_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_dense_gemm_f32.restype = ctypes.c_int
    lib.cpmctl_dense_gemm_f32.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_dense_pack.restype = ctypes.c_int
    lib.cpmctl_dense_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_attend.restype = ctypes.c_int
    lib.cpmctl_attend.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cpmctl_gpt_layers.restype = ctypes.c_int
    lib.cpmctl_gpt_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.cpmctl_decoder_layers.restype = ctypes.c_int
    lib.cpmctl_decoder_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int]
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
    finds a whole library. False when the compiler refuses (no AVX2 + FMA, no OpenMP)."""
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
    """Once per process (load() is cached): why PyTorch's slower kernels run instead."""
    last = [line for line in output.strip().splitlines() if line.strip()][-3:]
    warn("cpmctl's kernels did not build, so int8 runs on PyTorch's kernel (about half as "
         "fast) and fp32/bf16 generation on PyTorch's matmul and attention; the compiler said: "
         f"{' | '.join(last) or 'nothing'}")


# NOTE: registered through torch.library.Library rather than the @custom_op decorator: the
# decorator's Python wrapper costs ~15 us a call here, the plain registration ~3-6 us, and a
# decoding step makes ~60 of these calls, so define_op's callers skip even that where nothing
# needs the dispatcher.
_OPS = torch.library.Library("cpmctl", "FRAGMENT")


def define_op(schema: str, compute: Callable, fake: Callable) -> Callable[..., torch.Tensor]:
    """The op `cpmctl::NAME` of `schema` ("NAME(args) -> Tensor"): `compute` on CPU tensors,
    `fake` (the output's shape and dtype from the inputs') for torch.compile's tracing.
    Returns the function to call it by: through the dispatcher while torch.compile traces or
    the profiler records (which then names the op), else `compute` itself, directly."""
    name = schema.split("(", 1)[0]
    _OPS.define(schema)
    _OPS.impl(name, compute, "CPU")
    torch.library.register_fake(f"cpmctl::{name}")(fake)
    op = getattr(torch.ops.cpmctl, name).default

    def call(*args) -> torch.Tensor:
        if torch.compiler.is_compiling() or _profiling():
            return op(*args)
        return compute(*args)

    return call


# NOTE: a private PyTorch function (what record_function asks); without it, always profiling
_profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def profiled(name: str) -> contextlib.AbstractContextManager:
    """A range named `name` in the profiler's trace while it records (a C call that is not an
    op, such as blocks.py's, is otherwise invisible to it); else nothing, at no cost."""
    return torch.profiler.record_function(name) if _profiling() else contextlib.nullcontext()
