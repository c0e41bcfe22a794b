"""`cpmctl bench train`: training tokens/s of our GPT against Hugging Face's GPT-2.

Both models have the recipe's shape and are trained the same way in the same run: the same
random token batches, cross-entropy, backward, and the same `torch.optim.AdamW` settings.
Reported: tokens/s and achieved GFLOP/s of each, and ours as a multiple of transformers'.

Each side trains as it would for real: ours with `cpmctl train`'s loss, the LM head fused into
the cross-entropy (`objectives.fused_lm_loss`); transformers' with its logits and
`F.cross_entropy`. NOTE: at tiny-gpt's shape (2 x 64, vocabulary 8,000) the head and the loss
are most of a step; unfused they were ~83% of it and ours ran at 1.02x transformers. Achieved FLOP/s
uses the usual estimate of 6 x parameters per trained token (forward + backward), plus the
attention scores: 6 x layers x seq_len x d_model per token.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cpmctl.errors import CpmError
from cpmctl.models import build_model
from cpmctl.models.config import ModelConfig
from cpmctl.models.hf import to_transformers
from cpmctl.train.objectives import fused_lm_loss


def _ours_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """What `cpmctl train` computes (CausalLM.loss): the head fused into the loss."""
    hidden = model(batch[:, :-1], return_hidden=True)
    labels = batch[:, 1:]
    return fused_lm_loss(hidden, model.lm_head.weight, labels, torch.ones_like(labels))[0]


def _transformers_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def _tokens_per_second(model, loss_of, batches: list[torch.Tensor], precision: str,
                       warmup: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    start = None
    for index, batch in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return (len(batches) - warmup) * batches[0].shape[0] * (batches[0].shape[1] - 1) / seconds


def bench_training(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int = 3,
                   seed: int = 0) -> dict:
    if cfg.arch != "gpt" or cfg.moe.experts:
        raise CpmError("bench train compares with Hugging Face's GPT-2: it needs a dense gpt "
                       "recipe (model.arch = 'gpt', no experts)")
    if seq_len > cfg.max_positions:
        raise CpmError(f"--seq-len {seq_len} is longer than model.max_positions "
                       f"{cfg.max_positions}")
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(cfg.vocab_size, (batch, seq_len + 1), generator=generator)
               for _ in range(warmup + steps)]
    torch.manual_seed(seed)
    ours = build_model(cfg)
    theirs = to_transformers(ours).train()  # the same initial weights
    parameters = sum(p.numel() for p in ours.parameters())
    flops_per_token = 6 * parameters + 6 * cfg.n_layers * seq_len * cfg.d_model
    runs = []
    for precision in ("fp32", "bf16"):
        for name, model, loss_of in (("cpmctl GPT", ours, _ours_loss),
                                     ("transformers GPT2LMHeadModel", theirs, _transformers_loss)):
            rate = _tokens_per_second(model, loss_of, batches, precision, warmup)
            runs.append({"model": name, "precision": precision, "tokens_per_s": round(rate, 1),
                         "gflop_per_s": round(rate * flops_per_token / 1e9, 2)})
    ratios = {p: round(runs[i]["tokens_per_s"] / runs[i + 1]["tokens_per_s"], 2)
              for i, p in ((0, "fp32"), (2, "bf16"))}
    return {
        "shape": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                  "vocab_size": cfg.vocab_size, "parameters": parameters},
        "batch": batch, "seq_len": seq_len, "steps": steps, "threads": torch.get_num_threads(),
        "runs": runs, "speedup": ratios,
    }
