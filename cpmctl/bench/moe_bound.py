"""How many expert loads no cache policy can avoid, and the throughput that leaves.

The offloaded runs of `bench moe` route exactly as the resident model does (their tokens are
the same), so the sequence of experts a run uses — per MoE layer call, the experts that got
tokens — is fixed by the model and the prompts. Belady's MIN (evict the expert whose next use
is furthest away) needs the fewest loads of any policy for a cache of `capacity` experts;
prefetching moves loads earlier but cannot make them fewer. With every load overlapped with
compute, a run still takes at least max(resident time, minimum loads x bytes / bandwidth):
that is the ceiling this module reports beside the measured runs.

Decoding alone: every layer's first call is in the prefill (the prompt's forward pass), so
the decoding calls are the rest; the fewest loads they need, from the best possible cache
contents at the start of decoding, is MIN on them from empty less the first `capacity`
distinct experts (which a prefilled cache would hold: MIN from empty loads them without
evicting, and no starting state saves more than `capacity` loads).
"""

from __future__ import annotations

from collections.abc import Sequence

#: one MoE layer call: (layer, tokens routed to each of its experts)
Call = tuple[int, Sequence[int]]


def uses(calls: Sequence[Call]) -> list[tuple[int, int]]:
    """The (layer, expert) keys in the order a heavy-first pipeline asks for them."""
    keys = []
    for layer, counts in calls:
        active = sorted((e for e, n in enumerate(counts) if n), key=lambda e: (-counts[e], e))
        keys.extend((layer, e) for e in active)
    return keys


def min_loads(keys: Sequence[tuple[int, int]], capacity: int) -> int:
    """Belady's MIN: the fewest loads that serve `keys` in order with `capacity` resident,
    starting empty."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    never = len(keys)
    following = [never] * len(keys)  # position of the next use of the same key
    seen: dict[tuple[int, int], int] = {}
    for position in range(len(keys) - 1, -1, -1):
        following[position] = seen.get(keys[position], never)
        seen[keys[position]] = position
    resident: dict[tuple[int, int], int] = {}  # key -> its next use
    loads = 0
    for position, key in enumerate(keys):
        if key not in resident:
            loads += 1
            if len(resident) >= capacity:
                del resident[max(resident, key=resident.__getitem__)]
        resident[key] = following[position]
    return loads


def decode_calls(calls: Sequence[Call]) -> list[Call]:
    """The calls after each layer's first (the prefill's)."""
    first: set[int] = set()
    out = []
    for layer, counts in calls:
        if layer in first:
            out.append((layer, counts))
        first.add(layer)
    return out


def decode_min_loads(decoding: Sequence[tuple[int, int]], capacity: int) -> int:
    """The fewest loads of the decoding uses from the best cache contents (module doc)."""
    return max(0, min_loads(decoding, capacity) - min(capacity, len(set(decoding))))


def load_bound(calls: Sequence[Call], capacity: int, *, expert_bytes: int,
               bandwidth_bytes_s: float, resident_s: float, resident_decode_s: float,
               experts: int = 0) -> dict:
    """The fewest loads of the whole run and of its decoding, the bus time they take at
    `bandwidth_bytes_s`, and the best × resident that leaves (every load overlapped); with
    `experts` (all of the model's), the decoding ceiling at other resident fractions too."""
    later = decode_calls(calls)
    keys, decoding = uses(calls), uses(later)
    whole = min_loads(keys, capacity)
    decode = decode_min_loads(decoding, capacity)
    whole_s = whole * expert_bytes / bandwidth_bytes_s
    decode_s = decode * expert_bytes / bandwidth_bytes_s
    layers = len({layer for layer, _ in later})

    def ceiling(loads: int) -> float | None:
        bus = loads * expert_bytes / bandwidth_bytes_s
        return resident_decode_s / max(resident_decode_s, bus) if resident_decode_s > 0 \
            else None

    by_fraction = {f"{fraction:g}": ceiling(decode_min_loads(decoding, round(fraction * experts)))
                   for fraction in (0.25, 0.5, 0.75, 0.9) if round(fraction * experts) >= 1}
    return {
        "capacity_experts": capacity, "uses": len(keys), "distinct_experts": len(set(keys)),
        "min_loads": whole, "min_bus_s": whole_s,
        "ceiling_vs_resident": resident_s / max(resident_s, whole_s),
        "decode_uses": len(decoding), "decode_steps": len(later) // layers if layers else 0,
        "decode_min_loads": decode, "decode_min_bus_s": decode_s,
        "decode_ceiling_vs_resident": ceiling(decode),
        "decode_ceiling_by_resident_fraction": by_fraction,
    }
