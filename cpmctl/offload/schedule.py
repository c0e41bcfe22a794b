"""The per-layer scheduler: which expert runs when, with the next loads in flight.

For one MoE layer's tokens (already routed by `MoeFFN.route`: top-1 for BASE, top-k for the
top-k router), the experts that got tokens are put in an order:
- `index`: ascending expert index (InfMoE's released plugin);
- `heavy-first`: most tokens first (the CPM-2 paper's "heaviest compute first"): the longest
  computes come while the lighter experts' loads are in flight, so less of the loads shows;
- `resident-first`: experts already in a slot first (mixtral-offloading), then the others
  by index: their computes hide the first loads.

Then a pipeline of `slots` (k >= 2): up to k experts are pinned at once — the one computing
and the next k - 1 loading on the loader thread — so each load overlaps the computes before
it. Where a GPU is present and a cost model says so, a cold expert with few tokens is computed
on the CPU from its host copy instead of being copied (Fiddler).

Exactness: each expert computes on the same rows, in the same order, as `MoeFFN.run_experts`
gives it, and the outputs are added in ascending expert index whatever the compute order, so
the layer's output is bit-identical to the fully resident model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cpmctl.models.moe import Routing
from cpmctl.offload.store import ExpertStore

ORDERS = ("index", "heavy-first", "resident-first")


def expert_order(order: str, counts: list[int], resident: Callable[[int], bool]) -> list[int]:
    """The experts with tokens, in the order they are computed."""
    active = [e for e, n in enumerate(counts) if n]
    if order == "heavy-first":
        return sorted(active, key=lambda e: (-counts[e], e))
    if order == "resident-first":
        return sorted(active, key=lambda e: (not resident(e), e))
    return active


class LayerScheduler:
    """`run(layer, h, routing)`: the drop-in for `MoeFFN.run_experts` of MoE layer `layer`."""

    def __init__(self, store: ExpertStore, n_experts: dict[int, int], *, slots: int,
                 order: str,
                 cpu_expert: Callable[[tuple[int, int], int], Callable | None] | None = None):
        self.store = store
        self.n_experts = n_experts  # per MoE layer
        self.slots = slots
        self.order = order
        # (key, tokens) -> a CPU function computing that cold expert, or None to copy it
        self.cpu_expert = cpu_expert

    def run(self, layer: int, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        n_experts = self.n_experts[layer]
        # NOTE: the split is MoeFFN.run_experts' own, so every expert sees the same rows
        order = torch.argsort(routing.experts, stable=True)
        counts = torch.bincount(routing.experts, minlength=n_experts).tolist()
        tokens = routing.tokens[order].split(counts)
        gates = routing.gates[order].split(counts)
        sequence = expert_order(self.order, counts,
                                lambda e: self.store.is_resident((layer, e)))
        on_cpu = {}
        if self.cpu_expert is not None:
            for e in sequence:
                if not self.store.is_resident((layer, e)):
                    fn = self.cpu_expert((layer, e), counts[e])
                    if fn is not None:
                        on_cpu[e] = fn
        copied = [e for e in sequence if e not in on_cpu]
        self.store.begin_layer(layer, copied)
        outputs: dict[int, torch.Tensor] = {}
        requested: dict[int, object] = {}
        ahead = 0
        for e in sequence:
            if e in on_cpu:
                self.store.stats.layer(layer).cpu_computed += 1
                x = h[tokens[e]]
                outputs[e] = on_cpu[e](x.cpu()).to(x.device, x.dtype) * gates[e][:, None]
                continue
            position = copied.index(e)
            while ahead < len(copied) and ahead < position + self.slots:
                requested[copied[ahead]] = self.store.request((layer, copied[ahead]))
                ahead += 1
            entry = requested.pop(e)
            module = self.store.wait(entry)
            outputs[e] = module(h[tokens[e]]) * gates[e][:, None]
            del module  # NOTE: the store may evict it now; no reference may outlive that
            self.store.release(entry)
        out = torch.zeros_like(h)
        for e in sorted(outputs):
            out = out.index_add(0, tokens[e], outputs[e].to(out.dtype))
        return out
