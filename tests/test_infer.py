"""Inference: the KV cache against full forwards, greedy decoding against transformers'
generate, batches against one prompt at a time, CPM-1's sampling order, the repetition
penalty, stop strings and streaming, encoder-decoder decoding and span infilling, MoE, int8
weights and perplexity."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from cpmctl.errors import CpmError
from cpmctl.infer import (
    GenerationSettings,
    Int8Linear,
    KVCache,
    Prompt,
    SamplingSettings,
    TextGenerator,
    generate_tokens,
    perplexity,
    quantize_int8,
)
from cpmctl.infer import sampling as token_sampling
from cpmctl.infer.infill import encode_infill, fill
from cpmctl.infer.load import prepare_for_inference
from cpmctl.infer.packed import PackedLinear, kernel_for
from cpmctl.infer.sampling import (
    Sampler,
    apply_repetition_penalty,
    candidates,
    draw,
    outside_nucleus,
)
from cpmctl.kernels import int8
from cpmctl.models import MoeConfig, build_model
from cpmctl.tokenizer.base import SPECIAL_NAMES, SPECIAL_PIECES, Tokenizer
from tests.test_models import encdec_cfg, gpt_cfg, hf_gpt2, perturb_norms

VOCAB = 100
GREEDY = SamplingSettings(temperature=0)


def varied_gpt(seed: int = 0, **kw):
    """A tiny GPT whose greedy output varies from step to step: with a tied head and small
    positions, the argmax is mostly the last input token again; large position embeddings
    make each step different."""
    torch.manual_seed(seed)
    model = build_model(gpt_cfg(**{"init_std": 0.1, "max_positions": 64, **kw})).eval()
    perturb_norms(model)
    with torch.no_grad():
        model.wpe.weight.normal_(0.0, 1.0)
    return model


def settings(max_new_tokens: int = 20, sampling: SamplingSettings = GREEDY, seed: int = 0):
    return GenerationSettings(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)


def tokens_of(model, prompts, gen_settings, eod_id=None, pad_id=0, **kw) -> list[list[int]]:
    result = generate_tokens(model, prompts, gen_settings, eod_id=eod_id, pad_id=pad_id, **kw)
    return [row.tokens for row in result.rows]


class CharTokenizer(Tokenizer):
    """One token per character, CPM's special ids first, optional sentinels last."""

    scheme = "chars"

    def __init__(self, chars: str, sentinels: int = 0):
        self.pieces = [*SPECIAL_PIECES, *chars, *(f"<s_{i}>" for i in range(sentinels))]
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.special = {SPECIAL_NAMES[p]: i for i, p in enumerate(SPECIAL_PIECES)
                        if p in SPECIAL_NAMES}
        self.vocab_size = len(self.pieces)
        first = len(SPECIAL_PIECES) + len(chars)
        self.sentinels = (first, sentinels) if sentinels else None

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.unk_id) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=*/()[]{}<>#$%&"


# ---------------------------------------------------------------- the KV cache


def test_cached_logits_equal_the_full_forward():
    model = varied_gpt()
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model.cfg, 2, 12)
        steps = [model(ids[:, :5], cache=cache)]  # a prefill of 5, then one token at a time
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cached_logits_of_a_left_padded_batch_equal_each_row_alone():
    model = varied_gpt(1)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)  # 9 prompt columns + 3 steps
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    mask[:, 9:] = 1
    extra = torch.randint(1, VOCAB, (2, 3))
    with torch.no_grad():
        cache = KVCache.for_model(model.cfg, 2, 12)
        last = [model(ids, mask[:, :9], cache=cache)[:, -1]]
        last += [model(extra[:, i:i + 1], mask[:, :10 + i], cache=cache)[:, -1]
                 for i in range(3)]
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, extra[i]])[None])[0, len(r) - 1:]
            torch.testing.assert_close(torch.stack([step[i] for step in last]), alone,
                                       atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- greedy vs transformers


@pytest.mark.parametrize("shape", [
    dict(),  # 2 x 64, 4 heads
    # CPM-Small's width and heads, 2 layers; its init (0.02) keeps the output varied
    dict(d_model=768, n_heads=12, vocab_size=1000, init_std=0.02),
], ids=["tiny", "cpm-small-width"])
def test_greedy_equals_transformers_generate(shape):
    model = varied_gpt(2, **shape)
    hf = hf_gpt2(model)
    prompt = torch.randint(1, model.cfg.vocab_size, (1, 7))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 7:].tolist()
    ours = tokens_of(model, [prompt[0].tolist()], settings(40))[0]
    assert ours == theirs and len(set(ours)) > 5


def test_repetition_penalty_equals_transformers():
    """transformers' RepetitionPenaltyLogitsProcessor is CTRL's penalty too."""
    model = varied_gpt(3)
    hf = hf_gpt2(model)
    prompt = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None,
                             pad_token_id=0, repetition_penalty=1.5)[0, 6:].tolist()
    ours = tokens_of(model, [prompt[0].tolist()],
                     settings(30, SamplingSettings(temperature=0, repetition_penalty=1.5)))[0]
    assert ours == theirs
    assert ours != tokens_of(model, [prompt[0].tolist()], settings(30))[0]


def test_repetition_penalty_is_ctrls():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    present = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, present, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


# ---------------------------------------------------------------- batches


def test_a_left_padded_batch_generates_what_each_prompt_does_alone():
    model = varied_gpt(4)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in (3, 11, 7)]
    for sampling in (GREEDY, SamplingSettings(temperature=0.8, top_k=20, top_p=0.9)):
        alone = [tokens_of(model, [p], settings(25, sampling), first_index=i)[0]
                 for i, p in enumerate(prompts)]
        # an <eod> that ends the first row early, while the second goes on
        eod = next(t for t in alone[0][2:] if t not in alone[1])
        alone = [tokens_of(model, [p], settings(25, sampling), eod_id=eod, first_index=i)[0]
                 for i, p in enumerate(prompts)]
        batched = tokens_of(model, prompts, settings(25, sampling), eod_id=eod)
        assert batched == alone
        assert 3 <= len(alone[0]) < 25 and alone[0][-1] == eod and len(alone[1]) == 25


def test_length_is_capped_by_the_context_per_row():
    model = varied_gpt(5)  # max_positions 64
    result = generate_tokens(model, [[5] * 60, [6] * 10], settings(30), eod_id=None, pad_id=0)
    assert [len(r.tokens) for r in result.rows] == [4, 30]
    assert {r.finish_reason for r in result.rows} == {"length"}
    with pytest.raises(CpmError, match=r"prompt 0: the prompt is 64 tokens; .* at most 63"):
        generate_tokens(model, [[5] * 64], settings(), eod_id=None, pad_id=0)
    assert result.prefill_s > 0 and result.decode_s > 0 and result.tokens_per_s > 0


# ---------------------------------------------------------------- sampling


def test_sampling_order_is_top_k_then_top_p_then_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    probs, ids = candidates(logits, SamplingSettings(temperature=0.5, top_k=4, top_p=0.9))
    assert ids.tolist() == [[0, 1, 2, 3]]
    # top-p on the untempered top-4: 0.64, 0.24 (0.88 < 0.9), 0.09 -> keeps three
    top4 = logits[0, :4].softmax(-1)
    assert top4[:2].sum() < 0.9 < top4[:3].sum()
    expected = (logits[0, :3] / 0.5).softmax(-1)
    torch.testing.assert_close(probs[0], torch.cat([expected, torch.zeros(1)]))
    # at temperature 3 first, the nucleus would have been four tokens: the order matters
    hot = (logits[0, :4] / 3).softmax(-1)
    assert hot[:3].sum() < 0.9
    # top-k alone; no filter at all
    probs, ids = candidates(logits, SamplingSettings(top_k=2, top_p=1.0))
    torch.testing.assert_close(probs[0], logits[0, :2].softmax(-1))
    probs, ids = candidates(logits, SamplingSettings(top_p=1.0))
    assert ids is None
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_the_nucleus_keeps_or_drops_equally_likely_tokens_together():
    probs = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]])
    # the tokens more likely than each: 0, 0.4, 0.4, 0.8, 0.8
    assert outside_nucleus(probs, 0.5).tolist() == [[False, False, False, True, True]]
    assert outside_nucleus(probs, 0.4).tolist() == [[False, True, True, True, True]]
    assert outside_nucleus(probs, 0.81).tolist() == [[False] * 5]
    assert outside_nucleus(probs, 0.01).tolist() == [[False, True, True, True, True]]


def test_a_draw_inverts_the_cumulative_weights_and_never_picks_a_zero(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    counts = torch.bincount(torch.tensor([draw(weights, generator) for _ in range(4000)]),
                            minlength=5)
    assert counts[[0, 2, 4]].tolist() == [0, 0, 0]
    assert abs(int(counts[3]) / 4000 - 0.75) < 0.03  # 4.4 standard deviations
    # u * total rounding up to the total still lands on the last token with weight
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.ones(1))
    assert draw(weights, generator) == 3


@pytest.mark.parametrize("tries", [token_sampling.NUCLEUS_TRIES, 0])  # 0: always cut explicitly
@pytest.mark.parametrize("sampling_settings", [
    SamplingSettings(top_p=0.7),  # the nucleus alone
    SamplingSettings(temperature=3.0, top_p=0.7),  # hot: most draws fall outside it
    SamplingSettings(temperature=0.7, top_k=4, top_p=0.8),
    SamplingSettings(temperature=1.3, top_p=1.0)])
def test_the_sampler_draws_from_the_distribution_candidates_define(sampling_settings, tries,
                                                                   monkeypatch):
    monkeypatch.setattr(token_sampling, "NUCLEUS_TRIES", tries)
    logits = torch.tensor([[2.0, 1.5, 1.5, 0.5, 0.0, -1.0]])
    probs, ids = candidates(logits, sampling_settings)
    expected = torch.zeros(6)
    expected[ids[0] if ids is not None else torch.arange(6)] = probs[0]
    sampler = Sampler(sampling_settings, [[0]], 6, [11])
    draws = 6000
    counts = torch.bincount(torch.cat([sampler(logits) for _ in range(draws)]), minlength=6)
    assert counts[expected == 0].sum() == 0  # nothing outside the cut, ever
    spread = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 4.5 * spread + 1e-9).all(), (counts, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("sampling_settings", [GREEDY, SamplingSettings()])
def test_nan_or_infinite_logits_are_refused_and_minus_infinity_rules_a_token_out(
        bad, sampling_settings):
    sampler = Sampler(sampling_settings, [[0], [0]], 4, [0, 1])
    with pytest.raises(CpmError, match="nan or infinite logits"):
        sampler(torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, bad, 1.0, 2.0]]))
    with pytest.raises(CpmError, match="nan or infinite logits"):  # nothing finite in a row
        sampler(torch.tensor([[0.0, 1.0, 2.0, 3.0], [-torch.inf] * 4]))
    ruled_out = torch.tensor([[-torch.inf, 1.0, -torch.inf, 0.5]] * 2)
    drawn = {int(t) for _ in range(50) for t in sampler(ruled_out)}
    assert drawn <= {1, 3} and 1 in drawn


def test_temperature_zero_is_greedy_and_a_seed_reproduces():
    model = varied_gpt(6)
    prompt = [[3, 14, 15, 92]]
    greedy = tokens_of(model, prompt, settings(20))
    with torch.no_grad():
        ids = list(prompt[0])
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy[0] == ids[4:]
    hot = SamplingSettings(temperature=1.5)
    first = tokens_of(model, prompt, settings(20, hot, seed=7))
    assert first == tokens_of(model, prompt, settings(20, hot, seed=7))
    assert first != tokens_of(model, prompt, settings(20, hot, seed=8))
    assert first != greedy


def test_settings_errors_name_the_setting():
    bad = GenerationSettings(max_new_tokens=0, sampling=SamplingSettings(top_p=0.0))
    with pytest.raises(CpmError, match="top_p must be in .*max_new_tokens must be >= 1"):
        bad.check()
    with pytest.raises(CpmError, match="--top-p must"):
        bad.check(lambda name: "--" + name.replace("_", "-"))


# ---------------------------------------------------------------- text: stop strings, stream


def char_gpt(seed: int = 7):
    tokenizer = CharTokenizer(CHARS)
    return varied_gpt(seed, vocab_size=tokenizer.vocab_size), tokenizer


def test_stop_strings_cut_the_completion_and_streaming_shows_the_same_text():
    model, tokenizer = char_gpt()
    plain = TextGenerator(model, tokenizer, settings(40))
    [whole] = plain.complete([Prompt("hello world")])
    assert whole.finish_reason == "length" and whole.tokens == 40
    clean = [i for i in range(3, len(whole.text) - 2)  # a stop string of plain characters
             if all(c in CHARS for c in whole.text[i:i + 2])]
    stop = whole.text[clean[0]:clean[0] + 2]
    cut = whole.text.index(stop)
    shown: list[str] = []
    stopped = TextGenerator(model, tokenizer, settings(40), stop=[stop, "never"])
    [completion] = stopped.complete([Prompt("hello world")], stream=shown.append)
    assert completion.text == whole.text[:cut] and completion.finish_reason == "stop"
    assert "".join(shown) == completion.text
    assert completion.tokens < 40
    streamed: list[str] = []
    [again] = plain.complete([Prompt("hello world")], stream=streamed.append)
    assert "".join(streamed) == again.text == whole.text and len(streamed) > 5


def test_eod_ends_a_completion_outside_its_text():
    model, tokenizer = char_gpt()
    raw = tokens_of(model, [tokenizer.encode("hello")], settings(40), pad_id=tokenizer.pad_id)[0]
    eod = raw[6]
    tokenizer.special = {**tokenizer.special, "eod": eod}
    [ended] = TextGenerator(model, tokenizer, settings(40)).complete([Prompt("hello")])
    assert ended.finish_reason == "eod" and ended.tokens == raw.index(eod) + 1
    assert ended.text == tokenizer.decode(raw[:raw.index(eod)])


def test_text_errors_name_the_prompt():
    model, tokenizer = char_gpt()
    generator = TextGenerator(model, tokenizer, settings())
    with pytest.raises(CpmError, match="stdin line 2: the prompt is empty"):
        list(generator.complete([Prompt("ok", "stdin line 1"), Prompt("", "stdin line 2")]))
    with pytest.raises(CpmError, match="stdin line 1: the prompt is 70 tokens"):
        list(generator.complete([Prompt("a" * 70, "stdin line 1")]))
    with pytest.raises(CpmError, match="batch size of 1"):
        list(generator.complete([Prompt("ok")], batch_size=2, stream=print))
    with pytest.raises(CpmError, match="stop string must not be empty"):
        TextGenerator(model, tokenizer, settings(), stop=[""])


# ---------------------------------------------------------------- encoder-decoder


def varied_encdec(seed: int = 8, **kw):
    torch.manual_seed(seed)
    model = build_model(encdec_cfg(**{"init_std": 0.1, **kw})).eval()
    perturb_norms(model)
    return model


def test_encdec_cached_decoding_equals_uncached():
    model = varied_encdec()
    src = [torch.randint(1, VOCAB, (n,)).tolist() for n in (9, 5)]
    cached = tokens_of(model, src, settings(15))
    with torch.no_grad():
        for row, tokens in zip(src, cached, strict=True):
            encoded = model.encode(torch.tensor([row]))
            target = [0]  # the decoder start: <pad>, id 0 here
            for _ in range(15):
                target.append(int(model.decode(torch.tensor([target]), encoded)[0, -1].argmax()))
            assert tokens == target[1:]
    assert len({t for tokens in cached for t in tokens}) > 3


def test_encdec_cached_logits_equal_the_full_decode():
    model = varied_encdec(9)
    src, tgt = torch.randint(1, VOCAB, (2, 10)), torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        encoded = model.encode(src)
        full = model.decode(tgt, encoded)
        cache = KVCache.for_model(model.cfg, 2, 7)
        steps = [model.decode(tgt[:, i:i + 1], encoded, cache=cache) for i in range(7)]
    assert cache.cross is not None and len(cache.cross) == model.cfg.decoder_layers
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_span_infilling_maps_spans_back_into_the_text():
    tokenizer = CharTokenizer(CHARS, sentinels=4)
    first = tokenizer.sentinels[0]
    prompt = encode_infill(tokenizer, "ab<s_0>cd<s_1>", "the prompt")
    assert prompt.ids == [*tokenizer.encode("ab"), first, *tokenizer.encode("cd"), first + 1,
                          tokenizer.eod_id]
    output = [first, *tokenizer.encode("XY"), first + 1, *tokenizer.encode("Z"),
              tokenizer.eod_id]
    assert fill(tokenizer, prompt, output) == ("abXYcdZ", ["XY", "Z"])
    assert fill(tokenizer, prompt, [first, *tokenizer.encode("Q")]) == ("abQcd", ["Q", ""])
    assert encode_infill(tokenizer, "go on", "x").text == "go on<s_0>"
    with pytest.raises(CpmError, match="line 3: <s_0> appears twice"):
        encode_infill(tokenizer, "<s_0><s_0>", "line 3")
    with pytest.raises(CpmError, match="line 4: this tokenizer has 4 sentinels; <s_9>"):
        encode_infill(tokenizer, "a<s_9>", "line 4")


def test_encdec_generator_fills_the_gaps_and_stops_after_the_last():
    tokenizer = CharTokenizer(CHARS, sentinels=4)
    model = varied_encdec(10, vocab_size=tokenizer.vocab_size)
    first = tokenizer.sentinels[0]
    with torch.no_grad():  # this decoder then writes <s_2> first, and more after
        model.lm_head.weight[first:first + 4] *= 3
    generator = TextGenerator(model, tokenizer, settings(30))
    prompts = [Prompt("ab<s_0>cd<s_1>"), Prompt("ab<s_0>cd<s_1>ef<s_2>")]
    past_the_last, filled = generator.complete(prompts)
    # <s_2> after a prompt whose last gap is <s_1>: the output is over
    assert (past_the_last.tokens, past_the_last.finish_reason) == (1, "eod")
    assert past_the_last.text == "abcd" and past_the_last.spans == ["", ""]
    raw = tokens_of(model, [encode_infill(tokenizer, prompts[1].text, "").ids], settings(30),
                    eod_id=tokenizer.eod_id, pad_id=tokenizer.pad_id)[0]
    assert raw[0] == first + 2 and (filled.tokens, filled.finish_reason) == (30, "length")
    span = tokenizer.decode([t for t in raw if t < first])
    assert span and filled.spans == ["", "", span] and filled.text == "abcdef" + span
    with pytest.raises(CpmError, match="stop strings are for gpt models"):
        TextGenerator(model, tokenizer, settings(), stop=["x"])


# ---------------------------------------------------------------- MoE


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
@pytest.mark.parametrize("moe", [MoeConfig(experts=4),
                                 MoeConfig(experts=4, router="topk", top_k=2,
                                           capacity_factor=0.5)], ids=["base", "top2"])
def test_moe_models_generate_the_same_batched_and_one_by_one(arch, moe):
    """Top-k capacity is for training: at inference no token is dropped, so the batch (its
    padding, the other prompts) never changes a prompt's text."""
    model = varied_gpt(11, moe=moe) if arch == "gpt" else varied_encdec(11, moe=moe)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in (6, 3)]
    batched = tokens_of(model, prompts, settings(12))
    assert batched == [tokens_of(model, [p], settings(12))[0] for p in prompts]
    if arch == "gpt":
        with torch.no_grad():
            ids = list(prompts[0])
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert batched[0] == ids[6:]


# ---------------------------------------------------------------- int8 and perplexity


def test_int8_linear_is_per_channel_symmetric(int8_kernel_choice):
    torch.manual_seed(12)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud channel does not cost the others precision
    q = Int8Linear.from_linear(linear)
    assert q.kernel == int8_kernel_choice
    weight = q.int8_weight()
    assert weight.dtype == torch.int8 and weight.shape == (48, 64) and weight.abs().max() == 127
    dequantized = weight.float() * q.scales.float()[:, None]
    error = (dequantized - linear.weight).abs().amax(1)
    assert (error <= q.scales.float() * 0.51).all()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y, reference = q(x.bfloat16()).float(), linear(x)
    channel_error = (y - reference).abs().amax((0, 1)) / reference.abs().amax((0, 1))
    assert channel_error.max() < 0.02


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_int8_model_is_close_to_bf16(arch, int8_kernel_choice):
    model = varied_gpt(13) if arch == "gpt" else varied_encdec(13)
    ids = torch.randint(1, VOCAB, (2, 16))
    args = (ids,) if arch == "gpt" else (ids, ids[:, :6])
    with torch.no_grad():
        reference = model(*args)
        quantized = quantize_int8(model)(*args).float()
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.kernel == int8_kernel_choice
    if int8_kernel_choice != int8.TORCH:  # fp32 scales: .to(bf16) came before them
        assert model.lm_head.scales.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    if arch == "gpt":
        assert model.wte.weight.dtype == torch.bfloat16  # the tied table stays for lookups
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()
    assert tokens_of(model, [ids[0].tolist()], settings(8))  # and it generates


def test_perplexity_is_exp_of_the_mean_loss_and_int8_stays_close(int8_kernel_choice,
                                                                 monkeypatch):
    model = varied_gpt(14)
    ids = torch.randint(1, VOCAB, (300,))
    with torch.no_grad():
        windows = ids[:4 * 64 + 1]
        losses = [F.cross_entropy(model(windows[i * 64:(i + 1) * 64][None])[0],
                                  windows[i * 64 + 1:(i + 1) * 64 + 1], reduction="sum")
                  for i in range(4)]
    expected = math.exp(sum(loss.item() for loss in losses) / 256)
    assert perplexity(model, ids, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # the head's logits 5 positions at a time (a batch of 3 windows: 38 chunks of 5, one of 2)
    monkeypatch.setattr(importlib.import_module("cpmctl.infer.perplexity"),
                        "LOGIT_CHUNK_ELEMENTS", 5 * VOCAB)
    assert perplexity(model, ids, batch_size=3) == pytest.approx(expected, rel=1e-5)
    bf16 = perplexity(model.to(torch.bfloat16), ids)
    quantized = perplexity(quantize_int8(varied_gpt(14)), ids)
    assert abs(quantized / bf16 - 1) < 0.02
    with pytest.raises(CpmError, match="needs at least 65 tokens"):
        perplexity(model, ids[:10])


def test_int8_linear_copies_a_strided_or_misaligned_input(int8_kernel_choice):
    """The kernels read packed rows (PyTorch's aligned too): a view that is neither must be
    copied first (with PyTorch's, a strided one gave wrong numbers, a misaligned one crashed)."""
    torch.manual_seed(15)
    q = Int8Linear.from_linear(torch.nn.Linear(64, 32))
    wide = torch.randn(3, 128, dtype=torch.bfloat16)
    flat = torch.randn(1000, dtype=torch.bfloat16)
    misaligned = flat[8:8 + 64].view(1, 64)
    assert misaligned.data_ptr() % 32
    with torch.no_grad():
        for x in (wide[:, :64], misaligned):
            torch.testing.assert_close(q(x), q(x.clone()))


def test_prepared_models_generate_what_the_plain_model_does():
    model = varied_gpt(16)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    plain = tokens_of(model, prompt, settings(20))
    packed = prepare_for_inference(varied_gpt(16))
    assert any(isinstance(m, PackedLinear) for m in packed.modules()) == \
        (kernel_for(torch.float32) is not None)
    assert tokens_of(packed, prompt, settings(20)) == plain
    with torch.no_grad():
        ids = torch.tensor(prompt)
        torch.testing.assert_close(packed(ids), model(ids), atol=1e-4, rtol=1e-4)
        bf16 = prepare_for_inference(varied_gpt(16), dtype="bf16")
        assert (bf16(ids).float() - model(ids)).abs().max() < 0.05 * model(ids).abs().max()
    with pytest.raises(CpmError, match="use it with --dtype bf16"):
        prepare_for_inference(varied_gpt(16), quantize="int8")


def test_a_padded_model_vocabulary_never_yields_ids_past_the_tokenizers():
    tokenizer = CharTokenizer(CHARS)
    model = varied_gpt(17, vocab_size=tokenizer.vocab_size + 40)
    with torch.no_grad():  # the padding rows would win every argmax
        model.wte.weight[tokenizer.vocab_size:] *= 50
    assert max(tokens_of(model, [[10, 11]], settings(10))[0]) >= tokenizer.vocab_size
    for sampling in (GREEDY, SamplingSettings(temperature=2.0)):
        tokens = tokens_of(model, [[10, 11]], settings(10, sampling),
                           vocab_size=tokenizer.vocab_size)[0]
        assert max(tokens) < tokenizer.vocab_size
    [completion] = TextGenerator(model, tokenizer, settings(10)).complete([Prompt("ab")])
    assert completion.tokens == 10


@pytest.mark.slow
def test_greedy_equals_transformers_at_cpm_small_dims():
    """CPM-Small exactly (12 layers, 768 wide, 12 heads, 30,000 tokens), random weights, in
    the form `cpmctl generate` runs it (oneDNN-packed fp32): transformers' greedy tokens."""
    torch.manual_seed(0)
    model = build_model(gpt_cfg(n_layers=12, d_model=768, n_heads=12, vocab_size=30000,
                                max_positions=1024, init_std=0.02)).eval()
    perturb_norms(model)
    hf = hf_gpt2(model)
    prompt = torch.randint(10, 30000, (1, 32))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 32:].tolist()
    prepared = prepare_for_inference(model, dtype="fp32")
    assert tokens_of(prepared, [prompt[0].tolist()], settings(24))[0] == theirs
