"""Compute a cold expert on the CPU instead of copying it to the GPU (Fiddler's idea), when a
cost model measured at start-up says that is faster.

A copy costs the expert's bytes over the host-to-device bus (timed on a real copy of one
expert from pinned memory); a CPU compute costs `fixed + per_token * tokens` (timed on the
same expert at two batch sizes, module construction included, as `cpu_function` runs it), plus
moving the tokens' activations both ways, which is small next to the weights. With few tokens
(decoding) the CPU wins; with many (a long prefill) the copy does. Only used where CUDA is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CostModel:
    copy_s: float  # one expert, host to device
    cpu_fixed_s: float
    cpu_per_token_s: float

    def cpu_is_cheaper(self, tokens: int) -> bool:
        return self.cpu_fixed_s + self.cpu_per_token_s * tokens < self.copy_s

    def to_dict(self) -> dict:
        return {"copy_ms": 1e3 * self.copy_s, "cpu_fixed_ms": 1e3 * self.cpu_fixed_s,
                "cpu_per_token_ms": 1e3 * self.cpu_per_token_s,
                "break_even_tokens": max(0.0, (self.copy_s - self.cpu_fixed_s)
                                         / max(self.cpu_per_token_s, 1e-12))}


def _best_of(fn: Callable[[], None], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_cost_model(host_tensors: list[torch.Tensor], device: torch.device,
                       cpu_function: Callable[[torch.Tensor], torch.Tensor],
                       d_model: int, dtype: torch.dtype) -> CostModel:
    """Time one expert's copy to `device` and its CPU compute at 1 and 64 tokens."""
    def copy() -> None:
        for t in host_tensors:
            t.to(device, non_blocking=True)
        torch.cuda.synchronize(device)

    def cpu(tokens: int) -> Callable[[], None]:
        x = torch.randn(tokens, d_model, dtype=dtype)
        return lambda: cpu_function(x)

    copy()  # warm-up
    small, large = _best_of(cpu(1)), _best_of(cpu(64))
    per_token = max(0.0, (large - small) / 63)
    return CostModel(copy_s=_best_of(copy), cpu_fixed_s=max(0.0, small - per_token),
                     cpu_per_token_s=per_token)
