"""Learning-rate schedules and the AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cpmctl.errors import CpmError
from cpmctl.models import build_model, count_parameters
from cpmctl.models.config import ModelConfig, MoeConfig
from cpmctl.models.layers import RMSNorm
from cpmctl.recipe import TrainConfig
from cpmctl.train.optim import build_optimizer, decay_split, parameter_groups
from cpmctl.train.schedule import learning_rate


def cfg(schedule: str, **kw) -> TrainConfig:
    base = dict(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "noam", "constant"])
def test_warmup_is_linear_from_zero_to_the_peak(schedule):
    t = cfg(schedule)
    assert learning_rate(0, t) == pytest.approx(0.1)  # lr × 1 / 10
    assert learning_rate(4, t) == pytest.approx(0.5)
    assert learning_rate(9, t) == pytest.approx(1.0)  # end of warmup: the peak


@pytest.mark.parametrize("schedule, quarter, mid", [
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55),
    ("linear", 1.0 - 0.9 * 0.25, 0.55),
    ("constant", 1.0, 1.0),
])
def test_decay_schedules(schedule, quarter, mid):
    t = cfg(schedule)  # 100 decay steps: the step numbered s = step + 1 is at (s - 10) / 100
    assert learning_rate(34, t) == pytest.approx(quarter)
    assert learning_rate(59, t) == pytest.approx(mid)
    end = 1.0 if schedule == "constant" else 0.1
    assert learning_rate(109, t) == pytest.approx(end)  # the last step: lr × min_lr_ratio
    assert learning_rate(500, t) == pytest.approx(end)  # past the end: stays there


def test_decay_is_monotonic_after_warmup():
    for schedule in ("cosine", "linear", "noam"):
        t = cfg(schedule)
        values = [learning_rate(s, t) for s in range(9, 110)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_noam_peaks_at_lr_and_decays_as_inverse_sqrt():
    t = cfg("noam", lr=2e-3, steps=1000)
    assert learning_rate(9, t) == pytest.approx(2e-3)  # the peak is train.lr
    assert max(learning_rate(s, t) for s in range(1000)) == pytest.approx(2e-3)
    assert learning_rate(39, t) == pytest.approx(2e-3 * 0.5)  # sqrt(10 / 40)
    assert learning_rate(159, t) == pytest.approx(2e-3 * 0.25)  # sqrt(10 / 160)
    for s in (20, 100, 999):
        assert learning_rate(s, t) == pytest.approx(2e-3 * math.sqrt(10 / (s + 1)))


def test_noam_cpm2_recipe_numbers():
    t = TrainConfig(steps=200000, lr=1e-5, schedule="noam", warmup_ratio=0.05)
    assert t.warmup == 10000
    assert learning_rate(9999, t) == pytest.approx(1e-5)
    # the CPM-2 script's curve: 1e-3 × min(s / W^1.5, 1 / sqrt(s))
    for s in (1, 5000, 10000, 40000, 200000):
        assert learning_rate(s - 1, t) == pytest.approx(1e-3 * min(s / 10000 ** 1.5, s ** -0.5))


def test_no_warmup_and_errors():
    t = cfg("linear", warmup_steps=0)
    assert learning_rate(0, t) == pytest.approx(1.0 - 0.9 / 110)
    assert learning_rate(109, t) == pytest.approx(0.1)
    assert learning_rate(0, cfg("constant", warmup_steps=0)) == 1.0
    with pytest.raises(CpmError, match="warmup"):
        learning_rate(0, cfg("noam", warmup_steps=0))
    with pytest.raises(CpmError):
        learning_rate(-1, cfg("cosine"))
    with pytest.raises(CpmError, match="schedule"):
        learning_rate(0, cfg("exponential"))


def test_warmup_ratio():
    t = TrainConfig(steps=100, lr=1.0, warmup_ratio=0.05, schedule="cosine")
    assert learning_rate(0, t) == pytest.approx(0.2)
    assert learning_rate(4, t) == pytest.approx(1.0)


# ---------------------------------------------------------------- parameter groups


def tiny(arch: str, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                       max_positions=32, **kw)


def owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    found: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            found.setdefault(id(p), []).append(module)
    return found


@pytest.mark.parametrize("config", [tiny("gpt"), tiny("encdec"),
                                    tiny("encdec", moe=MoeConfig(experts=2)),
                                    tiny("gpt", moe=MoeConfig(experts=2, router="topk"))],
                         ids=["gpt", "encdec", "encdec-moe", "gpt-moe"])
def test_parameter_groups_partition_the_model(config):
    model = build_model(config)
    groups = parameter_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # nobody twice, tied weights included
    assert set(ids) == {id(p) for p in model.parameters()}  # everybody
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(config)
    mods = owners(model)
    for p, name in zip(groups[0]["params"], groups[0]["names"], strict=True):
        assert p.ndim == 2 and name.endswith("weight")
        assert all(isinstance(m, nn.Linear) for m in mods[id(p)]), name
    for p, name in zip(groups[1]["params"], groups[1]["names"], strict=True):
        is_linear_matrix = all(isinstance(m, nn.Linear) for m in mods[id(p)])
        assert not is_linear_matrix or p.ndim < 2, name
    no_decay = set(groups[1]["names"])
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm, nn.Embedding)):
            assert f"{name}.weight" in no_decay
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert f"{name}.bias" in no_decay
    for name, _ in model.named_parameters():
        if name.endswith("relative_bias.weight") or name.endswith("centroids"):
            assert name in no_decay


def test_tied_gpt_head_once_as_embedding():
    model = build_model(tiny("gpt"))
    assert model.lm_head.weight is model.wte.weight
    decay, no_decay = decay_split(model)
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    assert "wte.weight" in [n for n, _ in no_decay] and "lm_head.weight" not in names
    assert sum(p is model.wte.weight for _, p in decay + no_decay) == 1


def test_encdec_untied_head_decays_shared_embedding_does_not():
    model = build_model(tiny("encdec"))
    decay, no_decay = decay_split(model)
    assert "lm_head.weight" in dict(decay) and "shared.weight" in dict(no_decay)
    assert "encoder.0.attn.q.weight" in dict(decay) and "encoder_norm.weight" in dict(no_decay)


def test_frozen_parameters_are_left_out():
    model = build_model(tiny("gpt"))
    model.wpe.weight.requires_grad_(False)
    ids = {id(p) for g in parameter_groups(model, 0.1) for p in g["params"]}
    assert id(model.wpe.weight) not in ids and id(model.wte.weight) in ids


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_adamw_step(arch, fused):
    torch.manual_seed(0)
    model = build_model(tiny(arch))
    train = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-6)
    opt = build_optimizer(model, train, fused=fused)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["lr"] == 1e-2
    if fused is None:
        assert opt.defaults["fused"]  # CPU float parameters: the fused kernel
    # zero gradients: Adam's update is 0, so only the decoupled decay moves a weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = set(opt.param_groups[0]["names"])
    for n, p in model.named_parameters():
        factor = 1 - 1e-2 * 0.1 if n in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)
    # a real step moves the loss
    ids = torch.randint(8, 100, (2, 12))
    run = (lambda: model(ids)) if arch == "gpt" else (lambda: model(ids, ids))
    opt.zero_grad()
    first = nn.functional.cross_entropy(run().flatten(0, 1), ids.flatten())
    first.backward()
    for group in opt.param_groups:  # how the trainer sets the schedule's rate
        group["lr"] = 1e-2
    opt.step()
    with torch.no_grad():
        second = nn.functional.cross_entropy(run().flatten(0, 1), ids.flatten())
    assert torch.isfinite(second) and second < first
