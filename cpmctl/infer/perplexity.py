"""Perplexity of a GPT on held-out token ids: how much a precision or a quantization costs.

    ppl_bf16 = perplexity(bf16_model, ids)
    ppl_int8 = perplexity(int8_model, ids)        # quantize.py; expect within ~2% of bf16

The ids (a 1-d tensor, e.g. a dataset's validation split) are cut into windows of `window + 1`
tokens that overlap by one, so every token but the first is predicted exactly once, from at
most `window` tokens before it inside its window; the tail that does not fill a window is left
out. Perplexity = exp(mean negative log-likelihood), the loss computed in fp32 whatever the
model's precision, through the model's own LM head (an int8 head when quantized).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl.errors import CpmError


def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean NLL) over `ids`; `window` defaults to the model's context
    (model.max_positions)."""
    cfg = model.cfg
    if cfg.arch != "gpt":
        raise CpmError("perplexity is measured on gpt models (an encdec model's loss depends "
                       "on its span corruption)")
    window = window or cfg.max_positions
    if not 1 <= window <= cfg.max_positions:
        raise CpmError(f"the window must be between 1 and model.max_positions "
                       f"({cfg.max_positions}), got {window}")
    ids = ids.reshape(-1).long()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < cfg.vocab_size:
        raise CpmError(f"token ids must be in [0, {cfg.vocab_size}) (model.vocab_size), got "
                       f"{int(ids.min())}..{int(ids.max())}")
    count = (ids.numel() - 1) // window
    if count < 1:
        raise CpmError(f"perplexity needs at least {window + 1} tokens, got {ids.numel()}")
    starts = torch.arange(count) * window
    windows = ids[starts[:, None] + torch.arange(window + 1)]  # [count, window + 1]
    device = model.wte.weight.device
    total = 0.0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            hidden = model(batch[:, :-1], return_hidden=True)
            logits = model.lm_head(hidden).float()
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                     reduction="sum").item()
    return math.exp(total / (count * window))
