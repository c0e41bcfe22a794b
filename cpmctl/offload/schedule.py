"""The per-layer scheduler: which expert runs when, with the next loads in flight.

For one MoE layer's tokens (already routed by `MoeFFN.route`: top-1 for BASE, top-k for the
top-k router), the experts that got tokens are put in an order:
- `index`: ascending expert index (InfMoE's released plugin);
- `heavy-first`: most tokens first (the CPM-2 paper's "heaviest compute first"): the longest
  computes come while the lighter experts' loads are in flight, so less of the loads shows;
- `resident-first`: experts already in a slot first (mixtral-offloading), then those loading
  (a prefetch), in the order the loader takes them, then the others by index: their computes
  hide the first loads.

Then a pipeline of `slots` (k >= 2): up to k experts are pinned at once — the one computing
and the next k - 1 that need a load, loading on the loader thread as soon as there is room
for them — so each load overlaps the computes before it; experts already resident or loading
are pinned at their turn. Where a GPU is present and a cost model says so, a cold expert
with few tokens is computed on the CPU from its host copy instead of being copied (Fiddler).

Cross-layer prefetch (`predict`): once the layer has asked for all of its own loads, the next
MoE layer's router is applied to this layer's input (the residual stream changes little from
one block to the next), and the experts it picks are prefetched, heaviest first, so that
their loads overlap the rest of this layer and the next block's attention; once the layer's
experts are computed, the prefetch is asked again, into the room they no longer need. After a
stack's last layer the guess for its first is that layer's last call (`wrap`). A prediction only
decides what is loaded early; the next layer routes for itself, so outputs are unchanged.
How often the prediction was right is counted (`PrefetchAccuracy`).

Exactness: each expert computes on the same rows, in the same order, as `MoeFFN.run_experts`
gives it, and the outputs are added in ascending expert index whatever the compute order, so
the layer's output is bit-identical to the fully resident model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cpmctl.models.moe import Routing
from cpmctl.offload.store import ExpertStore

ORDERS = ("index", "heavy-first", "resident-first")


def expert_order(order: str, counts: list[int], readiness: Callable[[int], tuple]) -> list[int]:
    """The experts with tokens, in the order they are computed; `readiness(e)` sorts those
    soonest ready first (`ExpertStore.readiness`)."""
    active = [e for e, n in enumerate(counts) if n]
    if order == "heavy-first":
        return sorted(active, key=lambda e: (-counts[e], e))
    if order == "resident-first":
        return sorted(active, key=lambda e: (readiness(e), e))
    return active


@dataclass
class PrefetchAccuracy:
    """Predicted experts against the experts the layer then used, summed over layer calls."""

    predicted: int = 0
    used: int = 0
    correct: int = 0  # predicted and used

    def add(self, predicted: set[int], used: set[int]) -> None:
        self.predicted += len(predicted)
        self.used += len(used)
        self.correct += len(predicted & used)

    def to_dict(self) -> dict:
        return {"predicted": self.predicted, "used": self.used, "correct": self.correct,
                "recall": self.correct / self.used if self.used else 0.0,
                "precision": self.correct / self.predicted if self.predicted else 0.0}


#: layer -> (the next MoE layer, the tokens its router would send to each of its experts)
Predict = Callable[[int], tuple[int, list[int]] | None]


class LayerScheduler:
    """`run(layer, h, routing)`: the drop-in for `MoeFFN.run_experts` of MoE layer `layer`."""

    def __init__(self, store: ExpertStore, n_experts: dict[int, int], *, slots: int,
                 order: str,
                 cpu_expert: Callable[[tuple[int, int], int], Callable | None] | None = None,
                 predict: Predict | None = None, wrap: dict[int, int] | None = None):
        self.store = store
        self.n_experts = n_experts  # per MoE layer
        self.slots = slots
        self.order = order
        # (key, tokens) -> a CPU function computing that cold expert, or None to copy it
        self.cpu_expert = cpu_expert
        self.predict = predict
        self.wrap = wrap or {}  # a stack's last MoE layer -> its first (see _prefetch_next)
        self._last_counts: dict[int, list[int]] = {}  # layer -> its last call's counts
        self.accuracy = PrefetchAccuracy()
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its call
        self.trace: list[tuple[int, list[int]]] | None = None  # a list: (layer, counts) kept

    def _prefetch_next(self, layer: int) -> list:
        """Prefetch the next MoE layer's predicted experts, heaviest first; their keys. After
        a stack's last layer, the next to run is its first again (the next decoding step, or
        the next batch of prompts), on inputs not computed yet: the guess is what that layer
        used in its last call."""
        if self.predict is None:
            return []
        guess = self.predict(layer)
        first = self.wrap.get(layer)
        if guess is None and first in self._last_counts:
            guess = first, self._last_counts[first]
        if guess is None:
            return []
        following, counts = guess
        self._predicted[following] = {e for e, n in enumerate(counts) if n}
        heaviest = expert_order("heavy-first", counts, lambda e: (0, 0))
        keys = [(following, e) for e in heaviest]
        self.store.prefetch(keys)
        return keys

    def _request_ahead(self, layer: int, following: list[int], requested: dict) -> bool:
        """Start the loads of the experts after the one computing that need one, while fewer
        than `slots - 1` are in flight ahead and the store has room for one without evicting
        what is still wanted; those resident or loading (a prefetch) are asked for at their
        turn. True when no later expert waits for its load to be started."""
        ahead = sum(1 for f in following if f in requested)
        for f in following:
            if f in requested or self.store.holds((layer, f)):
                continue
            if ahead >= self.slots - 1 or not self.store.has_room():
                return False
            requested[f] = self.store.request((layer, f))
            ahead += 1
        return True

    def run(self, layer: int, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        n_experts = self.n_experts[layer]
        # NOTE: the split is MoeFFN.run_experts' own, so every expert sees the same rows
        order = torch.argsort(routing.experts, stable=True)
        counts = torch.bincount(routing.experts, minlength=n_experts).tolist()
        self._last_counts[layer] = counts
        if self.trace is not None:
            self.trace.append((layer, counts))
        tokens = routing.tokens[order].split(counts)
        gates = routing.gates[order].split(counts)
        sequence = expert_order(self.order, counts,
                                lambda e: self.store.readiness((layer, e)))
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.accuracy.add(predicted, set(sequence))
        on_cpu = {}
        if self.cpu_expert is not None:
            for e in sequence:
                if not self.store.is_resident((layer, e)):
                    fn = self.cpu_expert((layer, e), counts[e])
                    if fn is not None:
                        on_cpu[e] = fn
        copied = [e for e in sequence if e not in on_cpu]
        self.store.begin_layer(layer, copied, counts)
        outputs: dict[int, torch.Tensor] = {}
        requested: dict[int, object] = {}
        prefetched = False
        predicted: list = []
        for e in sequence:
            if e in on_cpu:
                self.store.stats.layer(layer).cpu_computed += 1
                x = h[tokens[e]]
                outputs[e] = on_cpu[e](x.cpu()).to(x.device, x.dtype) * gates[e][:, None]
                continue
            if e not in requested:
                requested[e] = self.store.request((layer, e))
            started = self._request_ahead(layer, copied[copied.index(e) + 1:], requested)
            if started and not prefetched:  # behind this layer's own loads
                predicted = self._prefetch_next(layer)
                prefetched = True
            entry = requested.pop(e)
            module = self.store.wait(entry)
            outputs[e] = module(h[tokens[e]]) * gates[e][:, None]
            del module  # NOTE: the store may evict it now; no reference may outlive that
            self.store.release(entry)
        if not prefetched:
            predicted = self._prefetch_next(layer)
        self.store.end_layer()
        if predicted:  # again, into the room this layer's experts no longer need: those
            self.store.prefetch(predicted)  # loads overlap the next block's attention
        out = torch.zeros_like(h)
        for e in sorted(outputs):
            out = out.index_add(0, tokens[e], outputs[e].to(out.dtype))
        return out
