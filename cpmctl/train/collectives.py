"""The collectives the trainer runs itself, on the device their backend needs.

NCCL moves CUDA tensors only and gloo CPU tensors only: `collective_device` is the one place
that decides which, and every collective of the training loop (the global token count and loss
sums, the gathered RNG states, barriers) goes through `Collectives`, which creates every tensor
it hands to the backend on that device. DDP and DeepSpeed run their own collectives.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor for `backend` must live: the process's CUDA device for NCCL, else the
    CPU (gloo, and every backend that is not NCCL)."""
    return device if backend == "nccl" else torch.device("cpu")


class Collectives:
    """Sum, gather and barrier over the training processes (`comm` is torch.distributed; tests
    hand in a checking fake). With one process every call returns at once."""

    def __init__(self, world_size: int, device: torch.device, comm=dist):
        self.world_size, self.comm = world_size, comm
        backend = comm.get_backend() if world_size > 1 else "gloo"
        self.device = collective_device(backend, device)

    def sum(self, value: float) -> float:
        """The sum of every process's `value` (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.comm.all_reduce(tensor)
        return float(tensor.item())

    def gather_json(self, value) -> list:
        """Every process's JSON-safe `value`, in rank order (as UTF-8 bytes: no pickle)."""
        if self.world_size == 1:
            return [value]
        data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8,
                            device=self.device)
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device)
                 for _ in range(self.world_size)]
        self.comm.all_gather(sizes, torch.tensor([data.numel()], device=self.device))
        longest = int(max(int(size.item()) for size in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data
        parts = [torch.empty_like(padded) for _ in sizes]
        self.comm.all_gather(parts, padded)
        return [json.loads(bytes(part[:int(size.item())].tolist()).decode("utf-8"))
                for part, size in zip(parts, sizes, strict=True)]

    def barrier(self) -> None:
        if self.world_size > 1:
            self.comm.barrier()
