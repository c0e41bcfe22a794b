"""Packed candidates: a gpt scores an example's K continuations in ONE row behind its context.

    row        c0 c1 c2 | a0 a1 | b0 b1 b2 | pad      (context c, tails a and b)
    position    0  1  2 |  3  4 |  3  4  5 |  0
    attends    causal   | c, a  | c, b     | -

The shared context comes once, then every candidate's tail (what follows the shared prefix:
the rest of its context, unscored, and its continuation) without its last token, which is
predicted but never read. A tail restarts its positions where the context ends and attends to
the context and to its own earlier tokens only, so each candidate is scored exactly as if it
were its own row. The context's last state predicts every tail's first token. `gather` says,
for each candidate's target, which state of the packed batch predicts it.

Why this layout rather than a KV cache copied to K rows (the earlier design): one forward
instead of two, no cache allocated and no context keys/values copied per candidate, and a row
is padded to the longest example of its batch rather than every candidate to the longest
continuation. Measured on the first 64 idiom-cloze examples at CPM-Small's shape, 128
candidates a batch (docs/design.md): the cache layout ran 7 forwards over 7,711 token
positions, 15% of its time in the cache's copies, fills and gathers; this one runs 3
forwards over 7,120 positions in half the CPU time. The attention does more work (every tail
is masked against the others), but at these lengths it is under a tenth of a forward; the
projections are most of the rest. It is one forward of the blocks without a cache, so
autograd follows it as it is.

NOTE: the blocks are called here directly rather than through GPT.forward, whose positions
come from a [batch, seq] padding mask (cumsum) and whose mask is one per key: a packed row
needs its own positions and a [query, key] mask. tests/test_packing.py checks that the
packed scores (and a soft prompt's gradient) equal one unpadded forward per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """B packed rows (see the module) for R candidates.

    input_ids, positions [B, L]; segments [B, L]: 0 context, k + 1 the tail of the example's
    k-th candidate, -1 padding; targets, score_mask, gather [R, Lt]: a candidate's tail
    tokens, True where the token is a continuation token (scored), and the index into the
    batch's flattened [B * L] states that predicts it; slots [B, P] a soft prompt's slots
    in the context (or None)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    gather: torch.Tensor
    slots: torch.Tensor | None = None


def shared_prefix(rows) -> int:
    """How many leading tokens an example's candidates share: the longest prefix of
    context + continuation that all agree on, at most each one's own context (a candidate's
    continuation is never part of the shared context)."""
    first = rows[0].context + rows[0].continuation
    shared = min(len(r.context) for r in rows)
    for r in rows[1:]:
        whole = r.context + r.continuation
        n = 0
        limit = min(shared, len(whole))
        while n < limit and whole[n] == first[n]:
            n += 1
        shared = n
    return shared


def packed_length(rows) -> int:
    """The length of an example's packed row: the shared context, then each tail but its
    last token."""
    shared = shared_prefix(rows)
    return shared + sum(len(r.context) + len(r.continuation) - shared - 1 for r in rows)


def packed_batch(groups, pad_id: int) -> PackedBatch:
    """A PackedBatch of examples (each a list of Rows: context, continuation, slots). A
    prompt's slots must lie in the shared context; candidates must share their first token
    (fit_group cuts every context alike, so they do)."""
    from cpmctl.errors import CpmError

    rows_ids, rows_pos, rows_seg, slots = [], [], [], []
    tails, scored, gather_at = [], [], []
    for g, rows in enumerate(groups):
        shared = shared_prefix(rows)
        if shared < 1:
            raise AssertionError("candidates of one example always share their first context "
                                 "token (fit_group cuts them alike)")
        if any(s >= shared for s in rows[0].slots):
            raise CpmError("a prompt slot falls outside the context the candidates share")
        ids = list(rows[0].context[:shared])
        positions = list(range(shared))
        segments = [0] * shared
        for k, r in enumerate(rows, 1):
            tail = (r.context + r.continuation)[shared:]
            start = len(ids)
            ids += tail[:-1]
            positions += range(shared, shared + len(tail) - 1)
            segments += [k] * (len(tail) - 1)
            tails.append(tail)
            scored.append(len(r.continuation))
            # target 0 is predicted by the context's last state, target j by the tail's j-1
            gather_at.append((g, [shared - 1] + list(range(start, start + len(tail) - 1))))
        rows_ids.append(ids)
        rows_pos.append(positions)
        rows_seg.append(segments)
        slots.append(rows[0].slots)
    length = max(map(len, rows_ids))
    tail_length = max(map(len, tails))
    input_ids = torch.full((len(groups), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), length), dtype=torch.long)
    segments = torch.full((len(groups), length), -1, dtype=torch.long)
    for g, (ids, pos, seg) in enumerate(zip(rows_ids, rows_pos, rows_seg, strict=True)):
        input_ids[g, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        positions[g, :len(pos)] = torch.tensor(pos, dtype=torch.long)
        segments[g, :len(seg)] = torch.tensor(seg, dtype=torch.long)
    targets = torch.full((len(tails), tail_length), pad_id, dtype=torch.long)
    score_mask = torch.zeros((len(tails), tail_length), dtype=torch.bool)
    gather = torch.zeros((len(tails), tail_length), dtype=torch.long)
    for i, (tail, n, (g, states)) in enumerate(zip(tails, scored, gather_at, strict=True)):
        targets[i, :len(tail)] = torch.tensor(tail, dtype=torch.long)
        score_mask[i, len(tail) - n:len(tail)] = True
        gather[i, :len(states)] = torch.tensor(states, dtype=torch.long) + g * length
    slot_tensor = (torch.tensor(slots, dtype=torch.long) if slots and slots[0] else None)
    return PackedBatch(input_ids, positions, segments, targets, score_mask, gather,
                       slot_tensor)


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L], True where a query may read a key: causal, real keys only, and a
    tail's query reads the context and its own tail."""
    length = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (key >= 0) & ((key == 0) | (key == query)) & causal
    return allowed[:, None]


def packed_states(model, batch: PackedBatch, prompt=None):
    """(the final hidden states that predict the scored tokens [N, d], those tokens [N], the
    score mask [R, Lt]), as scoring._scored_states returns them: one forward of the blocks
    over the packed rows (see the module NOTE)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    if prompt is not None and batch.slots is not None:
        x = prompt.embed(model, ids, batch.slots.to(device))
    else:
        x = model.wte(ids)
    x = model.drop(x + model.wpe(batch.positions.to(device)))
    mask = packed_attention_mask(batch.segments.to(device))
    for block in model.blocks:
        x = block(x, mask)
    hidden = model.ln_f(x)
    score_mask = batch.score_mask.to(device)
    states = hidden.reshape(-1, hidden.shape[-1])[batch.gather.to(device)[score_mask]]
    return states, batch.targets.to(device)[score_mask], score_mask
