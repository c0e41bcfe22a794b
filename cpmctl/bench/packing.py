"""Packed candidates: a gpt scores an example's K continuations in ONE run behind its context,
and as many examples as fit share a row.

    row        c0 c1 c2 | a0 a1 | b0 b1 b2 | d0 d1 | e0 | pad   (example 1: context c, tails
    position    0  1  2 |  3  4 |  3  4  5 |  0  1 |  2 |  0     a, b; example 2: context d,
    attends    causal   | c, a  | c, b     | causal| d,e| -      tail e)

The shared context comes once, then every candidate's tail (what follows the shared prefix:
the rest of its context, unscored, and its continuation) without its last token, which is
predicted but never read. A tail restarts its positions where the context ends and attends to
the context and to its own earlier tokens only, so each candidate is scored exactly as if it
were its own row. The context's last state predicts every tail's first token. `gather` says,
for each candidate's target, which state of the packed batch predicts it.

The examples fill rows first fit, longest first (`pack_rows`: `score` packs the whole task
so that short examples fill the rows long ones leave, then cuts the rows into batches), and a
query reads only its own example's keys: the padding that one example a row left (27% of the
positions on the first 64 idiom-cloze examples) is 5%. Rows are as wide as the longest example,
or a few times that where the examples do not pair at that width (`pack_task`).

Why this layout rather than a KV cache copied to K rows (the earlier design): one forward
instead of two, no cache allocated and no context keys/values copied per candidate, and a row
is padded to the longest example of its batch rather than every candidate to the longest
continuation. Measured on the first 64 idiom-cloze examples at CPM-Small's shape, 128
candidates a batch (docs/design.md): the cache layout ran 7 forwards over 7,711 token
positions, 15% of its time in the cache's copies, fills and gathers; one example a row ran 3
forwards over 7,120 positions in half the CPU time, and several a row 2 over 5,454. The
attention does more work (every query is masked against the row's other tails and
examples), but at these widths it is under a tenth of a forward; the projections are most of
the rest. It is one forward of the blocks without a cache, so autograd follows it as it is:
prompt tuning trains through it (and keeps no per-candidate copies of the context's keys
and values, which the cache layout's gradient needed: 146 MB of a CPM-Small step).

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
    """B packed rows (see the module) for R candidates of E examples.

    input_ids, positions [B, L]; owners [B, L]: which example of the batch a token belongs to
    (-1 padding); segments [B, L]: 0 its example's context, k + 1 the tail of the example's
    k-th candidate; targets, score_mask, gather [R, Lt]: a candidate's tail tokens, True
    where the token is a continuation token (scored), and the index into the batch's
    flattened [B * L] states that predicts it; slots [E, P]: a soft prompt's slots in each
    example's context, as indices into the flattened [B * L] tokens (or None)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    owners: torch.Tensor
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
    """The length of an example's packed run: the shared context, then each tail but its
    last token."""
    shared = shared_prefix(rows)
    return shared + sum(len(r.context) + len(r.continuation) - shared - 1 for r in rows)


def pack_rows(lengths: list[int], width: int | None = None) -> list[list[int]]:
    """Which examples share a row: first fit, longest first, into rows `width` wide (default:
    the longest example's). Indices into `lengths`, each row longest first. The first row
    with room is found in a max tree over the rows' free room (`_Rooms`), so a task of n
    examples packs in O(n log n) (a scan of the rows was O(n^2): 67 s for 40,000)."""
    width = max(lengths) if width is None else width
    rows: list[list[int]] = []
    rooms = _Rooms(len(lengths))
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = rooms.first_with(lengths[i])
        if at is None:
            at = len(rows)
            rows.append([])
            rooms.set(at, width)
        rows[at].append(i)
        rooms.set(at, rooms.room(at) - lengths[i])
    return rows


class _Rooms:
    """The free room of up to `capacity` rows (-1: a row not opened yet) in a max tree:
    the leftmost row with room for a length in O(log capacity)."""

    def __init__(self, capacity: int):
        self.leaves = 1
        while self.leaves < capacity:
            self.leaves *= 2
        self.tree = [-1] * (2 * self.leaves)  # node n's children: 2n, 2n + 1; root 1

    def room(self, row: int) -> int:
        return self.tree[self.leaves + row]

    def set(self, row: int, room: int) -> None:
        node = self.leaves + row
        self.tree[node] = room
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def first_with(self, length: int) -> int | None:
        if self.tree[1] < length:
            return None
        node = 1
        while node < self.leaves:
            node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
        return node - self.leaves


#: What a masked attention key costs a query, against a position's projections, per key and
#: d_model: a query multiplies 4 d_model numbers a key, a position's projections 24 d_model^2
#: (GPT's 4 d^2 + 8 d^2, two FLOPs each), and CPU attention ran at ~1/2.7 of the projections'
#: FLOP rate (SDPA 5.8% of the matmuls' time over 99-wide rows at CPM-Small's shape).
ATTENTION_KEY_COST = 2.7 / 6


def pack_task(lengths: list[int], d_model: int) -> tuple[int, list[list[int]]]:
    """(the rows' width, which examples share each row as pack_rows gives them) for examples of
    these packed lengths: the width is the longest example's length times 1, 1.5, 2 or 3,
    whichever costs least, a row costing its positions' projections plus its every query's
    attention over the whole row (masked). A wider row leaves less padding where the examples
    do not pair at the longest's width (the first 64 idiom-cloze-question examples: 35%
    padding in 99-wide rows, 8% in 198) and attends over more keys."""
    longest = max(lengths)
    layouts = {width: pack_rows(lengths, width)
               for width in (int(longest * factor) for factor in (1, 1.5, 2, 3))}

    def cost(width: int) -> float:
        return len(layouts[width]) * width * (1 + ATTENTION_KEY_COST * width / d_model)

    width = min(layouts, key=cost)
    return width, layouts[width]


def packed_batch(groups, pad_id: int, width: int | None = None) -> PackedBatch:
    """A PackedBatch of examples (each a list of Rows: context, continuation, slots), as
    many a row as fit (`pack_rows`, rows `width` wide); candidates come out in the examples'
    order. A prompt's slots must lie in the shared context; candidates must share their first
    token (fit_group cuts every context alike, so they do)."""
    from cpmctl.errors import CpmError

    lengths = [packed_length(rows) for rows in groups]
    layout = pack_rows(lengths, width)
    width = max(lengths) if width is None else width
    input_ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    owners = torch.full((len(layout), width), -1, dtype=torch.long)
    segments = torch.zeros((len(layout), width), dtype=torch.long)
    tails: list[list[int]] = [[]] * sum(map(len, groups))
    states: list[list[int]] = [[]] * len(tails)
    scored = [len(r.continuation) for rows in groups for r in rows]
    first = [0]
    for rows in groups:
        first.append(first[-1] + len(rows))
    slots: list[list[int]] = [[]] * len(groups)
    for b, members in enumerate(layout):
        at = b * width  # flat index of the row's next free token
        for g in members:
            rows = groups[g]
            shared = shared_prefix(rows)
            if shared < 1:
                raise AssertionError("candidates of one example always share their first "
                                     "context token (fit_group cuts them alike)")
            if any(s >= shared for s in rows[0].slots):
                raise CpmError("a prompt slot falls outside the context the candidates share")
            ids = list(rows[0].context[:shared])
            pos = list(range(shared))
            seg = [0] * shared
            slots[g] = [at + s for s in rows[0].slots]
            context_end = at + shared - 1
            for k, r in enumerate(rows, 1):
                tail = (r.context + r.continuation)[shared:]
                start = at + len(ids)
                ids += tail[:-1]
                pos += range(shared, shared + len(tail) - 1)
                seg += [k] * (len(tail) - 1)
                tails[first[g] + k - 1] = tail
                # target 0 is predicted by the context's last state, target j by the
                # tail's j-1
                states[first[g] + k - 1] = [context_end] + list(range(start,
                                                                      start + len(tail) - 1))
            span = slice(at - b * width, at - b * width + len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            positions[b, span] = torch.tensor(pos, dtype=torch.long)
            owners[b, span] = g
            segments[b, span] = torch.tensor(seg, dtype=torch.long)
            at += len(ids)
    tail_length = max(map(len, tails))
    targets = torch.full((len(tails), tail_length), pad_id, dtype=torch.long)
    score_mask = torch.zeros((len(tails), tail_length), dtype=torch.bool)
    gather = torch.zeros((len(tails), tail_length), dtype=torch.long)
    for i, (tail, n, predictors) in enumerate(zip(tails, scored, states, strict=True)):
        targets[i, :len(tail)] = torch.tensor(tail, dtype=torch.long)
        score_mask[i, len(tail) - n:len(tail)] = True
        gather[i, :len(predictors)] = torch.tensor(predictors, dtype=torch.long)
    slot_tensor = torch.tensor(slots, dtype=torch.long) if slots[0] else None
    return PackedBatch(input_ids, positions, owners, segments, targets, score_mask, gather,
                       slot_tensor)


def packed_attention_mask(owners: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L], True where a query may read a key: causal, a real key of the
    query's own example, and a tail's query reads the context and its own tail."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = (owners[:, None, :] == owners[:, :, None]) & (owners[:, None, :] >= 0)
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = same & ((key == 0) | (key == query)) & causal
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
    mask = packed_attention_mask(batch.owners.to(device), batch.segments.to(device))
    for block in model.blocks:
        x = block(x, mask)
    hidden = model.ln_f(x)
    score_mask = batch.score_mask.to(device)
    states = hidden.reshape(-1, hidden.shape[-1])[batch.gather.to(device)[score_mask]]
    return states, batch.targets.to(device)[score_mask], score_mask
