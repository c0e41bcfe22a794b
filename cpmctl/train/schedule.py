"""Learning-rate schedules: `learning_rate(step, train)` for cosine, linear, noam and constant.

No LambdaLR: the trainer sets the rate itself before each optimizer step, so the rate is a pure
function of the step number (nothing to save or restore on resume):

    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, recipe.train)
    optimizer.step()

`step` is the number of optimizer steps already taken (0 for the first step, train.steps - 1
for the last). Let s = step + 1, the number of the step being taken, and W = train.warmup:

- warmup, s <= W: lr × s / W, linear from 0 (the first step already moves: lr / W), reaching
  the peak lr at the last warmup step (step W - 1);
- cosine: min + (lr - min) × (1 + cos(π p)) / 2 and linear: lr - (lr - min) × p, with
  min = lr × min_lr_ratio and p = (s - W) / (train.steps - W), so the last step (s =
  train.steps) uses exactly min; past train.steps the rate stays at min;
- noam: lr × sqrt(W / s), the inverse square root normalised to peak at lr when s = W
  (cpmctl's noam peaks at train.lr; see recipes/cpm2.toml); needs W >= 1;
- constant: lr after the warmup.
"""

from __future__ import annotations

import math

from ..errors import CpmError
from ..recipe import SCHEDULES, TrainConfig

__all__ = ["learning_rate"]


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) under `train`'s schedule."""
    if step < 0:
        raise CpmError(f"step must be >= 0, got {step}")
    if train.schedule not in SCHEDULES:
        raise CpmError(f"train.schedule must be one of {', '.join(SCHEDULES)}, "
                       f"not {train.schedule!r}")
    peak, warmup, s = train.lr, train.warmup, step + 1
    if train.schedule == "noam":
        if warmup < 1:
            raise CpmError("train.schedule noam needs a warmup (set train.warmup_steps or "
                           "train.warmup_ratio)")
        return peak * s / warmup if s <= warmup else peak * math.sqrt(warmup / s)
    if s <= warmup:
        return peak * s / warmup
    if train.schedule == "constant":
        return peak
    low = peak * train.min_lr_ratio
    progress = min((s - warmup) / max(train.steps - warmup, 1), 1.0)
    if train.schedule == "linear":
        return peak - (peak - low) * progress
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
