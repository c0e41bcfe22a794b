"""Models: equal logits to the Hugging Face reference implementations at tiny size, the
published parameter counts on the meta device, MoE routing (balanced, top-1, top-k with
capacity), bf16 autocast, initialisation, and config errors."""

from __future__ import annotations

import copy
import math
import resource
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, MoeConfig, build_model, count_parameters
from cpmctl.models.hf import to_transformers
from cpmctl.models.layers import GatedGeluFFN, rms_norm
from cpmctl.models.moe import MoeFFN, balanced_assignment

transformers = pytest.importorskip("transformers")

VOCAB = 100


def gpt_cfg(**kw) -> ModelConfig:
    base = dict(arch="gpt", vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2,
                max_positions=32)
    return ModelConfig(**{**base, **kw})


def encdec_cfg(**kw) -> ModelConfig:
    base = dict(arch="encdec", vocab_size=VOCAB, d_model=64, n_heads=4, d_head=16, d_ff=128,
                n_layers=2, n_decoder_layers=2)
    return ModelConfig(**{**base, **kw})


def perturb_norms(model: nn.Module) -> None:
    """Norm weights away from 1 and biases away from 0, so copying them is actually tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name or "norm" in name
                                                     else 0.0))


def copy_into(hf: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy every parameter of `hf` from `weights` (all of them must be mapped, no extras)."""
    names = {name for name, _ in hf.named_parameters()}
    assert names == set(weights), (names ^ set(weights))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(weights[name])


# ---------------------------------------------------------------- GPT vs GPT2LMHeadModel


def hf_gpt2(model) -> nn.Module:
    """GPT2LMHeadModel holding `model`'s weights, through `cpmctl model convert`'s mapping."""
    hf = to_transformers(model, attn_implementation="eager")
    assert hf.lm_head.weight is hf.transformer.wte.weight
    return hf


def test_gpt_logits_equal_hf_gpt2():
    torch.manual_seed(0)
    model = build_model(gpt_cfg(init_std=0.1)).eval()
    perturb_norms(model)
    hf = hf_gpt2(model)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 0.5  # big enough for the tolerance below to mean something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_gpt_left_padded_batch_equals_hf_on_each_unpadded_row():
    torch.manual_seed(1)
    model = build_model(gpt_cfg(init_std=0.1)).eval()
    perturb_norms(model)
    hf = hf_gpt2(model)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (9, 5, 1)]
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, seq - len(r):], mask[i, seq - len(r):] = r, 1
    with torch.no_grad():
        logits = model(ids, mask)
        assert torch.isfinite(logits).all()  # pad positions attend to nothing: finite anyway
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i, seq - len(r):], hf(r[None]).logits[0],
                                       atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- EncDec vs T5 v1.1


def hf_t5(model) -> nn.Module:
    cfg = model.cfg
    config = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size, d_ff=cfg.ffn_size,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, attn_implementation="eager")
    # transformers 5 always ties lm_head to the shared embedding and keeps the v1.1 behaviour
    # (no d_model**-0.5 rescaling of the decoder output) in scale_decoder_outputs=False
    assert getattr(config, "scale_decoder_outputs", False) is False
    hf = transformers.T5ForConditionalGeneration(config).eval()
    hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.lm_head.weight))  # untie
    w = {"shared.weight": model.shared.weight, "lm_head.weight": model.lm_head.weight,
         "encoder.final_layer_norm.weight": model.encoder_norm.weight,
         "decoder.final_layer_norm.weight": model.decoder_norm.weight}

    def attn(prefix, ours):
        for n in "qkvo":
            w[f"{prefix}.{n}.weight"] = getattr(ours, n).weight
        if ours.relative_bias is not None:
            w[f"{prefix}.relative_attention_bias.weight"] = ours.relative_bias.weight

    def ffn(prefix, ours):
        for n in ("wi_0", "wi_1", "wo"):
            w[f"{prefix}.DenseReluDense.{n}.weight"] = getattr(ours, n).weight

    for i, b in enumerate(model.encoder):
        p = f"encoder.block.{i}.layer"
        attn(f"{p}.0.SelfAttention", b.attn)
        w[f"{p}.0.layer_norm.weight"] = b.ln_1.weight
        ffn(f"{p}.1", b.ffn)
        w[f"{p}.1.layer_norm.weight"] = b.ln_2.weight
    for i, b in enumerate(model.decoder):
        p = f"decoder.block.{i}.layer"
        attn(f"{p}.0.SelfAttention", b.self_attn)
        w[f"{p}.0.layer_norm.weight"] = b.ln_1.weight
        attn(f"{p}.1.EncDecAttention", b.cross_attn)
        w[f"{p}.1.layer_norm.weight"] = b.ln_2.weight
        ffn(f"{p}.2", b.ffn)
        w[f"{p}.2.layer_norm.weight"] = b.ln_3.weight
    copy_into(hf, w)
    assert hf.lm_head.weight is not hf.shared.weight
    return hf


def test_encdec_structure():
    model = build_model(encdec_cfg())
    assert model.encoder[0].attn.relative_bias is not None
    assert model.decoder[0].self_attn.relative_bias is not None
    assert all(b.attn.relative_bias is None for b in model.encoder[1:])
    assert all(b.self_attn.relative_bias is None for b in model.decoder[1:])
    assert all(b.cross_attn.relative_bias is None for b in model.decoder)
    assert not any(name.endswith("bias") and "relative" not in name
                   for name, _ in model.named_parameters())
    assert model.lm_head.weight is not model.shared.weight


def test_encdec_logits_equal_hf_t5_v11():
    torch.manual_seed(2)
    model = build_model(encdec_cfg(init_std=0.1)).eval()
    perturb_norms(model)
    hf = hf_t5(model)
    # long enough (> 16) to reach the logarithmic buckets of the relative position bias
    src = torch.randint(1, VOCAB, (2, 40))
    tgt = torch.randint(1, VOCAB, (2, 24))
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf(input_ids=src, decoder_input_ids=tgt).logits
        assert ours.abs().max() > 0.5
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(tgt, model.encode(src)), ours)


def test_encdec_padded_batch_equals_hf_t5_and_unpadded_rows():
    torch.manual_seed(3)
    model = build_model(encdec_cfg(init_std=0.1)).eval()
    perturb_norms(model)
    hf = hf_t5(model)
    src = torch.randint(1, VOCAB, (2, 12))
    mask = torch.ones_like(src)
    src[1, 7:], mask[1, 7:] = 0, 0  # right-padded encoder input
    tgt = torch.randint(1, VOCAB, (2, 6))
    tgt_mask = torch.ones_like(tgt)
    tgt_mask[0, 4:] = 0
    with torch.no_grad():
        ours = model(src, tgt, mask, tgt_mask)
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt,
                    decoder_attention_mask=tgt_mask).logits
        torch.testing.assert_close(ours[0, :4], theirs[0, :4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
        # the padding is invisible: row 1 equals the same row run without it
        torch.testing.assert_close(ours[1], model(src[1:, :7], tgt[1:])[0], atol=1e-5,
                                   rtol=1e-5)


# ---------------------------------------------------------------- parameter counts

CPM1 = dict(arch="gpt", vocab_size=30000, max_positions=1024)
CPM2 = dict(arch="encdec", n_layers=24, n_decoder_layers=24, d_model=4096, d_ff=10240,
            n_heads=64, d_head=64, vocab_size=26240)


@pytest.mark.parametrize("cfg, published", [
    (ModelConfig(**CPM1, n_layers=12, d_model=768, n_heads=12), 109e6),
    (ModelConfig(**CPM1, n_layers=24, d_model=1024, n_heads=16), 334e6),
    (ModelConfig(**CPM1, n_layers=32, d_model=2560, n_heads=32, d_head=80), 2.6e9),
    (ModelConfig(**CPM2), 11e9),
    (ModelConfig(**CPM2, moe=MoeConfig(experts=32)), 198e9),
], ids=["cpm1-small", "cpm1-medium", "cpm1-large", "cpm2", "cpm2-moe"])
def test_published_parameter_counts(cfg, published):
    assert abs(count_parameters(cfg) / published - 1) < 0.02


def test_tied_weights_counted_once():
    cfg = gpt_cfg()
    model = build_model(cfg)
    assert model.lm_head.weight is model.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == total
    assert total < sum(p.numel() for p in model.state_dict().values())  # wte listed twice


def test_meta_counting_allocates_nothing():
    cfg = ModelConfig(**CPM2, moe=MoeConfig(experts=32))  # 198B parameters: 800 GB in fp32
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(cfg) > 190e9
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1024 * 1024


# ---------------------------------------------------------------- MoE


def test_balanced_assignment_is_exact_and_keeps_a_balanced_argmax():
    torch.manual_seed(4)
    scores = torch.randn(64, 8)
    counts = torch.bincount(balanced_assignment(scores), minlength=8)
    assert counts.tolist() == [8] * 8
    # when the argmax is already balanced, the assignment is the argmax
    preferred = torch.arange(64) % 8
    scores = torch.randn(64, 8) + 10 * F.one_hot(preferred, 8)
    assert torch.equal(balanced_assignment(scores), preferred)
    # all tokens want expert 0: it keeps its 8 best, the rest spread out evenly
    scores = torch.randn(64, 8)
    scores[:, 0] += 100
    assignment = balanced_assignment(scores)
    assert torch.bincount(assignment, minlength=8).tolist() == [8] * 8
    assert set(assignment.eq(0).nonzero().flatten().tolist()) == set(
        scores[:, 0].topk(8).indices.tolist())


def test_balanced_assignment_with_tokens_not_a_multiple_of_experts():
    torch.manual_seed(5)
    for tokens, experts in ((10, 4), (3, 4), (33, 8)):
        assignment = balanced_assignment(torch.randn(tokens, experts))
        counts = torch.bincount(assignment, minlength=experts).tolist()
        # as if padded with dummy tokens pinned to the last experts: the first tokens % E
        # experts take one more
        assert counts == [tokens // experts + (e < tokens % experts) for e in range(experts)]


def moe_layer(**moe) -> MoeFFN:
    cfg = encdec_cfg(moe=MoeConfig(experts=4, **moe))
    layer = MoeFFN(cfg, lambda: GatedGeluFFN(cfg.d_model, cfg.ffn_size))
    nn.init.normal_(layer.centroids, std=0.5)
    for expert in layer.experts:
        for p in expert.parameters():
            nn.init.normal_(p, std=0.1)
    return layer


def test_base_layer_balanced_in_training_argmax_at_inference():
    torch.manual_seed(6)
    layer = moe_layer()
    x = torch.randn(2, 8, 64)
    h = layer.norm(x).reshape(-1, 64)
    routing = layer.train().route(h)
    assert torch.bincount(routing.experts, minlength=4).tolist() == [4, 4, 4, 4]
    assert torch.equal(routing.tokens, torch.arange(16))
    routing = layer.eval().route(h)
    assert torch.equal(routing.experts, layer.affinity(h).argmax(-1))
    assert layer(x).shape == x.shape
    assert layer.aux_loss.item() == 0.0


def test_dense_to_moe_relation():
    """All experts copies of one FFN f: MoeFFN(x) == x + sigmoid(chosen affinity) * f(norm x);
    with zero centroids the gate is exactly 0.5."""
    torch.manual_seed(7)
    layer = moe_layer()
    dense = GatedGeluFFN(64, 128)
    for expert in layer.experts:
        expert.load_state_dict(dense.state_dict())
    x = torch.randn(2, 10, 64)
    h = layer.norm(x).reshape(-1, 64)
    with torch.no_grad():
        for mode in (True, False):
            layer.train(mode)
            routing = layer.route(h)
            gate = torch.sigmoid(layer.affinity(h).gather(1, routing.experts[:, None]))
            expected = x + (gate * dense(h)).reshape(x.shape)
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
        layer.centroids.zero_()
        torch.testing.assert_close(layer(x), x + 0.5 * dense(layer.norm(x)), atol=1e-6,
                                   rtol=1e-6)


def test_moe_gradients_reach_centroids_and_every_expert():
    torch.manual_seed(8)
    for cfg in (gpt_cfg(moe=MoeConfig(experts=4)), encdec_cfg(moe=MoeConfig(experts=4))):
        model = build_model(cfg).train()
        ids = torch.randint(0, VOCAB, (2, 12))
        logits = model(ids) if cfg.arch == "gpt" else model(ids, ids[:, :8])
        F.cross_entropy(logits.flatten(0, 1), torch.randint(0, VOCAB, (logits.shape[0] *
                                                                       logits.shape[1],))
                        ).backward()
        layers = [m for m in model.modules() if isinstance(m, MoeFFN)]
        assert len(layers) == (2 if cfg.arch == "gpt" else 4)  # every FFN is an MoE layer
        for layer in layers:
            assert layer.centroids.grad is not None and layer.centroids.grad.abs().sum() > 0
            for expert in layer.experts:
                assert all(p.grad is not None and p.grad.abs().sum() > 0
                           for p in expert.parameters())
        assert model.aux_loss.item() == 0.0


def test_moe_block_has_no_second_residual():
    torch.manual_seed(9)
    model = build_model(gpt_cfg(moe=MoeConfig(experts=4))).eval()
    block = model.blocks[0]
    assert not hasattr(block, "mlp") and not hasattr(block, "ln_2")
    with torch.no_grad():
        block.attn.c_proj.weight.zero_()  # the attention sublayer now adds nothing
        x = torch.randn(2, 5, 64)
        torch.testing.assert_close(block(x), block.moe(x))


def test_topk_router_capacity_and_aux_loss():
    torch.manual_seed(10)
    layer = moe_layer(router="topk", top_k=2, capacity_factor=0.5).train()
    x = torch.randn(2, 16, 64)
    h = layer.norm(x).reshape(-1, 64)
    routing = layer.route(h)
    capacity = layer.capacity(32)
    assert capacity == math.ceil(0.5 * 32 * 2 / 4) == 8
    counts = torch.bincount(routing.experts, minlength=4)
    assert (counts <= capacity).all() and counts.sum() < 64  # some assignments were dropped
    probs = layer.affinity(h).softmax(-1)
    torch.testing.assert_close(routing.gates, probs[routing.tokens, routing.experts])
    # a token every one of whose experts was full passes through the residual unchanged
    out = layer(x).reshape(-1, 64)
    dropped = sorted(set(range(32)) - set(routing.tokens.tolist()))
    assert dropped
    torch.testing.assert_close(out[dropped], x.reshape(-1, 64)[dropped])
    assert layer.aux_loss.item() > 0
    copy.deepcopy(layer)  # the stored loss's graph does not stop a copy (a frozen teacher)

    model = build_model(gpt_cfg(moe=MoeConfig(experts=4, router="topk", top_k=2))).train()
    model(torch.randint(0, VOCAB, (2, 12))).sum().backward(retain_graph=True)
    aux = model.aux_loss
    layers = [b.moe for b in model.blocks]
    torch.testing.assert_close(aux, 0.01 * sum(m.aux_loss for m in layers))
    assert aux.item() > 0
    for m in layers:
        m.centroids.grad = None
    aux.backward()
    assert all(m.centroids.grad is not None and m.centroids.grad.abs().sum() > 0
               for m in layers)


# ---------------------------------------------------------------- bf16, init, errors


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
@pytest.mark.parametrize("experts", [0, 4])
def test_bf16_autocast_close_to_fp32(arch, experts):
    torch.manual_seed(11)
    cfg = (gpt_cfg if arch == "gpt" else encdec_cfg)(init_std=0.1,
                                                      moe=MoeConfig(experts=experts))
    model = build_model(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    args = (ids,) if arch == "gpt" else (ids, ids[:, :6])
    with torch.no_grad():
        fp32 = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(*args)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert (bf16.float() - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_gpt_init_statistics():
    torch.manual_seed(12)
    cfg = gpt_cfg(d_model=256, n_layers=8, init_std=0.02)
    model = build_model(cfg)
    down = model.blocks[3].mlp.c_proj.weight  # 256 x 1024
    out = model.blocks[3].attn.c_proj.weight
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(down.std().item() / expected - 1) < 0.02
    assert abs(out.std().item() / expected - 1) < 0.05
    assert abs(model.blocks[3].mlp.c_fc.weight.std().item() / 0.02 - 1) < 0.02
    assert abs(model.wte.weight.std().item() / 0.02 - 1) < 0.05
    assert model.blocks[3].attn.c_attn.bias.abs().max() == 0


@pytest.mark.parametrize("kw, key", [
    (dict(arch="bert"), "model.arch"),
    (dict(d_model=100, n_heads=12), "model.d_head"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(vocab_size=-1), "model.vocab_size"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(max_positions=0), "model.max_positions"),
    (dict(arch="encdec", relative_buckets=2), "model.relative_buckets"),
    (dict(moe=MoeConfig(experts=4, router="hash")), "model.moe.router"),
    (dict(moe=MoeConfig(experts=4, router="topk", top_k=5)), "model.moe.top_k"),
    (dict(moe=MoeConfig(experts=-1)), "model.moe.experts"),
    (dict(moe=MoeConfig(experts=4, router="topk", capacity_factor=0)),
     "model.moe.capacity_factor"),
])
def test_config_errors_name_the_key(kw, key):
    cfg = ModelConfig(**kw)
    with pytest.raises(CpmError, match=key.replace(".", r"\.")):
        build_model(cfg)
    with pytest.raises(CpmError, match=key.replace(".", r"\.")):
        count_parameters(cfg)


def test_gpt_rejects_input_longer_than_max_positions():
    model = build_model(gpt_cfg())
    with pytest.raises(CpmError, match="model.max_positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fused_form_equals_the_fp32_arithmetic(dtype):
    """The fused call and the composed fp32 arithmetic agree to the bit, and a weight of another
    dtype than the input's still normalises in fp32."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 96) * 7).to(dtype)
    weight = torch.randn(96).to(dtype)
    x32 = x.float()
    composed = (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype)
    assert torch.equal(rms_norm(x, weight, 1e-6), composed)
    mixed = rms_norm(x, weight.float(), 1e-6)
    assert mixed.dtype == dtype
    assert torch.equal(mixed, (weight.float() * (x32 * torch.rsqrt(
        x32.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype))
