"""What this machine can hold: checked before a large allocation, so that an impossible size is
a one-line error naming what asked for it instead of a crash or the allocator's exit."""

from __future__ import annotations

from cpmctl.errors import CpmError


def available_bytes(device) -> int | None:
    """Memory free for new allocations on `device` (a torch.device or its type string):
    MemAvailable on the CPU, the free memory of a CUDA device; None where it is unknown."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def human_bytes(count: float) -> str:
    """A byte count in binary units, as --memory-budget takes them: '1.50 MiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def check_fits(nbytes: int, device, what: str, advice: str) -> None:
    """A CpmError when `nbytes` for `what` exceed the memory available on `device`."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise CpmError(f"{what} needs {human_bytes(nbytes)}; {human_bytes(free)} is available "
                       f"here: {advice}")
