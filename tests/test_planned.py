"""Generation's planned steps (cpmctl/infer/planned.py) and their attention kernel (attend.c):
the kernel against PyTorch's attention, its argument checks, the plan against the module
forward, and the batch size never changing the text (to the bit with the int8 kernel)."""

from __future__ import annotations

import json

import pytest
import torch

from cpmctl.infer import KVCache, generate_tokens
from cpmctl.infer.load import prepare_for_inference
from cpmctl.infer.planned import PlannedEncDec, PlannedGpt
from cpmctl.kernels import attention, library
from cpmctl.models import MoeConfig
from tests.test_infer import settings, tokens_of, varied_encdec, varied_gpt


@pytest.fixture
def kernels(monkeypatch):
    """cpmctl's kernel library, built for this CPU (skipped where it cannot be built)."""
    monkeypatch.delenv(library.KERNEL_ENV, raising=False)
    library.load.cache_clear()
    if not attention.available():
        pytest.skip("cpmctl's kernel library cannot be built here (no C compiler or AVX2 + FMA)")
    yield
    library.load.cache_clear()


def row_by_row(model) -> bool:
    """Whether every matmul of the prepared model runs on one of cpmctl's kernels, which
    compute each row on its own (oneDNN's and PyTorch's need not)."""
    layers = [m for m in model.modules() if hasattr(m, "kernel")]
    return bool(layers) and all(m.kernel.startswith("cpmctl") for m in layers)


def reference(qkv, keys, values, length, mask, *, scale=None, bias=None, cross=False):
    """What the kernel computes, in fp64 over the cache it has written (cross: the queries
    alone over `length` keys, no causal mask)."""
    batch, new, _ = qkv.shape
    heads, d_head = keys.shape[1], keys.shape[3]
    parts = 1 if cross else 3
    q = qkv.double().view(batch, new, parts, heads, d_head)[:, :, 0].transpose(1, 2)
    end = length if cross else length + new
    visible = torch.ones(batch, 1, new, end, dtype=torch.bool)
    if not cross:
        visible = visible.tril(length)
    if mask is not None:
        visible = visible & mask[:, None, None, :end].bool()
    scores = q @ keys[:, :, :end].double().transpose(-1, -2) * (scale or d_head ** -0.5)
    if bias is not None:
        scores = scores + bias[None, :, :, :end].double()
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (weights @ values[:, :, :end].double()).transpose(1, 2).reshape(batch, new, -1)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16], ids=["cache32", "cache16"])
@pytest.mark.parametrize("new", [1, 5])  # a decoding step, a prefill continuing a cache
def test_attention_kernel_matches_pytorchs(kernels, act, cache, new):
    torch.manual_seed(new)
    batch, heads, d_head, max_len, length = 3, 4, 24, 16, 6  # 24: not a multiple of 16
    keys = torch.randn(batch, heads, max_len, d_head).to(cache)
    values = torch.randn(batch, heads, max_len, d_head).to(cache)
    qkv = torch.randn(batch, new, 3 * heads * d_head).to(act)
    mask = torch.ones(batch, max_len, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, length] = 0  # a finished row's new position
    mask[0, :length + new] = 0  # nothing to attend: zeros
    before_k, before_v = keys.clone(), values.clone()
    out = attention.attend(qkv, keys, values, length, mask)
    assert out.shape == (batch, new, heads * d_head) and out.dtype == act
    split = qkv.view(batch, new, 3, heads, d_head).permute(0, 2, 3, 1, 4)  # [b, 3, h, new, d]
    before_k[:, :, length:length + new] = split[:, 1].to(cache)
    before_v[:, :, length:length + new] = split[:, 2].to(cache)
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)
    expected = reference(qkv, keys, values, length, mask)
    tolerance = 1e-5 if act == torch.float32 else 2 ** -7
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert not out[0].any()
    again = attention.attend(qkv, keys.clone(), values.clone(), length, None)
    torch.testing.assert_close(again.double(), reference(qkv, keys, values, length, None),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_kernel_scale_bias_and_cross(kernels, act):
    """T5's form: scale 1 and a relative position bias [heads, new, keys] added to the scores;
    and cross-attention, the queries over an encoder's `length` cached keys, padding masked."""
    torch.manual_seed(7)
    batch, heads, d_head, max_len, length, new = 2, 3, 20, 12, 5, 2
    keys = torch.randn(batch, heads, max_len, d_head)
    values = torch.randn(batch, heads, max_len, d_head)
    qkv = torch.randn(batch, new, 3 * heads * d_head).to(act)
    bias = torch.randn(heads, new, length + new + 3)  # wider than the keys read: allowed
    tolerance = 1e-5 if act == torch.float32 else 2 ** -7
    out = attention.attend(qkv, keys, values, length, None, scale=1.0, bias=bias)
    torch.testing.assert_close(out.double(), reference(qkv, keys, values, length, None,
                                                       scale=1.0, bias=bias),
                               atol=tolerance, rtol=tolerance)
    queries = torch.randn(batch, new, heads * d_head).to(act)
    source = torch.ones(batch, max_len, dtype=torch.long)
    source[1, :2] = 0  # the encoder's left padding
    before = keys.clone()
    out = attention.attend_cross(queries, keys, values, 9, source, scale=1.0)
    assert torch.equal(keys, before)  # nothing appended
    torch.testing.assert_close(out.double(), reference(queries, keys, values, 9, source,
                                                       scale=1.0, cross=True),
                               atol=tolerance, rtol=tolerance)
    for args, kwargs, message in (
            ((queries, keys, values, 13), {}, "queries over 13 keys"),
            ((queries, keys, values, 0), {}, "queries over 0 keys"),
            ((queries, keys, values, 9, source[:, :8]), {}, "mask"),
            ((qkv, keys, values, 9), {}, "does not match")):
        with pytest.raises(ValueError, match=message):
            attention.attend_cross(*args, **kwargs)
    with pytest.raises(ValueError, match="bias"):
        attention.attend(qkv, keys, values, length, None, bias=bias[:, :, :length + 1])
    with pytest.raises(ValueError, match="bias"):
        attention.attend(qkv, keys, values, length, None, bias=bias.double())


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_kernel_keeps_a_nan_query_nan(kernels, act):
    """A NaN score is not taken for a masked key: its head's output is NaN, as PyTorch's."""
    keys, values = torch.randn(1, 2, 8, 16).to(act), torch.randn(1, 2, 8, 16).to(act)
    qkv = torch.randn(1, 1, 3 * 2 * 16).to(act)
    qkv[0, 0, 3] = float("nan")  # head 0's query
    out = attention.attend(qkv, keys, values, 4)
    assert out[0, 0, :16].isnan().all() and out[0, 0, 16:].isfinite().all()


def test_attention_kernel_refuses_what_it_would_read_past(kernels):
    keys = torch.zeros(2, 4, 8, 16)
    qkv = torch.zeros(2, 1, 192)
    cases = [
        (torch.zeros(2, 1, 96), keys, keys.clone(), 3, None, "does not match a cache"),
        (torch.zeros(1, 1, 192), keys, keys.clone(), 3, None, "does not match a cache"),
        (qkv, keys, keys.clone(), 8, None, "do not fit a cache of 8"),
        (torch.zeros(2, 4, 192), keys, keys.clone(), 5, None, "do not fit a cache of 8"),
        (qkv, keys, keys[:, :, :7].clone(), 3, None, "one 4-d shape"),
        (qkv, keys, keys.clone(), 3, torch.ones(2, 3, dtype=torch.long), "mask"),
        (qkv, keys, keys.clone(), 3, torch.ones(2, 8, dtype=torch.int32), "mask"),
        (qkv, keys.transpose(2, 3).contiguous().transpose(2, 3), keys.clone(), 3, None,
         "contiguous"),
        (qkv.double(), keys, keys.clone(), 3, None, "fp32 or bf16"),
    ]
    for qkv_, keys_, values_, length, mask, message in cases:
        with pytest.raises(ValueError, match=message):
            attention.attend(qkv_, keys_, values_, length, mask)


def test_attention_kernel_op_schema(kernels):
    keys = torch.randn(2, 4, 8, 16)
    torch.library.opcheck(torch.ops.cpmctl.attend.default,
                          (torch.randn(2, 3, 192), keys, keys.clone(), 2, None, False, 0.0,
                           None))
    torch.library.opcheck(torch.ops.cpmctl.attend.default,
                          (torch.randn(2, 3, 64), keys, keys.clone(), 5, None, True, 1.0, None))


# ---------------------------------------------------------------- the plan


def test_planned_logits_equal_the_module_forwards(kernels):
    """A left-padded batch: the prefill, then steps with a finished row, against the module
    forward over the same cache positions."""
    model = prepare_for_inference(varied_gpt(3))
    plan = PlannedGpt.plan(model)
    assert plan is not None and plan.cache_dtype == torch.float32
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    extra = torch.randint(1, 100, (2, 3))
    ours_cache, theirs_cache = (KVCache.for_model(model.cfg, 2, 10) for _ in range(2))
    with torch.inference_mode():
        ours = [plan.forward(ids, ours_cache, mask)]
        theirs = [model(ids, mask[:, :7], cache=theirs_cache)[:, -1]]
        for i in range(3):
            mask[0, 7 + i] = int(i < 1)  # row 0 finishes after one step
            ours.append(plan.forward(extra[:, i:i + 1], ours_cache, mask))
            theirs.append(model(extra[:, i:i + 1], mask[:, :8 + i], cache=theirs_cache)[:, -1])
    assert ours_cache.length == theirs_cache.length == 10
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), atol=1e-5, rtol=1e-5)
    real = mask.bool()[None, :, None, :, None].expand_as(ours_cache.keys)  # padding: unread
    torch.testing.assert_close(ours_cache.keys[real], theirs_cache.keys[real], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("precision", [{"dtype": "fp32"}, {"dtype": "bf16"},
                                       {"dtype": "bf16", "quantize": "int8"}],
                         ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_planned_generation_is_the_module_forwards(kernels, precision, arch):
    """Greedy text equal to the module forward's, left-padded prompts of two lengths (an
    encoder-decoder's padding is the encoder's)."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    built, planner = (varied_gpt, PlannedGpt) if arch == "gpt" else (varied_encdec,
                                                                     PlannedEncDec)
    model = prepare_for_inference(built(16), **precision)
    assert planner.plan(model) is not None
    planned = tokens_of(model, prompts, settings(16))
    assert planned == tokens_of(model, prompts, settings(16), planned_step=False)
    assert all(len(set(row)) > 2 for row in planned)


@pytest.mark.parametrize("precision", [{"dtype": "fp32"}, {"dtype": "bf16"},
                                       {"dtype": "bf16", "quantize": "int8"}],
                         ids=["fp32", "bf16", "int8"])
def test_a_batch_of_8_generates_what_each_prompt_does_alone(kernels, precision):
    """The planned path at batch 8 (left-padded prompts of 2 to 16 tokens, rows finishing at
    <eod>) against each prompt alone; with cpmctl's matmul kernels (dense_matmul.c for fp32 and
    bf16, int8_matmul.c) every operation is row by row, so the prefill's logits are the same to
    the bit."""
    model = prepare_for_inference(varied_gpt(4), **precision)
    plan = PlannedGpt.plan(model)
    assert plan is not None
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 100, (n,), generator=generator).tolist()
               for n in (2, 16, 5, 9, 3, 12, 7, 16)]
    batch = generate_tokens(model, prompts, settings(16), eod_id=12, pad_id=0)
    alone = [generate_tokens(model, [p], settings(16), eod_id=12, pad_id=0).rows[0]
             for p in prompts]
    assert [r.tokens for r in batch.rows] == [r.tokens for r in alone]
    assert [r.finish_reason for r in batch.rows] == [r.finish_reason for r in alone]
    assert len({tuple(r.tokens) for r in alone}) >= 6  # varied, not one repeated output
    if row_by_row(model):
        longest = max(map(len, prompts))
        ids = torch.zeros(8, longest, dtype=torch.long)
        mask = torch.zeros(8, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            batched = plan.forward(ids, KVCache.for_model(model.cfg, 8, longest,
                                                          dtype=plan.cache_dtype), mask)
            for i, p in enumerate(prompts):
                cache = KVCache.for_model(model.cfg, 1, len(p), dtype=plan.cache_dtype)
                assert torch.equal(plan.forward(torch.tensor([p]), cache)[0], batched[i])


def c_and_python_runs(plan, model) -> list[tuple]:
    """The same steps with the blocks in C and called one by one: a left-padded prefill
    (gpt; encdec: a padded encoder input), then steps with a finished row; each run's logits,
    self-attention keys and values."""
    torch.manual_seed(11)
    ids, extra = torch.randint(1, 100, (2, 7)), torch.randint(1, 100, (2, 3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[0, 9] = 0
    runs, in_c = [], plan.in_c
    for blocks_in_c in (in_c, None):
        plan.in_c = blocks_in_c
        cache = KVCache.for_model(model.cfg, 2, 10, dtype=plan.cache_dtype)
        with torch.inference_mode():
            if model.cfg.arch == "gpt":
                logits = [plan.forward(ids, cache, mask)]
                logits += [plan.forward(extra[:, i:i + 1], cache, mask) for i in range(3)]
            else:
                encoded = model.encode(ids, mask[:, :7])
                logits = [plan.forward(torch.cat((ids, extra), 1)[:, i:i + 1], cache, encoded,
                                       mask[:, :7]) for i in range(10)]
        runs.append((torch.stack(logits).float(), cache.keys.float(), cache.values.float()))
    plan.in_c = in_c
    return runs


@pytest.mark.parametrize("precision", [{"dtype": "fp32"}, {"dtype": "bf16"},
                                       {"dtype": "bf16", "quantize": "int8"}],
                         ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_the_blocks_in_one_c_call_compute_what_the_layer_by_layer_calls_do(kernels, precision,
                                                                          arch):
    """blocks.c (every block in one call, where all matmuls are cpmctl's) against the same
    plan calling each layer's operations from Python: the logits and the cache written."""
    built, planner = (varied_gpt, PlannedGpt) if arch == "gpt" else (varied_encdec,
                                                                     PlannedEncDec)
    model = prepare_for_inference(built(3), **precision)
    plan = planner.plan(model)
    assert (plan.in_c is not None) == row_by_row(model)
    if plan.in_c is None:  # a matmul on oneDNN or PyTorch here: the calls one by one
        return
    # fp32: the norms' sums and GELU's exp differ in their last bits; in bf16 (measured here:
    # equal to the bit) each operation's rounding to bf16 hides that but for rare ties
    tolerance = 1e-5 if plan.cache_dtype == torch.float32 else 2 ** -7
    ours, theirs = c_and_python_runs(plan, model)
    for c_tensor, python_tensor in zip(ours, theirs, strict=True):
        torch.testing.assert_close(c_tensor, python_tensor, atol=tolerance, rtol=tolerance)


def test_the_c_step_refuses_activations_or_a_cache_it_was_not_made_for(kernels):
    model = prepare_for_inference(varied_gpt(3))
    step = PlannedGpt.plan(model).in_c
    assert step is not None  # the library's fp32 kernel runs wherever the library does
    cfg = model.cfg
    cache = KVCache.for_model(cfg, 1, 8)
    x = torch.zeros(1, 2, cfg.d_model)
    for x_, cache_, message in (
            (x.bfloat16(), cache, "activations"),
            (torch.zeros(1, 2, cfg.d_model + 1), cache, "activations"),
            (torch.zeros(2, cfg.d_model), cache, "activations"),
            (x, KVCache.for_model(cfg, 1, 8, dtype=torch.bfloat16), "cache"),
            (x, KVCache(cfg.n_layers + 1, 1, cfg.n_heads, 8, cfg.head_size), "cache"),
            (torch.zeros(2, 2, cfg.d_model), cache, "does not match a cache"),
            (torch.zeros(1, 9, cfg.d_model), cache, "do not fit a cache of 8")):
        with pytest.raises(ValueError, match=message):
            step.run(x_, cache_, None)
    with pytest.raises(ValueError, match="mask"):
        step.run(x, cache, torch.ones(1, 1, dtype=torch.long))


def test_the_decoder_c_step_refuses_a_missing_bias_or_encoder_cache(kernels):
    model = prepare_for_inference(varied_encdec(3))
    step = PlannedEncDec.plan(model).in_c
    assert step is not None
    cfg = model.cfg
    cache = KVCache.for_model(cfg, 1, 8)
    x, bias = torch.zeros(1, 1, cfg.d_model), torch.zeros(cfg.n_heads, 1, 1)
    with pytest.raises(ValueError, match="relative position bias"):
        step.run(x, cache, None, None)
    with pytest.raises(ValueError, match="0 layers of the encoder's keys"):
        step.run(x, cache, bias, None)
    with pytest.raises(ValueError, match="bias"):
        step.run(x, cache, torch.zeros(cfg.n_heads, 2, 1), None)
    keys = torch.zeros(1, cfg.n_heads, 5, cfg.head_size)
    cache.cross = [(keys, keys)] * (cfg.decoder_layers - 1) + [(keys[:, :, :4].clone(), keys)]
    with pytest.raises(ValueError, match="one shape"):
        step.run(x, cache, bias, None)
    cache.cross = [(keys, keys)] * cfg.decoder_layers
    with pytest.raises(ValueError, match="mask"):
        step.run(x, cache, bias, torch.ones(1, 4, dtype=torch.long))
    step.run(x, cache, bias, torch.ones(1, 5, dtype=torch.long))  # what it accepts


def test_the_profiler_names_the_c_blocks(kernels):
    """A step whose blocks run in one C call shows as one named range in a profile."""
    model = prepare_for_inference(varied_gpt(3))
    plan = PlannedGpt.plan(model)
    assert plan.in_c is not None
    cache = KVCache.for_model(model.cfg, 1, 4)
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        plan.forward(torch.tensor([[1, 2, 3]]), cache)
    assert "cpmctl::gpt_layers" in {event.name for event in profile.events()}


def test_without_a_plan_generation_runs_the_module_forward(kernels, monkeypatch):
    moe = prepare_for_inference(varied_gpt(5, moe=MoeConfig(experts=4)))
    assert PlannedGpt.plan(moe) is None
    assert len(tokens_of(moe, [[1, 2, 3]], settings(5))[0]) == 5
    monkeypatch.setenv(library.KERNEL_ENV, "torch")  # no kernel library: PyTorch only
    library.load.cache_clear()
    model = prepare_for_inference(varied_gpt(16))
    assert PlannedGpt.plan(model) is None
    through_modules = tokens_of(model, [[3, 1, 4]], settings(12))
    monkeypatch.delenv(library.KERNEL_ENV)
    library.load.cache_clear()
    assert PlannedGpt.plan(model) is not None
    assert tokens_of(model, [[3, 1, 4]], settings(12)) == through_modules


def test_a_step_past_the_cache_is_refused(kernels):
    model = prepare_for_inference(varied_gpt(6))
    plan = PlannedGpt.plan(model)
    cache = KVCache.for_model(model.cfg, 1, 4)
    with torch.inference_mode():
        plan.forward(torch.tensor([[1, 2, 3, 4]]), cache)
        with pytest.raises(ValueError, match="do not fit a cache of 1 x 4"):
            plan.forward(torch.tensor([[5]]), cache)


def test_bench_speed_times_the_module_forward_beside_the_plan(cli):
    result = cli("bench", "speed", "--recipe", "tiny-gpt", "--precisions", "int8", "--batches",
                 "1", "--no-baseline", "--module-step", "--prompt-tokens", "8", "--new-tokens",
                 "4", "--json")
    assert result.code == 0, result.err
    runs = json.loads(result.out)["runs"]
    assert [(r["impl"], r["precision"], r["batch"]) for r in runs] == [
        ("cpmctl", "int8", 1), ("cpmctl-modules", "int8", 1)]
    planned, modules = runs
    assert planned["first_tokens"] == modules["first_tokens"]
    assert planned["vs_module_step"] == pytest.approx(planned["decode_tok_s"]
                                                      / modules["decode_tok_s"])
    assert planned["prefill_vs_module_step"] == pytest.approx(planned["prefill_tok_s"]
                                                              / modules["prefill_tok_s"])
    assert modules["of_bandwidth"] > 0 and "vs_module_step" not in modules


# ---------------------------------------------------------------- the encoder-decoder's plan

def test_planned_encdec_logits_equal_the_module_forwards(kernels):
    """fp32: each decoder step's logits against model.decode over the same cache positions,
    the encoder's padding masked in the cross-attention."""
    model = prepare_for_inference(varied_encdec(5))
    plan = PlannedEncDec.plan(model)
    assert plan is not None and plan.cache_dtype == torch.float32
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    steps = torch.randint(1, 100, (2, 4))
    ours_cache, theirs_cache = (KVCache.for_model(model.cfg, 2, 4) for _ in range(2))
    with torch.inference_mode():
        encoded = model.encode(ids, mask)
        ours = [plan.forward(steps[:, i:i + 1], ours_cache, encoded, mask) for i in range(4)]
        theirs = [model.decode(steps[:, i:i + 1], encoded, mask, cache=theirs_cache)[:, -1]
                  for i in range(4)]
    assert ours_cache.length == theirs_cache.length == 4
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", [{"dtype": "fp32"}, {"dtype": "bf16"},
                                       {"dtype": "bf16", "quantize": "int8"}],
                         ids=["fp32", "bf16", "int8"])
def test_an_encdec_batch_of_8_decodes_what_each_prompt_does_alone(kernels, precision):
    """Each row's planned decoder logits are the same to the bit at batch 8 and alone (cpmctl's
    matmuls and attention work row by row); the encoder's module forward is not part of it, so
    each row's encoder output is computed alone and stacked."""
    model = prepare_for_inference(varied_encdec(6), **precision)
    plan = PlannedEncDec.plan(model)
    if not row_by_row(model):
        pytest.skip("row-by-row matmuls need cpmctl's kernels for this precision here")
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 100, (6,), generator=generator) for _ in range(8)]
    steps = torch.randint(10, 100, (8, 3), generator=generator)
    with torch.inference_mode():
        encoded = [model.encode(p[None]) for p in prompts]
        cache = KVCache.for_model(model.cfg, 8, 3, dtype=plan.cache_dtype)
        batched = [plan.forward(steps[:, i:i + 1], cache, torch.cat(encoded), None)
                   for i in range(3)]
        for row in range(8):
            alone = KVCache.for_model(model.cfg, 1, 3, dtype=plan.cache_dtype)
            for i in range(3):
                logits = plan.forward(steps[row:row + 1, i:i + 1], alone, encoded[row], None)
                assert torch.equal(logits[0], batched[i][row])
