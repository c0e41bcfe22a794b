"""Zero-shot scoring: the log-likelihood of each candidate's continuation, batched.

    model, tokenizer = load_for_inference("work/model")
    task = load_task("tnews")
    result = score(model, tokenizer, task, task.read_examples("clue/tnews"), batch_size=32)
    result.metrics["acc"], result.examples[0]

Tokenisation (`encode_candidate`, the one place for it; prompt tuning reuses it): for a gpt
model the context parts and the continuation are encoded as ONE text, as the model reads it
(jieba and SentencePiece see the joint string), and cut back into parts at the longest common
prefix of the joint ids with the ids of each prefix of the text; a token that merges across a
boundary goes to the later part. An empty context is the `<eod>` token (a document start, as
in the packed training data). For an encdec model the encoder reads the context (with `<s_0>`
after it, or where a `span` task's context marks it) and `<eod>`; the decoder scores
`<s_0>` + the continuation, tokenised alone (the model never sees the two as one text).

Forward passes (`candidate_losses`, differentiable: prompt tuning calls it with gradients):
- `FlatBatch`: every candidate a row of context + continuation, left-padded for gpt (positions
  count real tokens) and right-padded for encdec. The `cpm1` rule: one continuation under K
  contexts, K rows.
- `PackedBatch` (`choice` on gpt; cpmctl.bench.packing): each example its shared context
  once, then its K tails, each attending to the context and to itself, several examples a
  row; one forward, no cache, so prompt tuning trains through it as it is.
- `SharedBatch` (`choice`/`span` on encdec): each example's encoder input once, its output
  repeated for the K decoder rows.
Only the scored positions go through the LM head, in fp32 (cpmctl.infer.perplexity's
`token_logprobs`: a few positions' logits at a time).

A soft prompt (`prompt`, prompt tuning's object): `prompt.place(parts_ids) -> (ids,
slot_positions)` puts its slots into one candidate's context, and `prompt.embed(model,
input_ids [R, L], slots LongTensor [E, P]) -> inputs_embeds [R, L, d]` fills them (E
examples' slots as indices into the flattened [R * L] ids: a packed row holds several
examples); every forward here goes through these two calls when a prompt is given (gpt: the
context part; encdec: the encoder input only).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cpmctl.bench.packing import (
    PackedBatch,
    pack_task,
    packed_batch,
    packed_length,
    packed_states,
)
from cpmctl.bench.tasks.format import SPAN_MARKER, Candidate, Example, ScoringRequests, Task
from cpmctl.errors import CpmError
from cpmctl.infer.perplexity import token_logprobs

# ---------------------------------------------------------------- tokenisation


@dataclass
class EncodedCandidate:
    """A candidate as token ids: the context's parts and the scored continuation."""

    parts: list[list[int]]
    continuation: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_candidate(tokenizer, candidate: Candidate, *, arch: str = "gpt",
                     eod: bool = False, span: bool = False) -> EncodedCandidate:
    """The ids of one candidate as the model sees them (see the module docstring). `eod`
    appends <eod> to the continuation; `span` (encdec) means the context marks the gap with
    <s_0> itself."""
    if arch == "encdec":
        return _encode_encdec(tokenizer, candidate, eod, span)
    parts = candidate.context_parts
    whole = tokenizer.encode("".join(parts) + candidate.continuation)
    cuts, prefix = [], ""
    for part in parts:
        prefix += part
        cut = _common_prefix(whole, tokenizer.encode(prefix)) if prefix else 0
        cuts.append(max(cut, cuts[-1] if cuts else 0))
    # the continuation keeps at least one token (a merge could otherwise swallow it)
    end = min(cuts[-1], len(whole) - 1) if candidate.continuation else cuts[-1]
    cuts = [min(c, end) for c in cuts]
    starts = [0] + cuts[:-1]
    encoded = [whole[s:c] for s, c in zip(starts, cuts, strict=True)]
    continuation = whole[end:] + ([tokenizer.eod_id] if eod else [])
    if not continuation:
        raise CpmError("a candidate's continuation is empty: nothing to score")
    if not any(encoded):
        encoded[0] = [tokenizer.eod_id]
    return EncodedCandidate(encoded, continuation)


def _encode_encdec(tokenizer, candidate: Candidate, eod: bool, span: bool) -> EncodedCandidate:
    sentinel = tokenizer.sentinel_id(0)
    parts = []
    for part in candidate.context_parts:
        pieces = part.split(SPAN_MARKER)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(sentinel)
            ids += tokenizer.encode(piece) if piece else []
        parts.append(ids)
    if not span:
        parts[-1] = parts[-1] + [sentinel]
    parts[-1] = parts[-1] + [tokenizer.eod_id]
    continuation = tokenizer.encode(candidate.continuation) + ([tokenizer.eod_id] if eod else [])
    if not continuation:
        raise CpmError("a candidate's continuation is empty: nothing to score")
    return EncodedCandidate(parts, continuation)


# ---------------------------------------------------------------- batches


@dataclass
class Row:
    """One candidate's context (prompt slots placed) and continuation ids."""

    context: list[int]
    continuation: list[int]
    slots: list[int] = field(default_factory=list)


def make_row(encoded: EncodedCandidate, prompt=None) -> Row:
    """Join the parts, or let the prompt place its slots between them."""
    if prompt is None:
        return Row([t for part in encoded.parts for t in part], encoded.continuation)
    ids, slots = prompt.place(encoded.parts)
    return Row(list(ids), encoded.continuation, list(slots))


def fit_group(rows: list[Row], max_positions: int, *,
              keep_context: bool = False) -> tuple[list[Row], bool]:
    """gpt: fit one example's candidates into the model's context: cut the SAME number of
    tokens from the left of every context (so a shared context stays shared), never the last
    context token and never a prompt slot: the slots stay, the text's tokens around them go
    (a front prompt keeps its place and the example loses its first tokens, as CPM-2-Finetune
    cuts the sentence and not the prompt); then the continuations' tails (as CPM-1 cut its
    sentences). True when something was cut. CpmError when not one continuation token fits.

    `keep_context` (the cpm1 rule: the label is in the context, and cutting it from the left
    would leave K identical rows): the continuations are cut first, all to the same length
    so that every candidate scores the same text; the contexts only when one alone leaves no
    room."""
    longest = max(len(r.context) + len(r.continuation) for r in rows)
    if longest <= max_positions + 1:
        return rows, False
    room = max_positions + 1 - max(len(r.context) for r in rows)
    if keep_context and room >= 1:
        return [Row(r.context, r.continuation[:room], r.slots) for r in rows], True
    cuttable = [[i for i in range(len(r.context) - 1) if i not in set(r.slots)] for r in rows]
    cut = min(longest - (max_positions + 1), *map(len, cuttable))
    fitted = []
    for r, candidates in zip(rows, cuttable, strict=True):
        dropped = set(candidates[:cut])
        context = [t for i, t in enumerate(r.context) if i not in dropped]
        room = max_positions + 1 - len(context)
        if room < 1:
            raise CpmError(f"a context of {len(context)} tokens (a prompt's slots included) "
                           f"leaves no room in the model's {max_positions} positions")
        slots = [s - bisect.bisect_left(candidates, s, hi=cut) for s in r.slots]
        fitted.append(Row(context, r.continuation[:room], slots))
    return fitted, True


@dataclass
class FlatBatch:
    """Rows of context + continuation: input_ids, attention_mask, targets and score_mask
    [R, L] (score_mask: the positions whose next token is a continuation token), and the
    prompt slots [R, P] (or None). encdec: the encoder input in input_ids / attention_mask,
    the decoder's in decoder_ids / decoder_mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    slots: torch.Tensor | None = None
    decoder_ids: torch.Tensor | None = None
    decoder_mask: torch.Tensor | None = None


@dataclass
class SharedBatch:
    """encdec: B encoder inputs (right-padded) and R decoder rows: `row_example` [R] says
    whose encoder output each row reads; cont_ids, cont_mask, targets, score_mask [R, Lt]
    (the targets are <s_0> and the continuation, only the continuation scored)."""

    context_ids: torch.Tensor
    context_mask: torch.Tensor
    row_example: torch.Tensor
    cont_ids: torch.Tensor
    cont_mask: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    slots: torch.Tensor | None = None


def _pad(seqs: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _slot_tensor(rows_slots: list[list[int]], offsets: list[int],
                 width: int) -> torch.Tensor | None:
    """Row i's slots, shifted by its padding `offsets[i]`, as indices into the flattened
    [rows * width] ids (the prompt seam's form, see the module)."""
    if not rows_slots or not rows_slots[0]:
        return None
    return torch.tensor([[s + o + i * width for s in slots]
                         for i, (slots, o) in enumerate(zip(rows_slots, offsets, strict=True))],
                        dtype=torch.long)


def flat_batch(rows: list[Row], arch: str, pad_id: int, start_id: int,
               sentinel_id: int | None = None) -> FlatBatch:
    """A FlatBatch of whole rows (see the class)."""
    if arch == "encdec":
        enc_ids, enc_mask = _pad([r.context for r in rows], pad_id, left=False)
        # decoder: [start, <s_0>, continuation[:-1]] predicting [<s_0>, continuation]
        targets = [[sentinel_id] + r.continuation for r in rows]
        dec_ids, dec_mask = _pad([[start_id] + t[:-1] for t in targets], pad_id, left=False)
        target_ids, _ = _pad(targets, pad_id, left=False)
        score = torch.zeros_like(dec_mask, dtype=torch.bool)
        for i, r in enumerate(rows):
            score[i, 1:1 + len(r.continuation)] = True
        return FlatBatch(enc_ids, enc_mask, target_ids, score,
                         _slot_tensor([r.slots for r in rows], [0] * len(rows), enc_ids.shape[1]),
                         dec_ids, dec_mask)
    full = [r.context + r.continuation for r in rows]
    input_ids, mask = _pad([f[:-1] for f in full], pad_id, left=True)
    targets, _ = _pad([f[1:] for f in full], pad_id, left=True)
    length = input_ids.shape[1]
    score = torch.zeros_like(mask, dtype=torch.bool)
    for i, r in enumerate(rows):
        score[i, length - len(r.continuation):] = True
    offsets = [length - (len(f) - 1) for f in full]
    return FlatBatch(input_ids, mask, targets, score,
                     _slot_tensor([r.slots for r in rows], offsets, length))


def shared_batch(groups: list[list[Row]], pad_id: int, sentinel_id: int,
                 start_id: int) -> SharedBatch:
    """An encdec SharedBatch: each group's encoder input once, its rows' decoder inputs
    (`<s_0>` + the continuation) after it. (A gpt shares its context in a PackedBatch.)"""
    contexts, tails, row_example, slots = [], [], [], []
    for g, rows in enumerate(groups):
        if any(r.context != rows[0].context for r in rows):
            raise CpmError("the candidates of a shared-context rule must share their "
                           "encoder input")
        contexts.append(rows[0].context)
        slots.append(rows[0].slots)
        for r in rows:
            tails.append([sentinel_id] + r.continuation)
            row_example.append(g)
    context_ids, context_mask = _pad(contexts, pad_id, left=False)
    cont_ids, cont_mask = _pad([[start_id] + t[:-1] for t in tails], pad_id, left=False)
    targets, _ = _pad(tails, pad_id, left=False)
    score = torch.zeros_like(targets, dtype=torch.bool)
    for i, t in enumerate(tails):
        score[i, 1:len(t)] = True
    return SharedBatch(context_ids, context_mask, torch.tensor(row_example), cont_ids,
                       cont_mask, targets, score,
                       _slot_tensor(slots, [0] * len(contexts), context_ids.shape[1]))


def batch_layout(rule: str, arch: str, share_context: bool = True) -> str:
    """How a rule's candidates are batched, for scoring and for prompt tuning alike: `flat`
    (a row each: cpm1's differ in the context), `packed` (gpt choice: the context once) or
    `shared` (encdec choice/span: the encoder once)."""
    if not share_context or rule not in ("choice", "span"):
        return "flat"
    return "packed" if arch == "gpt" else "shared"


def make_batch(groups: list[list[Row]], layout: str, arch: str, pad_id: int,
               sentinel_id: int | None = None,
               width: int | None = None) -> FlatBatch | SharedBatch | PackedBatch:
    """The batch of examples' rows in a `batch_layout` (pad_id also starts the decoder;
    `width`: a packed row's, see packing.pack_rows)."""
    if layout == "packed":
        return packed_batch(groups, pad_id, width)
    if layout == "shared":
        return shared_batch(groups, pad_id, sentinel_id, pad_id)
    return flat_batch([r for g in groups for r in g], arch, pad_id, pad_id, sentinel_id)


# ---------------------------------------------------------------- forward passes


def _embed(model, ids: torch.Tensor, slots: torch.Tensor | None, prompt):
    if prompt is None or slots is None:
        return None
    return prompt.embed(model, ids, slots)


def _sum_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sums of `values` (one per True of `mask` [R, L], in row order)."""
    rows = torch.nonzero(mask)[:, 0]
    total = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device)
    return total.index_add(0, rows, values)


def candidate_losses(model, batch: FlatBatch | SharedBatch | PackedBatch, prompt=None, *,
                     greedy: bool = False):
    """(summed log-likelihood [R] (fp32), scored token count [R]) of every row's
    continuation; with `greedy`, also [R] bools: is the continuation what greedy decoding
    would write (lm-eval's is_greedy). Runs under whatever grad mode the caller set: prompt
    tuning calls it with gradients on and takes -sum / count as the loss."""
    hidden, targets, mask = _scored_states(model, batch, prompt)
    logprobs, hits = token_logprobs(model, hidden, targets, greedy=greedy)
    result = (_sum_rows(logprobs, mask), mask.sum(-1))
    if not greedy:
        return result
    return (*result, _sum_rows((~hits).float(), mask) == 0)


def _scored_states(model, batch: FlatBatch | SharedBatch | PackedBatch, prompt):
    """(the final hidden states that predict scored tokens [N, d], those tokens [N], the
    score mask [R, L])."""
    if isinstance(batch, PackedBatch):
        return packed_states(model, batch, prompt)
    device = next(model.parameters()).device
    arch = model.cfg.arch
    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    mask = b["score_mask"]
    if isinstance(batch, FlatBatch):
        embeds = _embed(model, b["input_ids"], b["slots"], prompt)
        if arch == "encdec":
            encoder_out = model.encode(None if embeds is not None else b["input_ids"],
                                       b["attention_mask"], inputs_embeds=embeds)
            hidden = _decoder_hidden(model, b["decoder_ids"], encoder_out, b["attention_mask"],
                                     b["decoder_mask"])
        else:
            hidden = model(None if embeds is not None else b["input_ids"], b["attention_mask"],
                           inputs_embeds=embeds, return_hidden=True)
        return hidden[mask], b["targets"][mask], mask
    rows = b["row_example"]  # a SharedBatch: encdec's encoder output repeated for K rows
    embeds = _embed(model, b["context_ids"], b["slots"], prompt)
    encoder_out = model.encode(None if embeds is not None else b["context_ids"],
                               b["context_mask"], inputs_embeds=embeds)
    hidden = _decoder_hidden(model, b["cont_ids"], encoder_out[rows], b["context_mask"][rows],
                             b["cont_mask"])
    return hidden[mask], b["targets"][mask], mask


def _decoder_hidden(model, decoder_ids, encoder_out, attention_mask, decoder_mask):
    """The decoder's final hidden states (the LM head is applied to scored positions only).

    NOTE: EncDec.decode applies its head itself; it is swapped for an identity for the call
    so that [rows, length, vocab] logits are never materialised."""
    head = model.lm_head
    try:
        model.lm_head = torch.nn.Identity()
        return model.decode(decoder_ids, encoder_out, attention_mask, decoder_mask)
    finally:
        model.lm_head = head


# ---------------------------------------------------------------- scoring a task


@dataclass
class ExampleScore:
    """One example's candidates and what each rule predicts (indices into `labels`)."""

    index: int
    line: int
    gold: int
    labels: list[str]
    logprob: list[float]
    tokens: list[int]
    chars: list[int]
    bytes: list[int]
    truncated: bool = False

    def prediction(self, metric: str, rule: str) -> int:
        """acc: cpm1 = the lowest mean loss per token, choice/span = the highest summed
        log-likelihood; acc_norm: per character; acc_bytes: per UTF-8 byte."""
        if metric == "acc":
            scores = ([lp / n for lp, n in zip(self.logprob, self.tokens, strict=True)]
                      if rule == "cpm1"
                      else self.logprob)
        else:
            lengths = self.chars if metric == "acc_norm" else self.bytes
            scores = [lp / max(n, 1) for lp, n in zip(self.logprob, lengths, strict=True)]
        return max(range(len(scores)), key=scores.__getitem__)


def _rng(seed: int, index: int):
    import random

    return random.Random(f"{seed}:{index}")


def score(model, tokenizer, task: Task, examples: list[Example], *, batch_size: int = 16,
          prompt=None, seed: int = 0, share_context: bool = True,
          progress: Callable[[int, int], None] | None = None) -> list[ExampleScore]:
    """Score every example's candidates (rules cpm1, choice, span); `batch_size` rows per
    forward; `seed` draws sampled:K's others (per example, so a result never depends on the
    batch or --limit); `share_context` False scores every candidate as its own row (the
    baseline the shared context is measured against: with `batch_size` 1, one forward per
    candidate). Results in the examples' order."""
    arch = model.cfg.arch
    if task.rule not in ("cpm1", "choice", "span"):
        raise CpmError(f"task {task.name}: rule {task.rule} is not scored by candidates")
    if task.rule == "span" and arch != "encdec":
        raise CpmError(f"task {task.name}: rule span fills an encoder-decoder's <s_0> gap; "
                       f"this is a {arch} model")
    if batch_size < 1:
        raise CpmError(f"--batch-size must be at least 1, got {batch_size}")
    if arch == "encdec" and tokenizer.sentinels is None:
        raise CpmError("an encdec model scores <s_0> + the answer: its tokenizer has no "
                       "sentinels")
    layout = batch_layout(task.rule, arch, share_context)
    prepared = []
    for example in examples:
        requests = task.requests(example, _rng(seed, example.index))
        rows = [make_row(encode_candidate(tokenizer, candidate, arch=arch, eod=task.eod,
                                          span=task.rule == "span"), prompt)
                for candidate in requests.candidates]
        cut = False
        if arch == "gpt":
            rows, cut = fit_group(rows, model.cfg.max_positions,
                                  keep_context=task.rule == "cpm1")
        prepared.append((requests, rows, cut))
    # a unit is what a forward cannot split: one candidate's row (flat), or one example's
    # candidates (shared and packed: they share its context)
    units = ([(i, k, [row]) for i, (_, rows, _) in enumerate(prepared)
              for k, row in enumerate(rows)] if layout == "flat"
             else [(i, 0, rows) for i, (_, rows, _) in enumerate(prepared)])
    width = None
    if layout == "packed":  # the whole task packed (packing.py), then cut into batches
        lengths = [packed_length(rows) for _, _, rows in units]
        width, rows = pack_task(lengths, model.cfg.d_model)
        units = [units[i] for row in rows for i in row]
    else:
        units.sort(key=lambda unit: _padding_key(unit[2], layout))
    logprobs = [[0.0] * len(rows) for _, rows, _ in prepared]
    counts = [[0] * len(rows) for _, rows, _ in prepared]
    left = [len(rows) for _, rows, _ in prepared]
    results: list[ExampleScore | None] = [None] * len(prepared)
    sentinel = tokenizer.sentinel_id(0) if arch == "encdec" else None
    done = 0
    with torch.inference_mode():
        for chunk in _chunks(units, batch_size, layout):
            batch = make_batch([rows for _, _, rows in chunk], layout, arch, tokenizer.pad_id,
                               sentinel, width)
            logprob, count = (t.tolist() for t in candidate_losses(model, batch, prompt))
            at = 0
            for i, first, rows in chunk:
                logprobs[i][first:first + len(rows)] = logprob[at:at + len(rows)]
                counts[i][first:first + len(rows)] = count[at:at + len(rows)]
                at += len(rows)
                left[i] -= len(rows)
                if not left[i]:
                    requests, _, cut = prepared[i]
                    results[i] = _example_score(requests, logprobs[i], counts[i], cut)
                    done += 1
            if progress is not None:
                progress(done, len(prepared))
    return results


def _padding_key(rows: list[Row], layout: str) -> tuple[int, ...]:
    """The order that keeps padding low, longest first: whole rows (flat) or the K
    continuations (shared: they are K rows a context, the context is one)."""
    if layout == "shared":
        return (-max(len(r.continuation) for r in rows), -len(rows[0].context))
    return (-max(len(r.context) + len(r.continuation) for r in rows),)


#: A batch closes before its padding would exceed this share of its real tokens (the
#: examples come longest first, so a long one does not widen a whole batch of short ones).
MAX_PADDING = 0.5


def _tokens(groups: list[list[Row]], layout: str) -> tuple[int, int]:
    """(padded, real) tokens of a batch of examples' rows, as flat_batch / shared_batch pad
    them."""
    rows = [r for g in groups for r in g]
    if layout == "shared":
        tails = [len(r.continuation) for r in rows]
        contexts = [len(g[0].context) for g in groups]
        return (len(rows) * max(tails) + len(groups) * max(contexts),
                sum(tails) + sum(contexts))
    lengths = [len(r.context) + len(r.continuation) for r in rows]
    return len(rows) * max(lengths), sum(lengths)


def _too_padded(groups: list[list[Row]], layout: str) -> bool:
    """More than MAX_PADDING padding. Never for packed examples: they come already packed
    into rows (score), and a row that a batch has only begun would count as padding."""
    if layout == "packed":
        return False
    padded, real = _tokens(groups, layout)
    return padded > (1 + MAX_PADDING) * real


def _chunks(units: list, batch_size: int, layout: str):
    """Units (see score) in batches of at most `batch_size` candidates (at least one unit
    a batch) and not _too_padded."""
    chunk: list = []
    for unit in units:
        if chunk:
            grown = [rows for _, _, rows in chunk] + [unit[2]]
            if sum(map(len, grown)) > batch_size or _too_padded(grown, layout):
                yield chunk
                chunk = []
        chunk.append(unit)
    if chunk:
        yield chunk


def _example_score(requests: ScoringRequests, logprob, counts, cut: bool) -> ExampleScore:
    texts = [c.continuation for c in requests.candidates]
    return ExampleScore(index=requests.example.index, line=requests.example.line,
                        gold=requests.gold, labels=[c.label for c in requests.candidates],
                        logprob=list(logprob), tokens=[int(n) for n in counts],
                        chars=[len(t) for t in texts],
                        bytes=[len(t.encode("utf-8")) for t in texts], truncated=cut)


class Rate:
    """A progress line with examples/s and ETA, at most every `every` seconds (and at the
    end)."""

    def __init__(self, show: Callable[[str], None], every: float = 5.0):
        self.start = self.last = time.perf_counter()
        self.show = show
        self.every = every

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate else 0.0
        self.show(f"{done:,}/{total:,} examples, {rate:,.1f} examples/s, ETA {eta:,.0f} s")
