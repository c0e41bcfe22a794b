"""Generation at the token level: one prefill, then one decoding step per new token.

    settings = GenerationSettings(max_new_tokens=128, sampling=SamplingSettings(temperature=0))
    result = generate_tokens(model, [[837, 259], [497]], settings, eod_id=7, pad_id=5)
    result.rows[0].tokens, result.rows[0].finish_reason      # [...], 'eod' / 'length' / 'stop'
    result.prefill_s, result.decode_s, result.tokens_per_s

This is the API that benchmarks time (it returns tokens and timings and knows nothing about
text); `text.py` builds completions, stop strings and streaming on top of it.

How a batch runs:
- GPT: prompts are left-padded so that every row's last prompt token sits in the same column;
  positions count real tokens only, so a padded row computes what it would alone. The prefill
  runs the whole prompt once, applies the LM head to the last position only, and fills the
  KV cache; each step then feeds one token per row. A row that has finished keeps a slot in
  the batch (its new tokens are masked out) until every row is done.
- encoder-decoder: the encoder runs once; the decoder starts from `decoder_start_id` (T5's and
  training's: `<pad>`) with a self-attention cache, the cross-attention keys and values being
  computed once from the encoder output.
- Batch 1 with no padding attends without any mask tensor (SDPA's fastest path).
- A GPT's prefill and decoding steps, and an encoder-decoder's decoding steps, run through a
  plan made once (planned.py: no module calls, the attention in C, a bf16 cache for a bf16 or
  int8 model) where it applies, else through the module forward; `planned_step=False` forces
  the module forward (to compare).

Length: a row generates at most `max_new_tokens`, and a GPT row at most what fits in the model's
context (model.max_positions) after its prompt: it then ends with finish reason 'length'. A
GPT prompt that leaves no room at all is an error (see `check_prompt`).

Timings: `prefill_s` is the prompt's forward pass up to the first logits; `decode_s` everything
after (sampling every token and the forward pass of each fed-back token); `tokens_per_s` is
the tokens generated divided by `decode_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cpmctl.errors import CpmError
from cpmctl.infer.cache import KVCache
from cpmctl.infer.planned import PlannedEncDec, PlannedGpt
from cpmctl.infer.sampling import Sampler, SamplingSettings

#: Called after each new token of an active row (except <eod>) with the row's tokens so far;
#: returning a finish reason ends that row.
OnToken = Callable[[int, list[int]], str | None]


@dataclass(frozen=True)
class GenerationSettings:
    """How much to generate and how to choose each token."""

    max_new_tokens: int = 64
    """The most tokens generated per prompt (<eod> included)."""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = 0
    """Prompt i (counting from 0 over the whole input) samples with its own generator seeded
    from (seed, i): the same prompt, position and seed give the same output at any batch size."""

    def check(self, name: Callable[[str], str] = str) -> None:
        """A CpmError for invalid values, each setting shown as `name(setting)` (the CLI
        passes its option spelling)."""
        problems = self.sampling.problems()
        if self.seed < 0:
            problems["seed"] = f"must be >= 0, got {self.seed}"
        if self.max_new_tokens < 1:
            problems["max_new_tokens"] = f"must be >= 1, got {self.max_new_tokens}"
        if problems:
            raise CpmError("; ".join(f"{name(key)} {why}" for key, why in problems.items()))


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    """The generated tokens, the closing <eod> included."""
    finish_reason: str = ""
    """'eod' (the model ended its text), 'stop' (a stop condition of the caller) or 'length'
    (max_new_tokens or the model's context)."""


@dataclass
class BatchResult:
    rows: list[RowResult]
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(row.tokens) for row in self.rows)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def row_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index`: numpy's SeedSequence of (seed, index), as training
    seeds its samples, so that neighbouring seeds and neighbouring prompts do not share
    streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def context_room(model: nn.Module, prompt_tokens: int) -> int | None:
    """How many tokens fit after a prompt of `prompt_tokens` (None: no limit, an
    encoder-decoder's relative positions have none)."""
    cfg = model.cfg
    return cfg.max_positions - prompt_tokens if cfg.arch == "gpt" else None


def check_prompt(model: nn.Module, ids: list[int], where: str) -> None:
    """A CpmError naming `where` for a prompt that cannot be generated from: one that encodes
    to no tokens, or a GPT prompt that fills the model's whole context.

    NOTE: a long prompt is an error rather than silently cut to its last tokens: the output of a
    shortened prompt is not what was asked for, and the user is the one to choose what to cut.
    """
    if not ids:
        raise CpmError(f"{where}: the prompt encodes to no tokens")
    room = context_room(model, len(ids))
    if room is not None and room < 1:
        raise CpmError(f"{where}: the prompt is {len(ids):,} tokens; the model's context "
                       f"(model.max_positions) is {model.cfg.max_positions:,}, so a prompt "
                       f"must be at most {model.cfg.max_positions - 1:,} tokens; shorten it")


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids [batch, longest] padded on the left, and the mask (1 = real token; None when no row
    needed padding)."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, longest - len(row):] = 1
    padded = any(len(row) < longest for row in rows)
    return ids.to(device), mask.to(device) if padded else None


def cache_dtype(model: nn.Module) -> torch.dtype:
    """The module forward's KV cache dtype: the activations' (the word embedding's: an int8
    model keeps it in bf16), but fp32 on the CPU, where PyTorch's attention is much faster in
    fp32 (cache.py). The planned steps choose their own (PlannedGpt.cache_dtype)."""
    weight = (model.wte if model.cfg.arch == "gpt" else model.shared).weight
    return torch.float32 if weight.device.type == "cpu" else weight.dtype


def _input_embeds(steps) -> torch.Tensor | None:
    """The prefill's input embeddings when a soft prompt fills slots in it (else None)."""
    if steps.soft is None:
        return None
    prompt, slots = steps.soft
    return prompt.embed(steps.model, steps.ids, slots)


class _GptSteps:
    """Prefill and decoding steps of a GPT over a left-padded batch."""

    soft = None  # (soft prompt, its slots as flat token indices) when one is applied

    def __init__(self, model: nn.Module, prompts: list[list[int]], budgets: list[int],
                 pad_id: int, planned_step: bool = True):
        self.model = model
        device = model.wte.weight.device
        self.ids, prompt_mask = left_pad(prompts, pad_id, device)
        prompt_len = self.ids.shape[1]
        # the last generated token is never fed back: max(budget) - 1 slots after the prompt
        slots = prompt_len + max(budgets) - 1
        self.plan = PlannedGpt.plan(model) if planned_step else None
        dtype = cache_dtype(model) if self.plan is None else self.plan.cache_dtype
        self.cache = KVCache.for_model(model.cfg, len(prompts), slots, dtype=dtype,
                                       device=device)
        self.mask = None  # [batch, slots], kept only when a row is padded or has finished
        if len(prompts) > 1:
            self.mask = torch.ones((len(prompts), slots), dtype=torch.long, device=device)
            if prompt_mask is not None:
                self.mask[:, :prompt_len] = prompt_mask
        self.masked = prompt_mask is not None
        self.active = torch.ones(len(prompts), dtype=torch.long, device=device)

    def _logits(self, ids: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        end = self.cache.length + ids.shape[1]
        if self.plan is not None:
            return self.plan.forward(None if embeds is not None else ids, self.cache,
                                     self.mask if self.masked else None, embeds=embeds)
        mask = self.mask[:, :end] if self.masked else None
        hidden = self.model(ids if embeds is None else None, mask, inputs_embeds=embeds,
                            cache=self.cache, return_hidden=True)
        return self.model.lm_head(hidden[:, -1])

    def prefill(self) -> torch.Tensor:
        return self._logits(self.ids, _input_embeds(self))

    def finish(self, row: int) -> None:
        self.active[row] = 0
        self.masked = self.mask is not None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.masked:
            self.mask[:, self.cache.length] = self.active
        return self._logits(tokens[:, None])


class _EncDecSteps:
    """The encoder once, then decoder steps from the start token with cached keys/values."""

    soft = None  # (soft prompt, its slots as flat token indices): in the encoder input only

    def __init__(self, model: nn.Module, prompts: list[list[int]], budgets: list[int],
                 pad_id: int, decoder_start_id: int, planned_step: bool = True):
        self.model = model
        device = model.shared.weight.device
        self.ids, self.mask = left_pad(prompts, pad_id, device)
        self.start = torch.full((len(prompts), 1), decoder_start_id, dtype=torch.long,
                                device=device)
        self.plan = PlannedEncDec.plan(model) if planned_step else None
        dtype = cache_dtype(model) if self.plan is None else self.plan.cache_dtype
        self.cache = KVCache.for_model(model.cfg, len(prompts), max(budgets), dtype=dtype,
                                       device=device)
        self.encoder_out = None

    def prefill(self) -> torch.Tensor:
        embeds = _input_embeds(self)
        self.encoder_out = self.model.encode(self.ids if embeds is None else None, self.mask,
                                             inputs_embeds=embeds)
        return self.step(self.start[:, 0])

    def finish(self, row: int) -> None:
        """Nothing to do: a finished row's outputs are ignored and its positions are relative."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.plan is not None:
            return self.plan.forward(tokens[:, None], self.cache, self.encoder_out, self.mask)
        logits = self.model.decode(tokens[:, None], self.encoder_out, self.mask,
                                   cache=self.cache)
        return logits[:, -1]


def generate_tokens(model: nn.Module, prompts: list[list[int]], settings: GenerationSettings,
                    *, eod_id: int | None, pad_id: int, decoder_start_id: int | None = None,
                    vocab_size: int | None = None, first_index: int = 0,
                    on_token: OnToken | None = None, soft_prompt=None,
                    planned_step: bool = True) -> BatchResult:
    """Generate after each prompt (token ids) of one batch; see the module docstring.

    `eod_id` None never stops at <eod> (benchmarks that want exactly max_new_tokens).
    `decoder_start_id` (encoder-decoder) defaults to `pad_id`. `vocab_size` limits the tokens
    to the tokenizer's, when the model's vocabulary is larger (padded). `first_index` is the
    index of the batch's first prompt in the whole input (it picks the sampling seeds).
    `soft_prompt` (cpmctl.prompt) places its slots around every prompt; they count towards
    the context. `planned_step` False runs the model through the module forward instead of
    the planned steps (to compare their speed; the numbers differ only in the attention's
    summation order).
    """
    settings.check()
    texts, slots = prompts, None
    if soft_prompt is not None:
        placed = [soft_prompt.place([ids]) for ids in prompts]
        prompts, slots = [ids for ids, _ in placed], [row for _, row in placed]
    for row, ids in enumerate(prompts):
        check_prompt(model, ids, f"prompt {first_index + row}")
    budgets = []
    for ids in prompts:
        room = context_room(model, len(ids))
        budgets.append(settings.max_new_tokens if room is None
                       else min(settings.max_new_tokens, room))
    if model.cfg.arch == "gpt":
        steps = _GptSteps(model, prompts, budgets, pad_id, planned_step)
    else:
        start = pad_id if decoder_start_id is None else decoder_start_id
        steps = _EncDecSteps(model, prompts, budgets, pad_id, start, planned_step)
    if slots is not None:  # shifted by each row's left padding, as flat token indices
        longest = steps.ids.shape[1]
        steps.soft = (soft_prompt, [[s + longest - len(ids) + i * longest for s in row]
                                    for i, (ids, row) in enumerate(zip(prompts, slots,
                                                                       strict=True))])
    device = steps.cache.keys.device
    sampler = Sampler(settings.sampling, texts, vocab_size or model.cfg.vocab_size,
                      [row_seed(settings.seed, first_index + i) for i in range(len(prompts))],
                      device)
    rows = [RowResult() for _ in prompts]
    with torch.inference_mode():
        started = time.perf_counter()
        logits = steps.prefill()
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        active = len(rows)
        while True:
            tokens = sampler(logits)
            sampler.observe(tokens)
            for row, token in enumerate(tokens.tolist()):
                result = rows[row]
                if result.finish_reason:
                    continue
                result.tokens.append(token)
                if token == eod_id:
                    reason = "eod"
                else:
                    reason = on_token(row, result.tokens) if on_token is not None else None
                if not reason and len(result.tokens) >= budgets[row]:
                    reason = "length"
                if reason:
                    result.finish_reason = reason
                    steps.finish(row)
                    active -= 1
            if not active:
                break
            logits = steps.step(tokens)
        decode_s = time.perf_counter() - started
    return BatchResult(rows, prefill_s, decode_s)
