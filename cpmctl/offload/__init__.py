"""Offloaded MoE inference (`cpmctl generate --offload`): experts live off the slots — in the
model's files or host memory — and are loaded into a fixed budget of slots as the router asks
for them, the next expert's load overlapping the current expert's compute.

    store.py      the tiers, the slots and their cache policy, the loader thread, prefetches,
                  measured bytes
    schedule.py   the per-layer scheduler: expert orders, the k-slot pipeline, the
                  cross-layer prediction of the next layer's experts
    costs.py      CPU compute instead of a copy to the GPU (Fiddler), by a measured cost
    engine.py     load_offloaded(): the dense part resident, each MoE layer's experts offloaded
"""

from cpmctl.offload.engine import (
    TIERS,
    OffloadedModel,
    OffloadSettings,
    load_offloaded,
    load_offloaded_for_inference,
    summary_line,
)
from cpmctl.offload.schedule import ORDERS

__all__ = ["ORDERS", "TIERS", "OffloadSettings", "OffloadedModel", "load_offloaded",
           "load_offloaded_for_inference", "summary_line"]
