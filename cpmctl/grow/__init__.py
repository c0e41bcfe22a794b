"""Parameter inheritance (docs/design.md §7): grow a bigger model out of a smaller one.

    path, lineage = grow("runs/small/final", recipe.model, "models/big", GrowOptions())

Each operator is a function from a model (its state dict) and config to a grown one, plus a
record for the lineage: vocab.py (a bigger tokenizer merged by piece string), width.py (×k
block-diagonal copies), depth.py (identity blocks appended or interleaved), moe.py (dense ->
MoE, every expert a copy). compose.py compares the source's architecture with the recipe's,
applies the operators that bridge them, and measures the largest change of a logit on a probe
batch; the grown model's meta records that lineage.
"""

from .compose import GrowOptions, check_growable, grow, grow_model

__all__ = ["GrowOptions", "check_growable", "grow", "grow_model"]
