"""Hand freed activation memory back to the system at once (glibc), for training processes.

A training step allocates its activations (megabytes each), frees them after the backward pass,
and allocates them again in the next step. glibc serves a large allocation with its own mmap and
returns it on free, but raises that threshold to the size of each such block freed (up to 32 MB):
from the second step on the activations come from the heap, whose freed middle parts stay
resident, and fragmentation between steps makes the resident set grow beyond one step's need
(measured for prompt tuning at CPM-Small: peak RSS 1,338 MB with the sliding threshold, 1,152 MB
with it fixed at 128 KiB; the step time did not change measurably). A fixed threshold
(`M_MMAP_THRESHOLD`, as the `MALLOC_MMAP_THRESHOLD_` environment variable sets it) keeps every
block of 128 KiB or more on its own mapping. Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; True where it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
