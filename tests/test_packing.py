"""Packed candidates (cpmctl.bench.packing): the row layout written out by hand, and the
scores and a soft prompt's gradient equal to one row per candidate."""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from cpmctl.bench.packing import (
    ATTENTION_KEY_COST,
    pack_rows,
    pack_task,
    packed_attention_mask,
    packed_batch,
    packed_length,
    packed_states,
)
from cpmctl.bench.scoring import Row, candidate_losses, flat_batch
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, build_model

PAD = 0
#: the module (cpmctl.infer's `perplexity` is its function)
HEAD = importlib.import_module("cpmctl.infer.perplexity")


def tiny_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=60, d_model=64, n_heads=4, n_layers=2,
                      max_positions=32, init_std=0.1)
    return build_model(cfg).eval().requires_grad_(False)


def test_the_packed_row_by_hand():
    # context 11 12 13 shared; candidate a continues with 20 21, candidate b with 22 23 24
    rows = [Row([11, 12, 13], [20, 21]), Row([11, 12, 13], [22, 23, 24])]
    batch = packed_batch([rows, [Row([15], [30]), Row([15], [31])]], PAD)
    # each tail but its last token follows the context; the second example is its context
    assert batch.input_ids.tolist() == [[11, 12, 13, 20, 22, 23], [15, 0, 0, 0, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 3, 4], [0, 0, 0, 0, 0, 0]]
    assert batch.owners.tolist() == [[0, 0, 0, 0, 0, 0], [1, -1, -1, -1, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [[20, 21, 0], [22, 23, 24], [30, 0, 0], [31, 0, 0]]
    assert batch.score_mask.tolist() == [[True, True, False], [True, True, True],
                                         [True, False, False], [True, False, False]]
    # the state predicting each target: the context's last (index 2), then the tail's own;
    # the second example's states start at 6 (one row of 6)
    gathered = batch.gather[batch.score_mask].tolist()
    assert gathered == [2, 3, 2, 4, 5, 6, 6]
    assert packed_length(rows) == 6
    mask = packed_attention_mask(batch.owners, batch.segments)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],   # a's token: the context and itself
                    [1, 1, 1, 0, 1, 0],   # b's first: the context, not a
                    [1, 1, 1, 0, 1, 1]]
    padding_keys = packed_attention_mask(batch.owners, batch.segments)[1, 0, :, 1:]
    assert not padding_keys.any()


def test_examples_share_a_row_and_never_read_each_other():
    # widths 6, 3 and 2: the second and third fill the row the first leaves... no: rows are
    # as wide as the longest (6), so 3 + 2 share the second row
    long = [Row([11, 12, 13], [20, 21]), Row([11, 12, 13], [22, 23, 24])]
    short = [Row([15], [30, 31]), Row([15], [32, 33])]
    tiny = [Row([16], [34]), Row([16], [35])]
    batch = packed_batch([long, short, tiny], PAD)
    assert batch.input_ids.tolist() == [[11, 12, 13, 20, 22, 23], [15, 30, 32, 16, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 1, 0, 0, 0]]
    assert batch.owners.tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 1, 2, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 0, 0, 0]]
    # candidates in the examples' order; the third example's context (flat 9) predicts both
    assert batch.targets.tolist() == [[20, 21, 0], [22, 23, 24], [30, 31, 0], [32, 33, 0],
                                      [34, 0, 0], [35, 0, 0]]
    assert batch.gather[batch.score_mask].tolist() == [2, 3, 2, 4, 5, 6, 7, 6, 8, 9, 9]
    mask = packed_attention_mask(batch.owners, batch.segments)[1, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 0, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0],   # the third example reads only itself
                    [0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0]]


def test_an_unshared_context_tail_is_read_but_not_scored():
    # contexts that differ after a common prefix: the rest of each is part of its tail
    rows = [Row([11, 12, 40], [20]), Row([11, 12, 41, 42], [21, 22])]
    batch = packed_batch([rows], PAD)
    assert batch.input_ids.tolist() == [[11, 12, 40, 41, 42, 21]]
    assert batch.positions.tolist() == [[0, 1, 2, 2, 3, 4]]
    assert batch.targets.tolist() == [[40, 20, 0, 0], [41, 42, 21, 22]]
    assert batch.score_mask.tolist() == [[False, True, False, False],
                                         [False, False, True, True]]


GROUPS = [
    [Row([11, 12, 13], [20, 21]), Row([11, 12, 13], [22, 23, 24]), Row([11, 12, 13], [25])],
    [Row([15, 16], [30]), Row([15, 17, 18], [31, 32])],
    [Row([19], [33, 34, 35, 36]), Row([19], [37])],
]


def test_packed_scores_equal_one_row_per_candidate():
    model = tiny_gpt()
    # the last example (packed length 1) shares the row of the third (4, rows are 6 wide)
    groups = GROUPS + [[Row([19], [33]), Row([19], [37])]]
    with torch.no_grad():
        flat = candidate_losses(model, flat_batch([r for g in groups for r in g], "gpt",
                                                  PAD, PAD))
        batch = packed_batch(groups, PAD)
        packed = candidate_losses(model, batch)
        alone = [candidate_losses(model, flat_batch([r], "gpt", PAD, PAD))[0].item()
                 for g in groups for r in g]
    assert len(batch.input_ids) == 3
    assert torch.equal(packed[1], flat[1])
    assert packed[1].tolist() == [2, 3, 1, 1, 2, 4, 1, 1, 1]
    assert packed[0].tolist() == pytest.approx(alone, abs=1e-5)
    assert torch.allclose(packed[0], flat[0], atol=1e-5)


def test_the_head_scores_a_few_positions_at_a_time(monkeypatch):
    """candidate_losses makes the scored positions' logits LOGIT_CHUNK_ELEMENTS at a time
    (perplexity.token_logprobs):
    sums, counts and greedy flags as from all the logits at once, written out here."""
    model = tiny_gpt()
    with torch.no_grad():
        greedy_next = model(torch.tensor([[19]]), return_hidden=False)[0, -1].argmax().item()
        groups = GROUPS + [[Row([19], [greedy_next]), Row([19], [(greedy_next + 1) % 60])]]
        batch = packed_batch(groups, PAD)
        hidden, targets, mask = packed_states(model, batch)
        logprobs = torch.log_softmax(model.lm_head(hidden).float(), -1)
        token = logprobs.gather(-1, targets[:, None])[:, 0]
        hit = logprobs.argmax(-1) == targets
        rows = torch.nonzero(mask)[:, 0]
        expected = [token[rows == r].sum().item() for r in range(len(mask))]
        expected_greedy = [bool(hit[rows == r].all()) for r in range(len(mask))]
        monkeypatch.setattr(HEAD, "LOGIT_CHUNK_ELEMENTS", 3 * 60)  # 3 positions a chunk
        logprob, count, greedy = candidate_losses(model, batch, greedy=True)
    assert len(hidden) == 16  # six chunks, the last of one position
    assert logprob.tolist() == pytest.approx(expected, abs=1e-5)
    assert count.tolist() == mask.sum(-1).tolist()
    assert greedy.tolist() == expected_greedy
    assert greedy.tolist()[-2:] == [True, False]


def test_rows_are_first_fit_longest_first():
    """pack_rows' tree gives the rows that scanning every row for the first with room gives."""

    def scan(lengths, width):
        rows, room = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            at = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if at is None:
                rows.append([])
                room.append(width)
                at = len(rows) - 1
            rows[at].append(i)
            room[at] -= lengths[i]
        return rows

    generator = random.Random(0)
    for n in (1, 2, 3, 7, 64, 500):
        lengths = [generator.randint(1, 100) for _ in range(n)]
        for width in (max(lengths), int(max(lengths) * 1.5), 3 * max(lengths)):
            assert pack_rows(lengths, width) == scan(lengths, width)
    assert pack_rows([5, 3, 2, 4, 1], 5) == [[0], [3, 4], [1, 2]]


def test_rows_widen_where_the_examples_do_not_pair_at_the_longest_width():
    lengths = [99] + [60] * 8 + [40] * 4
    # 99 wide: 99, each 60 alone, 40 + 40 twice; 148: 99 + 40, 60 + 60 four times, 40 x 3;
    # 198: 99 + 60, 60 x 3 twice, 60 + 40 x 3, 40; 297: three rows
    assert [len(pack_rows(lengths, w)) for w in (99, 148, 198, 297)] == [11, 6, 5, 3]
    # positions x (1 + attention): 99 x 11 x 1.058 = 1,152; 148 x 6 x 1.087 = 965;
    # 198 x 5 x 1.116 = 1,105; 297 x 3 x 1.174 = 1,046
    assert ATTENTION_KEY_COST == pytest.approx(0.45)
    assert pack_task(lengths, 768) == (148, pack_rows(lengths, 148))
    # examples that fill the longest's rows: wider rows only add attention
    assert pack_task([50, 30, 20, 50, 25, 25], 768)[0] == 50
    # a narrow model pays more for each key: at d_model 8 the padding costs less
    assert pack_task(lengths, 8)[0] == 99


def test_a_wider_row_scores_the_same():
    model = tiny_gpt()
    with torch.no_grad():
        narrow = candidate_losses(model, packed_batch(GROUPS, PAD))
        wide_batch = packed_batch(GROUPS, PAD, width=15)
        wide = candidate_losses(model, wide_batch)
    assert [packed_length(g) for g in GROUPS] == [6, 5, 4]
    assert wide_batch.input_ids.shape == (1, 15)  # all three examples in one row
    assert torch.equal(wide[1], narrow[1])
    assert torch.allclose(wide[0], narrow[0], atol=1e-5)


def test_another_candidates_tail_does_not_change_a_score():
    model = tiny_gpt()
    first = [Row([11, 12], [20, 21]), Row([11, 12], [22, 23])]
    other = [Row([11, 12], [20, 21]), Row([11, 12], [40, 41, 42, 43])]
    with torch.no_grad():
        a = candidate_losses(model, packed_batch([first], PAD))[0]
        b = candidate_losses(model, packed_batch([other], PAD))[0]
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-6)
    assert a[1].item() != pytest.approx(b[1].item(), abs=1e-3)


class FrontPrompt:
    """Two prompt slots before the context (the seam of scoring's module docstring)."""

    def __init__(self, width: int):
        torch.manual_seed(1)
        self.table = torch.nn.Parameter(torch.randn(2, width))

    def place(self, parts):
        return [PAD, PAD] + [t for p in parts for t in p], [0, 1]

    def embed(self, model, input_ids, slots):  # slots: flat indices, one example a row
        embeds = model.wte(input_ids).reshape(-1, model.cfg.d_model).clone()
        for example in slots:
            embeds[example] = self.table
        return embeds.view(*input_ids.shape, -1)


def test_a_soft_prompt_gets_the_same_scores_and_gradient_packed():
    model = tiny_gpt()
    prompt = FrontPrompt(model.cfg.d_model)
    groups = []
    # the last two examples (packed lengths 3 and 4) share a row: one has two prompts
    for g in GROUPS + [[Row([21], [40]), Row([21], [41])], [Row([22], [42, 43])]]:
        ids, slots = prompt.place([g[0].context])
        groups.append([Row(ids[:2] + r.context, r.continuation, slots) for r in g])
    assert len(packed_batch(groups, PAD).input_ids) < len(groups)
    results = []
    for batch in (flat_batch([r for g in groups for r in g], "gpt", PAD, PAD),
                  packed_batch(groups, PAD)):
        prompt.table.grad = None
        logprob, counts = candidate_losses(model, batch, prompt)
        (logprob / counts).sum().backward()
        results.append((logprob.detach(), prompt.table.grad.clone()))
    (flat_lp, flat_grad), (packed_lp, packed_grad) = results
    assert torch.allclose(flat_lp, packed_lp, atol=1e-5)
    assert flat_grad.abs().sum() > 0
    assert torch.allclose(flat_grad, packed_grad, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_a_prompt_slot_outside_the_shared_context_is_refused():
    rows = [Row([11, PAD, 12], [20], [1]), Row([11, PAD, 13], [21], [1])]
    packed_batch([rows], PAD)  # slot 1 is in the shared prefix [11, PAD]
    rows = [Row([11, 12, PAD], [20], [2]), Row([11, 13, PAD], [21], [2])]
    with pytest.raises(CpmError, match="prompt slot falls outside"):
        packed_batch([rows], PAD)
