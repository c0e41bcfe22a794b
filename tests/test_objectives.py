"""CPM-1's LM batch and loss; CPM-2's span corruption and encoder-decoder batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpmctl.errors import CpmError
from cpmctl.recipe import DataConfig, span_corruption_lengths
from cpmctl.train.objectives import (
    encdec_batch,
    encdec_loss,
    lm_batch,
    lm_loss,
    noise_span_lengths,
    span_corrupt,
)

EOD, PAD = 7, 5
SENTINELS = (1000, 190)  # (first id, count); raw tokens stay below 1000


def test_lm_batch_masks_only_after_eod_inputs():
    x = np.array([[10, 11, EOD, 12, 13, EOD, EOD, 14],
                  [EOD, 20, 21, 22, 23, 24, 25, EOD]], dtype=np.int64)
    b = lm_batch(x, EOD)
    assert torch.equal(b["input_ids"], torch.from_numpy(x[:, :-1]))
    assert torch.equal(b["labels"], torch.from_numpy(x[:, 1:]))
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    expected = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(b["loss_mask"], expected)
    # <eod> as a label is still predicted (row 0 position 1 -> label EOD)
    assert b["labels"][0, 1] == EOD and b["loss_mask"][0, 1] == 1


def test_lm_batch_rejects_bad_shape():
    with pytest.raises(CpmError):
        lm_batch(np.array([1, 2, 3]), EOD)


def test_lm_loss_equals_cross_entropy_over_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    loss, n = lm_loss(logits, labels, mask)
    assert n == 4 and loss.dtype == torch.float32
    keep = mask.bool()
    want = F.cross_entropy(logits.float()[keep], labels[keep])
    torch.testing.assert_close(loss, want)
    # by hand: -log softmax at the label, averaged over the 4 kept positions
    lf = logits.float()
    by_hand = -sum(torch.log_softmax(lf[b, t], -1)[labels[b, t]]
                   for b, t in [(0, 0), (0, 2), (1, 1), (1, 2)]) / 4
    torch.testing.assert_close(loss, by_hand)


def test_lm_loss_all_masked_is_zero_with_gradient():
    logits = torch.randn(1, 2, 4, requires_grad=True)
    loss, n = lm_loss(logits, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_encdec_loss_is_the_masked_mean():
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    loss, n = encdec_loss(logits, labels, mask)
    assert n == 5
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask.bool()], labels[mask.bool()]))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, first: int = SENTINELS[0]) -> list[int]:
    """Replace each sentinel of the input by the tokens after it in the target."""
    fills: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t >= first:
            current = t
            fills[current] = []
        else:
            fills[current].append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(fills[t] if t >= first else [t])
    return out


def test_span_corrupt_reconstructs_and_numbers_sentinels():
    master = np.random.default_rng(0)
    for trial in range(300):
        length = int(master.integers(2, 400))
        density = float(master.choice([0.15, 0.3, 0.5, 0.9]))
        mean_span = float(master.choice([1.0, 3.0, 5.0]))
        tokens = master.integers(8, 1000, size=length)
        rng = np.random.default_rng([trial, 7])
        inputs, targets = span_corrupt(tokens, density, mean_span, (SENTINELS[0], 400), rng,
                                       eod_id=EOD)
        assert inputs[-1] == EOD and targets[-1] == EOD
        assert targets[0] == SENTINELS[0]  # the target starts with <s_0>
        assert reconstruct(inputs[:-1], targets[:-1]) == tokens.tolist()
        in_s = [t - SENTINELS[0] for t in inputs.tolist() if t >= SENTINELS[0]]
        out_s = [t - SENTINELS[0] for t in targets.tolist() if t >= SENTINELS[0]]
        assert in_s == out_s == list(range(len(in_s)))
        # every span non-empty: no two sentinels adjacent in the target, none at the end
        body = targets[:-1]
        is_s = body >= SENTINELS[0]
        assert not np.any(is_s[1:] & is_s[:-1]) and not is_s[-1]
        # the input never starts with a sentinel (T5: noise never first)
        assert inputs[0] < SENTINELS[0]
        # lengths as span_corruption_lengths predicts, when spans are not clamped
        noise = min(max(round(length * density), 1), length - 1)
        spans = max(round(noise / mean_span), 1)
        if spans <= length - noise:
            assert len(in_s) == spans
            assert len(targets) == noise + spans + 1
            assert len(inputs) == length - noise + spans + 1


def test_noise_fraction_and_mean_span_match_the_config():
    noise_total = span_total = token_total = 0
    for i in range(400):
        rng = np.random.default_rng([1, i])
        keep, noise = noise_span_lengths(568, 0.15, 3.0, rng)
        assert np.all(keep >= 1) and np.all(noise >= 1) and len(keep) == len(noise)
        assert keep.sum() + noise.sum() == 568
        noise_total += noise.sum()
        span_total += len(noise)
        token_total += 568
    assert abs(noise_total / token_total - 0.15) < 0.002
    assert abs(noise_total / span_total - 3.0) < 0.1


def test_span_lengths_are_random_not_fixed():
    lengths = np.concatenate([noise_span_lengths(568, 0.15, 3.0, np.random.default_rng(i))[1]
                              for i in range(50)])
    assert lengths.min() == 1 and lengths.max() >= 6


def test_too_few_sentinels_is_an_error():
    with pytest.raises(CpmError, match="sentinels"):
        span_corrupt(np.arange(8, 108), 0.5, 1.0, (1000, 3), np.random.default_rng(0))
    with pytest.raises(CpmError):
        span_corrupt(np.arange(8, 108), 0.15, 3.0, None, np.random.default_rng(0))


def test_cpm2_length_arithmetic():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    data = DataConfig(seq_len=512, decoder_seq_len=0)
    assert data.span_lengths() == (568, 114)
    rng = np.random.default_rng(3)
    for i in range(20):
        inputs, targets = span_corrupt(rng.integers(8, 1000, 568), 0.15, 3.0, SENTINELS,
                                       np.random.default_rng(i), eod_id=EOD)
        assert len(inputs) == 512 and len(targets) == 114  # fit exactly


def make_rows(batch: int, width: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(8, 1000, size=(batch, width))
    rows[:, width // 3] = EOD  # packed documents: <eod> inside a sample is an ordinary token
    return rows


def batch_of(rows, consumed, seed=1234, data=None, **kw):
    data = data or DataConfig(seq_len=512, decoder_seq_len=0)
    return encdec_batch(rows, consumed, seed, data, eod_id=EOD, pad_id=PAD,
                        sentinels=SENTINELS, **kw)


@pytest.mark.parametrize("decoder_seq_len", [0, 256])
def test_encdec_batch_shapes_and_alignment(decoder_seq_len):
    data = DataConfig(seq_len=512, decoder_seq_len=decoder_seq_len)
    raw, dec = data.span_lengths()
    rows = make_rows(6, raw)
    b = batch_of(rows, 100, data=data)
    assert b["input_ids"].shape == (6, 512) and b["attention_mask"].shape == (6, 512)
    for key in ("decoder_input_ids", "decoder_attention_mask", "labels", "loss_mask"):
        assert b[key].shape == (6, dec)
    for i in range(6):
        n_in = int(b["attention_mask"][i].sum())
        n_out = int(b["decoder_attention_mask"][i].sum())
        assert n_in <= 512 and n_out <= dec
        assert torch.all(b["input_ids"][i, n_in:] == PAD)
        assert torch.all(b["labels"][i, n_out:] == PAD)
        assert torch.all(b["decoder_input_ids"][i, n_out:] == PAD)
        assert b["decoder_input_ids"][i, 0] == PAD  # the start token
        assert torch.equal(b["decoder_input_ids"][i, 1:n_out], b["labels"][i, :n_out - 1])
        assert b["labels"][i, n_out - 1] == EOD and b["input_ids"][i, n_in - 1] == EOD
        inputs = b["input_ids"][i, :n_in - 1].numpy()
        targets = b["labels"][i, :n_out - 1].numpy()
        assert reconstruct(inputs, targets) == rows[i].tolist()
    assert torch.equal(b["loss_mask"], b["decoder_attention_mask"].float())


def test_encdec_batch_lengths_never_exceed_limits_for_cpm2():
    data = DataConfig(seq_len=512, decoder_seq_len=0)
    for start in range(0, 400, 40):
        b = batch_of(make_rows(40, 568, seed=start), start, seed=start, data=data)
        assert int(b["attention_mask"].sum(1).max()) <= 512
        assert int(b["decoder_attention_mask"].sum(1).max()) <= 114
    shorter = batch_of(make_rows(4, 300), 0, data=data)  # shorter rows pad out
    assert int(shorter["attention_mask"].sum(1).max()) < 512


def test_encdec_batch_too_long_rows_are_an_error():
    with pytest.raises(CpmError, match="raw tokens"):
        batch_of(make_rows(2, 700), 0)


def test_encdec_batch_depends_only_on_seed_and_global_index():
    rows = make_rows(8, 568)
    whole = batch_of(rows, 1000)
    # the same samples, split differently (as a resumed run or another micro batch sees them)
    tail = batch_of(rows[3:], 1003)
    for key in whole:
        assert torch.equal(whole[key][3:], tail[key])
    again = batch_of(rows, 1000)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    # another global index or another seed corrupts the same tokens differently
    shifted = batch_of(rows, 1001)
    reseeded = batch_of(rows, 1000, seed=99)
    assert not torch.equal(whole["input_ids"], shifted["input_ids"])
    assert not torch.equal(whole["input_ids"], reseeded["input_ids"])


def test_encdec_batch_custom_start_token_and_model_forward():
    from cpmctl.models import build_model
    from cpmctl.models.config import ModelConfig

    data = DataConfig(seq_len=24, decoder_seq_len=0)
    raw, dec = data.span_lengths()
    rows = np.random.default_rng(0).integers(8, 60, size=(2, raw))
    b = encdec_batch(rows, 0, 1, data, eod_id=EOD, pad_id=PAD, sentinels=(90, 10),
                     decoder_start_id=1)
    assert torch.all(b["decoder_input_ids"][:, 0] == 1)
    model = build_model(ModelConfig(arch="encdec", vocab_size=100, d_model=32, n_heads=4,
                                    n_layers=1))
    logits = model(b["input_ids"], b["decoder_input_ids"], b["attention_mask"],
                   b["decoder_attention_mask"])
    loss, n = encdec_loss(logits, b["labels"], b["loss_mask"])
    assert logits.shape == (2, dec, 100) and n == int(b["loss_mask"].sum())
    loss.backward()
    assert torch.isfinite(loss)


# --- the fused LM head + loss used by training -----------------------------------------------

def test_fused_lm_loss_equals_the_plain_loss_in_value_and_gradients():
    from cpmctl.train.objectives import fused_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.1).requires_grad_()
    labels = torch.randint(300, (3, 50))
    mask = (torch.rand(3, 50) > 0.2).float()
    plain, count = lm_loss(hidden @ weight.T, labels, mask)
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    fused, fused_count = fused_lm_loss(hidden, weight, labels, mask, chunk=32)
    fused.backward()
    assert int(fused_count) == int(count)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(fused_lm_loss(hidden, weight, labels, mask)[0], plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused_lm_loss(hidden.bfloat16(), weight, labels, mask)[0]
    assert abs(float(low.detach()) - float(plain.detach())) < 0.05


def test_fused_lm_loss_under_autocast_computes_what_a_linear_head_does():
    """Under bf16 autocast the head's matmuls run in bf16 even when the hidden states arrive
    in fp32 (LayerNorm's output under CPU autocast is fp32): the loss an `nn.Linear` head gives
    under autocast, and its gradients to bf16 rounding."""
    from cpmctl.train.objectives import fused_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.3).requires_grad_()
    labels = torch.randint(500, (2, 40))
    mask = (torch.rand(2, 40) > 0.2).float()
    grads = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (fused_lm_loss(hidden, weight, labels, mask, chunk=16)[0] if fused
                    else lm_loss(F.linear(hidden, weight), labels, mask)[0])
        loss.backward()
        grads.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    (autocast_loss, *expected), (fused_loss, *got) = grads
    torch.testing.assert_close(fused_loss, autocast_loss, rtol=1e-5, atol=1e-5)
    fp32_loss = lm_loss(hidden.detach() @ weight.detach().T, labels, mask)[0]
    assert abs(float(fp32_loss) - float(fused_loss)) > 1e-4  # it did run in bf16
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-4)
