"""Choosing the next token from the logits: CPM-1's sampling order and the repetition penalty.

The order is top-k -> top-p -> temperature -> sample:
- top-k keeps the k highest logits (0: all);
- top-p (nucleus) keeps, among those, the smallest set of most likely tokens whose probability
  reaches p, computed at temperature 1 (1.0: all);
- the temperature then divides the kept logits; 0 means greedy (the argmax, nothing random).

NOTE: the order matters for top-p only: the nucleus is chosen on the untempered distribution,
so the temperature reshapes the probabilities inside a fixed candidate set instead of changing
which tokens are candidates.

The repetition penalty is CTRL's: the logit of every token already present (prompt or output)
is divided by the penalty when positive and multiplied by it when negative, so a penalty above
1 always makes a repeat less likely.

Each row draws from its own `torch.Generator`, seeded per prompt, so a prompt's output does not
depend on which other prompts share its batch.

How a row is drawn (`Sampler`): one uniform number from the row's generator, inverted through
the cumulative weights (`draw`). Top-p is not applied by sorting the vocabulary (sorting
CPM's 30,000 logits took ~2 ms a row on a 2-core CPU, as long as a third of a CPM-Small
decoding step) but by rejection: a token drawn from the distribution before the cut is kept
when it lies in the nucleus (the tokens more likely than it hold less than p) and drawn again
otherwise, which yields the cut, renormalised distribution exactly. The nucleus holds at least
p of the untempered probability, so a draw is kept at least 90% of the time at p = 0.9 and
temperature 1; a temperature far above 1 can spread the weight out of it, and after
NUCLEUS_TRIES misses the row is cut explicitly (`candidates`, sorted) and drawn from that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from cpmctl.errors import CpmError


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen."""

    temperature: float = 1.0
    """Divides the logits after top-k/top-p; 0 is greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 0.9
    """Keep the most likely tokens up to this total probability; 1.0 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already present; 1.0 is none."""

    def problems(self) -> dict[str, str]:
        """{setting: what is wrong with its value}, empty when all are valid."""
        problems = {}
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems["temperature"] = f"must be a finite number >= 0, got {self.temperature}"
        if self.top_k < 0:
            problems["top_k"] = f"must be >= 0, got {self.top_k}"
        if not 0 < self.top_p <= 1:  # NOTE: false for nan too
            problems["top_p"] = f"must be in (0, 1], got {self.top_p}"
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems["repetition_penalty"] = (f"must be a finite number > 0, got "
                                              f"{self.repetition_penalty}")
        return problems


def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits [batch, vocab]; present bool [batch, vocab]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalized, logits)


def outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool, True where a token falls outside the nucleus: probs [..., n] sorted highest first;
    a token is kept while the tokens MORE likely than it hold less than top_p (ties are kept or
    dropped together, so the cut never depends on the order of equal probabilities; the first
    token is always kept)."""
    before = probs.cumsum(-1) - probs
    positions = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    starts = torch.ones_like(probs, dtype=torch.bool)  # where a tie group begins
    starts[..., 1:] = probs[..., 1:] != probs[..., :-1]
    tie_start = torch.where(starts, positions, 0).cummax(-1).values
    return before.gather(-1, tie_start) >= top_p


def candidates(logits: torch.Tensor, settings: SamplingSettings
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities, token ids) after top-k, top-p and temperature, for temperature > 0: the
    distribution a row is drawn from, computed explicitly (the Sampler reaches it faster).

    logits [batch, vocab] (float32). The probabilities are over the candidates, highest first,
    with zeros for the ones top-p removed; the ids map them back to the vocabulary (None: the
    candidates are the whole vocabulary in its own order, when neither filter is on).
    """
    ids = None
    if settings.top_k > 0:
        logits, ids = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1)
    elif settings.top_p < 1:
        logits, ids = logits.sort(dim=-1, descending=True)
    if settings.top_p < 1:
        logits = logits.masked_fill(outside_nucleus(logits.softmax(-1), settings.top_p),
                                    -torch.inf)
    return (logits / settings.temperature).softmax(-1), ids


#: Rejected draws before a row's nucleus is cut explicitly (see the module docstring).
NUCLEUS_TRIES = 8


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """An index into weights (1-D, >= 0, not all 0) with probability proportional to its weight:
    one uniform number from `generator`, inverted through the cumulative sum."""
    cumulative = weights.cumsum(0)
    total = cumulative[-1:]
    u = torch.rand(1, generator=generator, dtype=cumulative.dtype, device=cumulative.device)
    at = torch.searchsorted(cumulative, u * total, right=True)
    # u * total can round up to the total: the last index with weight, never one past it
    return int(torch.minimum(at, torch.searchsorted(cumulative, total)))


def _sample_row(logits: torch.Tensor, settings: SamplingSettings,
                generator: torch.Generator) -> int:
    """One row's token (logits [vocab] fp32, temperature > 0); see the module docstring."""
    ids = None
    if settings.top_k > 0:
        logits, ids = logits.topk(min(settings.top_k, logits.shape[-1]))
    weights = (logits / settings.temperature).softmax(-1)
    index = (draw(weights, generator) if settings.top_p >= 1
             else _draw_in_nucleus(logits, weights, settings, generator))
    return index if ids is None else int(ids[index])


def _draw_in_nucleus(logits: torch.Tensor, weights: torch.Tensor, settings: SamplingSettings,
                     generator: torch.Generator) -> int:
    """A draw from `weights` (the tempered distribution of `logits`) cut to top-p's nucleus,
    by rejection (see the module docstring)."""
    probs = logits.softmax(-1)
    for _ in range(NUCLEUS_TRIES):
        at = draw(weights, generator)
        if float(torch.where(probs > probs[at], probs, 0.0).sum()) < settings.top_p:
            return at
    cut, order = candidates(logits[None], replace(settings, top_k=0))
    return int(order[0, draw(cut[0], generator)])


def _check_logits(logits: torch.Tensor) -> None:
    """-inf logits are tokens ruled out; nan or +inf (or nothing finite in a row) means the
    model's numbers overflowed: a CpmError, rather than a sample from garbage."""
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()
            | ~torch.isfinite(logits).any(-1).all()):
        raise CpmError("the model computed nan or infinite logits for a next token (its "
                       "weights, or the chosen precision overflowing); nothing can be sampled")


class Sampler:
    """The next token of each row of a batch: penalty, filters, temperature, draw.

    Only ids below `vocab_size` are chosen. `present` (for the repetition penalty) starts from
    the prompts and grows with every token `observe`d; `seeds` gives each row its own generator.
    """

    def __init__(self, settings: SamplingSettings, prompts: list[list[int]], vocab_size: int,
                 seeds: list[int], device: torch.device | str = "cpu"):
        self.settings = settings
        self.vocab_size = vocab_size
        self.present = None
        if settings.repetition_penalty != 1.0:
            self.present = torch.zeros(len(prompts), vocab_size, dtype=torch.bool,
                                       device=device)
            for row, ids in enumerate(prompts):
                self.present[row, ids] = True
        self.generators = None
        if settings.temperature > 0:
            self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, model vocab] -> token ids [batch]."""
        logits = logits[:, :self.vocab_size].float()
        # a row's max is nan or +inf where the row holds one, -inf where nothing is finite:
        # one reduction instead of a [batch, vocab] test (~10 against ~65 us a token)
        if not bool(torch.isfinite(logits.amax(-1)).all()):
            _check_logits(logits)
        if self.present is not None:
            logits = apply_repetition_penalty(logits, self.present,
                                              self.settings.repetition_penalty)
        if self.generators is None:
            return logits.argmax(-1)
        return torch.tensor([_sample_row(row, self.settings, generator)
                             for row, generator in zip(logits, self.generators, strict=True)],
                            device=logits.device)

    def observe(self, tokens: torch.Tensor) -> None:
        """Record the tokens just chosen [batch] for the repetition penalty."""
        if self.present is not None:
            self.present[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
