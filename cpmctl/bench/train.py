"""`cpmctl bench train`: training tokens/s of our GPT against Hugging Face's GPT-2.

Both models have the recipe's shape and the same initial weights, and train on the same random
token batches: forward, cross-entropy, backward and a fused `torch.optim.AdamW` step
(`fused=True` is what `cpmctl train` runs and what transformers' Trainer defaults to on
torch >= 2.8), under the same precision policy: fp32, or bf16 autocast over fp32 weights (the
weights, gradients and optimizer stay fp32; matmuls run in bf16). Dropout is the recipe's on
both sides.

Each side trains as it would for real: ours with `cpmctl train`'s loss, the LM head fused into
the cross-entropy (`objectives.fused_lm_loss`), and its blocks compiled when the recipe says
`engine.compile = true` (as `cpmctl train` runs them); transformers' eagerly, with its logits
and `F.cross_entropy` (the Trainer's default). The steps of the two alternate (ours, theirs,
ours, ...), so a load that comes and goes on the machine falls on both; a side's rate is its
median step, and the ratio is theirs over ours. Achieved FLOP/s counts a trained token as
PaLM's estimate does (cpmctl.models.training_flops_per_token).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from cpmctl.errors import CpmError
from cpmctl.models import build_model, training_flops_per_token
from cpmctl.models.config import ModelConfig
from cpmctl.models.hf import to_transformers
from cpmctl.train.engines import compile_blocks
from cpmctl.train.objectives import fused_lm_loss

OURS, THEIRS = "cpmctl GPT", "transformers GPT2LMHeadModel"


def _ours_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """What `cpmctl train` computes (CausalLM.loss): the head fused into the loss."""
    hidden = model(batch[:, :-1], return_hidden=True)
    labels = batch[:, 1:]
    return fused_lm_loss(hidden, model.lm_head.weight, labels, torch.ones_like(labels))[0]


def _transformers_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


class _Trainee:
    """One side of the comparison: a model, its loss and its optimizer."""

    def __init__(self, name: str, model, loss_of):
        self.name, self.model, self.loss_of = name, model, loss_of
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                           fused=True)

    def step(self, batch: torch.Tensor, precision: str) -> float:
        """One training step; its seconds."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = self.loss_of(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _step_seconds(trainees: list[_Trainee], batches: list[torch.Tensor], precision: str,
                  warmup: int) -> list[list[float]]:
    """Each trainee's timed step seconds, the trainees' steps alternating."""
    seconds: list[list[float]] = [[] for _ in trainees]
    for index, batch in enumerate(batches):
        for trainee, times in zip(trainees, seconds, strict=True):
            elapsed = trainee.step(batch, precision)
            if index >= warmup:
                times.append(elapsed)
    return seconds


def bench_training(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int = 3,
                   seed: int = 0, compile: bool = False,
                   precisions: tuple[str, ...] | list[str] = ("fp32", "bf16")) -> dict:
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
    ours.train()
    if compile:
        compile_blocks(ours)
    parameters = sum(p.numel() for p in ours.parameters())
    flops_per_token = training_flops_per_token(cfg, seq_len, parameters)
    tokens_per_step = batch * seq_len
    trainees = [_Trainee(OURS, ours, _ours_loss), _Trainee(THEIRS, theirs, _transformers_loss)]
    runs, ratios = [], {}
    for precision in precisions:
        medians = []
        for trainee, times in zip(trainees, _step_seconds(trainees, batches, precision, warmup),
                                  strict=True):
            median = statistics.median(times)
            medians.append(median)
            rate = tokens_per_step / median
            runs.append({"model": trainee.name, "precision": precision,
                         "tokens_per_s": round(rate, 1),
                         "gflop_per_s": round(rate * flops_per_token / 1e9, 2),
                         "step_seconds": [round(t, 3) for t in times]})
        ratios[precision] = round(medians[1] / medians[0], 2)
    return {
        "shape": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                  "vocab_size": cfg.vocab_size, "parameters": parameters},
        "batch": batch, "seq_len": seq_len, "steps": steps, "threads": torch.get_num_threads(),
        "compiled": compile, "runs": runs, "speedup": ratios,
    }
