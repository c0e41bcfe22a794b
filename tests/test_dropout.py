"""cpmctl's dropout (models/dropout.py): the drop rate, the scale, a bool mask saved for the
backward pass, seeded replay, and attention-probability dropout through it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cpmctl.models.dropout import Dropout, _keep_mask, dropout
from cpmctl.models.layers import attention


def test_drop_rate_and_scale():
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    threshold = round(0.1 * 32768)
    # the kept values are scaled by the inverse of the keep probability actually used
    assert torch.all(y[kept] == 32768 / (32768 - threshold))
    rate = 1 - kept.float().mean().item()
    sigma = math.sqrt(0.1 * 0.9 / x.numel())
    assert abs(rate - threshold / 32768) < 5 * sigma
    # the mean is kept
    assert abs(y.mean().item() - 1.0) < 5 * sigma / 0.9


def test_lanes_are_uniform():
    """Every one of the four 15-bit lanes of a 64-bit draw drops at the same rate."""
    torch.manual_seed(1)
    keep = _keep_mask(torch.Size([4 * 250_000]), round(0.25 * 32768), torch.device("cpu"))
    rates = 1 - keep.view(-1, 4).float().mean(0)
    assert torch.all((rates - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / 250_000))


def test_backward_uses_the_forward_mask_and_saves_bools():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    saved = y.grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [torch.bool]
    y.sum().backward()
    scale = 32768 / (32768 - round(0.3 * 32768))
    assert torch.equal(x.grad, (y != 0).float() * scale)
    assert torch.allclose(y, x.detach() * x.grad)


def test_identity_when_off():
    x = torch.randn(5, 7)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0, training=True)


def test_seeded_and_replayed_by_activation_checkpointing():
    x = torch.randn(16, 40, requires_grad=True)
    layer = torch.nn.Linear(40, 40)

    def f(t):
        return dropout(torch.tanh(layer(t)), 0.2, training=True)

    torch.manual_seed(3)
    plain = f(x)
    plain.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    replayed = checkpoint(f, x, use_reentrant=False)
    replayed.square().sum().backward()
    assert torch.equal(plain, replayed)
    assert torch.equal(grad, x.grad)


def test_attention_dropout_is_the_same_math_with_this_mask():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 6, 8, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = attention(q, k, v, causal=True, dropout=0.25)
    torch.manual_seed(5)
    keep = _keep_mask(torch.Size([2, 3, 6, 6]), round(0.25 * 32768), torch.device("cpu"))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, -1) * keep * (32768 / (32768 - round(0.25 * 32768)))
    expected = probs @ v
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # without dropout, the same call is SDPA's
    plain = attention(q, k, v, causal=True)
    assert torch.allclose(plain, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          atol=1e-6)
