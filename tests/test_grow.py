"""`cpmctl grow`: every operator keeps the function (equal logits, fp32 rounding: <= 1e-5),
the composer refuses what no operator reaches, and the lineage is recorded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cpmctl.artifacts import ArtifactWriter, open_artifact
from cpmctl.errors import CpmError
from cpmctl.grow import GrowOptions, grow, grow_model
from cpmctl.grow.depth import grow_depth, layer_plan
from cpmctl.grow.moe import grow_moe
from cpmctl.grow.vocab import token_pieces
from cpmctl.grow.width import grow_width
from cpmctl.models import ModelConfig, MoeConfig, build_model
from cpmctl.models.artifact import load_model, save_model
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.base import SPACE, SPECIAL_PIECES, write_config
from cpmctl.tokenizer.cpm2 import VOCAB_FILE, Cpm2Tokenizer

TOLERANCE = 1e-5  # fp32 rounding: a sum over the copies in another order
CHARS = list("我们今天气很好这家酒店的服务本书不错非常喜欢去")


def tiny(arch: str, **changes) -> ModelConfig:
    cfg = ModelConfig(arch=arch, vocab_size=120, d_model=32, n_heads=4, n_layers=2,
                      max_positions=64, dropout=0.0)
    return dataclasses.replace(cfg, **changes)


def logits(model, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if cfg.arch == "gpt":
            return model(ids)
        return model(ids, ids[:, :9])


def grown_logits(cfg: ModelConfig, target: ModelConfig, operator, **kwargs):
    torch.manual_seed(0)
    model = build_model(cfg)
    # non-trivial norms, so that duplicating and dividing them is tested
    for name, p in model.named_parameters():
        if "ln" in name or "norm" in name:
            p.data.uniform_(0.5, 1.5)
    ids = torch.randint(cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    state, grown_cfg, record = operator(model.state_dict(), cfg, target, **kwargs)
    grown = build_model(target)
    grown.load_state_dict(state, strict=True)
    return logits(model, cfg, ids), logits(grown, target, ids), record, grown


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_width_times_two_keeps_the_logits(arch):
    cfg = tiny(arch)
    target = tiny(arch, d_model=64, n_heads=8)
    before, after, record, grown = grown_logits(cfg, target, grow_width)
    assert (after - before).abs().max() <= TOLERANCE and record["exact"]
    # block-diagonal copies: the off-diagonal blocks are zero, the diagonal ones the old
    name = "blocks.0.mlp.c_fc.weight" if arch == "gpt" else "encoder.0.ffn.wi_0.weight"
    weight = grown.state_dict()[name]
    assert torch.equal(weight[:128, 32:], torch.zeros(128, 32))
    assert torch.equal(weight[:128, :32], weight[128:, 32:])


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_width_with_split_noise_is_exact_yet_breaks_the_copies(arch):
    cfg, target = tiny(arch), tiny(arch, d_model=64, n_heads=8, d_ff=256)
    before, after, _, grown = grown_logits(cfg, target, grow_width, split_noise=0.5)
    assert (after - before).abs().max() <= TOLERANCE
    name = "blocks.0.mlp.c_fc.weight" if arch == "gpt" else "encoder.0.ffn.wi_0.weight"
    weight = grown.state_dict()[name]
    assert not torch.equal(weight[:128, :32], weight[128:, 32:])


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
def test_non_integer_width_changes_the_function_measurably(arch):
    before, after, record, _ = grown_logits(tiny(arch), tiny(arch, d_model=48, n_heads=6),
                                            grow_width)
    assert not record["exact"] and (after - before).abs().max() > TOLERANCE


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
@pytest.mark.parametrize("mode,new_layers", [("append", "copy"), ("interleave", "init")])
def test_depth_keeps_the_logits(arch, mode, new_layers):
    changes = {"n_layers": 5} if arch == "gpt" else {"n_layers": 4, "n_decoder_layers": 3}
    before, after, record, grown = grown_logits(tiny(arch), tiny(arch, **changes), grow_depth,
                                                mode=mode, new_layers=new_layers)
    assert (after - before).abs().max() <= TOLERANCE
    stack = "blocks" if arch == "gpt" else "encoder"
    assert record[stack]["new"] == ([2, 3, 4] if arch == "gpt" else [2, 3]) \
        if mode == "append" else record[stack]["new"][0] == 1
    out = "attn.c_proj.weight" if arch == "gpt" else "attn.o.weight"
    new = record[stack]["new"][0]
    assert torch.count_nonzero(grown.state_dict()[f"{stack}.{new}.{out}"]) == 0


def test_layer_plan_interleaves_after_the_old_blocks():
    assert layer_plan(2, 4, "interleave") == [(False, 0), (True, 0), (False, 1), (True, 1)]
    assert layer_plan(2, 5, "interleave") == [(False, 0), (True, 0), (True, 0), (False, 1),
                                              (True, 1)]
    assert layer_plan(2, 3, "append") == [(False, 0), (False, 1), (True, 1)]


@pytest.mark.parametrize("arch", ["gpt", "encdec"])
@pytest.mark.parametrize("router,top_k", [("base", 1), ("topk", 2)])
def test_dense_to_moe_gives_the_dense_outputs_at_initialisation(arch, router, top_k):
    target = tiny(arch, moe=MoeConfig(experts=4, router=router, top_k=top_k))
    before, after, record, grown = grown_logits(tiny(arch), target, grow_moe)
    assert (after - before).abs().max() <= TOLERANCE and record["exact"]
    norm = grown.blocks[0].moe.norm if arch == "gpt" else grown.encoder[0].moe.norm
    assert isinstance(norm, torch.nn.LayerNorm if arch == "gpt" else type(norm))
    if router == "base":  # training's balanced assignment: the gate is 0.5 all the same
        grown.train()
        ids = torch.randint(120, (2, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            trained = grown(ids) if arch == "gpt" else grown(ids, ids[:, :9])
        assert (trained - before).abs().max() <= TOLERANCE


def test_orthogonal_router_init_moves_the_gates_a_little():
    target = tiny("gpt", moe=MoeConfig(experts=4))
    before, after, record, grown = grown_logits(tiny("gpt"), target, grow_moe,
                                                router_init="orthogonal")
    centroids = grown.blocks[0].moe.centroids.detach()
    torch.testing.assert_close(centroids @ centroids.T, torch.eye(4) * 1e-4)
    assert not record["exact"] and 0 < (after - before).abs().max() < 0.1


# --- the composer, the artifact, the vocabulary, the CLI ------------------------------------


def tokenizer_artifact(path, tokens: list[str]):
    with ArtifactWriter(path, "tokenizer", command=["test"]) as writer:
        (writer.dir / VOCAB_FILE).write_text("".join(t + "\n" for t in tokens), "utf-8")
        tokenizer = Cpm2Tokenizer(tokens, str(path))
        write_config(writer.dir, tokenizer, {"origin": "test"})
        return writer.commit({"scheme": "cpm2", "vocab_size": len(tokens)})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A gpt model artifact with a 40-piece cpm2 tokenizer."""
    folder = tmp_path_factory.mktemp("grow")
    tokens = [*SPECIAL_PIECES, SPACE, *CHARS]
    tokenizer_artifact(folder / "tok", tokens)
    cfg = tiny("gpt", vocab_size=len(tokens))
    torch.manual_seed(0)
    save_model(folder / "model", build_model(cfg), cfg, folder / "tok", meta={})
    return folder


def write_recipe(path, **changes) -> str:
    model = {"arch": "gpt", "d_model": 32, "n_heads": 4, "n_layers": 2, "max_positions": 64,
             "vocab_size": len(SPECIAL_PIECES) + 1 + len(CHARS), **changes}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in model.items())
    path.write_text(f"[model]\n{body}\n\n[data]\nseq_len = 32\n", encoding="utf-8")
    return str(path)


def test_grow_cli_writes_a_model_with_its_lineage(source, tmp_path, cli):
    recipe = write_recipe(tmp_path / "big.toml", d_model=64, n_heads=8, n_layers=4)
    result = cli("grow", "--from", source / "model", "--recipe", recipe, "-o", tmp_path / "big",
                 "--depth-mode", "interleave", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["model"] == str(tmp_path / "big")
    meta = open_artifact(tmp_path / "big", "model").meta["lineage"]
    assert meta["source_digest"] == open_artifact(source / "model").digest
    assert [op["operator"] for op in meta["operators"]] == ["width", "depth"]
    assert meta["max_abs_logit_delta"] <= TOLERANCE
    old, cfg = load_model(source / "model")
    new, new_cfg = load_model(tmp_path / "big")
    ids = torch.randint(cfg.vocab_size, (2, 16))
    assert (logits(new, new_cfg, ids) - logits(old, cfg, ids)).abs().max() <= TOLERANCE
    assert (tmp_path / "big" / "tokenizer" / VOCAB_FILE).is_file()
    again = cli("grow", "--from", source / "model", "--recipe", recipe, "-o", tmp_path / "big")
    assert again.code == 2 and "--force" in again.err


def test_vocabulary_extension_keeps_every_old_pieces_logit(source, tmp_path):
    old_tokens = [*SPECIAL_PIECES, SPACE, *CHARS]
    # the new tokenizer: the old pieces in another order, plus words and characters
    new_tokens = [*SPECIAL_PIECES, SPACE, "天气", "酒店", *reversed(CHARS), "猫", "狗"]
    tokenizer_artifact(tmp_path / "bigtok", new_tokens)
    target = tiny("gpt", vocab_size=len(new_tokens) + 3)  # padded past the tokenizer
    grown, cfg, lineage, tok_dir = grow_model(source / "model", target, GrowOptions(),
                                              tokenizer=tmp_path / "bigtok")
    assert lineage["operators"][0]["new_pieces"] == 4 and tok_dir == tmp_path / "bigtok"
    assert lineage["max_abs_logit_delta"] <= TOLERANCE
    old_tok, new_tok = load_tokenizer(source / "tok"), load_tokenizer(tmp_path / "bigtok")
    text = "我们很喜欢这本书"  # no new piece in it: both tokenizers spell it the same
    old_ids, new_ids = old_tok.encode(text), new_tok.encode(text)
    assert [old_tokens[i] for i in old_ids] == [new_tokens[i] for i in new_ids]
    old_model, old_cfg = load_model(source / "model")
    mapping = [new_tokens.index(piece) for piece in token_pieces(old_tok)]
    before = logits(old_model, old_cfg, torch.tensor([old_ids]))
    after = logits(grown, cfg, torch.tensor([new_ids]))[..., mapping]
    assert (after - before).abs().max() <= TOLERANCE
    # a new word starts as the mean of the pieces that spell it
    wte = grown.wte.weight.detach()
    expected = (wte[new_tokens.index("天")] + wte[new_tokens.index("气")]) / 2
    torch.testing.assert_close(wte[new_tokens.index("天气")], expected)


def test_bad_growth_is_refused_naming_the_field(source, tmp_path, cli):
    def error(*args, **model):
        result = cli("grow", "--from", source / "model", "--recipe",
                     write_recipe(tmp_path / "r.toml", **model), "-o", tmp_path / "out", *args)
        assert result.code == 2, result.err
        assert not (tmp_path / "out").exists()
        return result.err

    assert "model.n_layers: 1 is smaller than the source model's 2" in error(n_layers=1)
    assert "model.arch: the source model is gpt" in error(arch="encdec")
    assert "model.d_model: 32 -> 48 is not an integer multiple" in error(d_model=48,
                                                                         n_heads=6)
    assert "model.d_head" in error(d_model=64, n_heads=4)
    assert "model.vocab_size" in error(vocab_size=100)
    assert "model.max_positions" in error(max_positions=128)
    tokenizer_artifact(tmp_path / "other", [*SPECIAL_PIECES, SPACE, "猫", "狗"])
    message = error("--tokenizer", str(tmp_path / "other"), vocab_size=64)
    assert "--tokenizer does not extend the source model's tokenizer" in message
    corpus = cli("grow", "--from", tmp_path / "other", "--recipe",
                 write_recipe(tmp_path / "r.toml"), "-o", tmp_path / "out")
    assert corpus.code == 2 and "is a tokenizer; --from needs a model" in corpus.err


def test_inexact_width_is_allowed_on_request_and_reported(source, tmp_path):
    target = tiny("gpt", vocab_size=len(SPECIAL_PIECES) + 1 + len(CHARS), d_model=48,
                  n_heads=6)
    with pytest.raises(CpmError, match="--allow-inexact"):
        grow_model(source / "model", target, GrowOptions())
    path, lineage = grow(source / "model", target, tmp_path / "wide",
                         GrowOptions(allow_inexact=True))
    assert lineage["max_abs_logit_delta"] > TOLERANCE
    assert open_artifact(path).meta["lineage"]["operators"][0]["exact"] is False
