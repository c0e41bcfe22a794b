"""Perplexity of a GPT on held-out token ids: how much a precision or a quantization costs.

    ppl_bf16 = perplexity(bf16_model, ids)
    ppl_int8 = perplexity(int8_model, ids)        # quantize.py; expect within ~2% of bf16

The ids (a 1-d tensor, e.g. a dataset's validation split) are cut into windows of `window + 1`
tokens that overlap by one, so every token but the first is predicted exactly once, from at
most `window` tokens before it inside its window; the tail that does not fill a window is left
out. Perplexity = exp(mean negative log-likelihood), the loss computed in fp32 whatever the
model's precision, through the model's own LM head (an int8 head when quantized).

`token_logprobs` (the head's log-likelihood of given tokens, a few positions' logits at a
time) is also what zero-shot scoring (cpmctl.bench.scoring) computes its scores with.
"""

from __future__ import annotations

import math

import torch
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
            logprobs, _ = token_logprobs(model, hidden.flatten(0, 1), batch[:, 1:].flatten())
            total -= logprobs.sum().item()
    return math.exp(total / (count * window))


#: The head's fp32 logits are made this many at a time (16 MB). NOTE: all of a batch's at once
#: (320 MB for 256 sentiment reviews at an 8,000-piece vocabulary; 491 MB for 4 windows of
#: 1,024 at 30,000) were written, log-softmaxed and read back through freshly faulted pages:
#: half the time of scoring with a small model. Chunks this size stay in the allocator's heap.
LOGIT_CHUNK_ELEMENTS = 1 << 22


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                   greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [N] in fp32 through `model.lm_head`, and with `greedy` whether each
    target is the head's argmax [N], else None) for final hidden states [N, d] and their
    targets [N]. Autograd follows it where the caller's grad mode lets it (prompt tuning)."""
    rows = max(1, LOGIT_CHUNK_ELEMENTS // model.cfg.vocab_size)
    logprobs, hits = [], []
    for start in range(0, len(hidden), rows):
        logits = model.lm_head(hidden[start:start + rows]).float()
        wanted = targets[start:start + rows]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, wanted[:, None])[:, 0])
        if greedy:
            hits.append(logits.argmax(-1) == wanted)
    return torch.cat(logprobs), torch.cat(hits) if greedy else None
