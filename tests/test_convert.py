"""`cpmctl model convert`: Hugging Face GPT-2 checkpoints in and out, with equal logits to
transformers' GPT2LMHeadModel, a bit-identical round trip, and every bad input refused with one
line that names the file and the tensor or key, leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpmctl.artifacts import open_artifact
from cpmctl.models import MoeConfig, build_model
from cpmctl.models.artifact import load_model, save_model
from cpmctl.tokenizer.build import import_tokenizer
from cpmctl.tokenizer.cpm1 import train_processor
from tests.test_models import gpt_cfg, perturb_norms

transformers = pytest.importorskip("transformers")

CPM1_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cpm1" / (
    "chinese_vocab.model")
VOCAB = 100


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> Path:
    """A CPM-1 SentencePiece vocabulary file of 22 pieces (the 8 special ones + a few words)."""
    path = tmp_path_factory.mktemp("vocabulary") / "chinese_vocab.model"
    path.write_bytes(train_processor(["今天 天气 很 好", "我们 一起 去 公园", "天气 很 好"] * 2,
                                     vocab_size=22, byte_fallback=False, threads=1))
    return path


@pytest.fixture(scope="module")
def ours(tmp_path_factory, vocabulary) -> Path:
    """A tiny cpmctl GPT model artifact (norms and biases perturbed), with a tokenizer."""
    folder = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    model = build_model(gpt_cfg(init_std=0.1))
    perturb_norms(model)
    tokenizer = import_tokenizer(vocabulary, folder / "tokenizer", command=["test"])
    return save_model(folder / "model", model, model.cfg, tokenizer, meta={}, command=["test"])


def hf_gpt2(seed: int = 0, **sizes) -> torch.nn.Module:
    """A GPT2LMHeadModel in CPM-Generate's configuration (tiny unless sizes say otherwise)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{
        "vocab_size": VOCAB, "n_positions": 32, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "bos_token_id": None, "eos_token_id": None, **sizes})
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb_norms(model)
    return model


def save_pickle_checkpoint(model, folder: Path) -> None:
    """What transformers 4 wrote with `save_pretrained(safe_serialization=False)` (transformers 5
    writes safetensors whatever that flag says): the whole state dict, tied lm_head included,
    plus the causal-mask buffers of older versions."""
    model.config.save_pretrained(folder)
    state = model.state_dict()
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(n, n, dtype=torch.bool).tril()[None,
                                                                                         None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


def assert_logits_equal(converted: Path, hf) -> None:
    model, _ = load_model(converted)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        ours_logits, theirs = model.eval()(ids), hf(ids).logits
    assert theirs.abs().max() > 0.5  # large enough for the tolerance to mean something
    torch.testing.assert_close(ours_logits, theirs, atol=1e-5, rtol=1e-5)


def assert_refused(result, *needles: str) -> None:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------- ours -> hf -> ours


def test_to_hf_loads_in_transformers_with_equal_logits(cli, tmp_path, ours):
    result = cli("model", "convert", "--to", "hf", ours, "-o", tmp_path / "hf")
    assert result.code == 0, result.err
    assert result.out.strip() == str(tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors",
                                                             "tokenizer", "cpmctl-export.json"}
    assert open_artifact(tmp_path / "hf" / "tokenizer", expect="tokenizer")
    hf, loading = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert loading == {"missing_keys": set(), "unexpected_keys": set(),
                       "mismatched_keys": set(), "error_msgs": []}
    assert (hf.config.eos_token_id, hf.config.pad_token_id) == (7, 5)  # <eod>, <pad>
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert_logits_equal(ours, hf.eval())


def test_round_trip_is_bit_identical(cli, tmp_path, ours):
    assert cli("model", "convert", "--to", "hf", ours, "-o", tmp_path / "hf").code == 0
    # the tokenizer/ that --to hf wrote is found without --tokenizer
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "back")
    assert result.code == 0, result.err
    for name in ("model.json", "model.safetensors", "tokenizer/spm.model",
                 "tokenizer/tokenizer.json"):
        assert (tmp_path / "back" / name).read_bytes() == (ours / name).read_bytes(), name
    artifact = open_artifact(tmp_path / "back", expect="model")
    assert artifact.meta["lineage"] == {"converted_from": str(tmp_path / "hf"),
                                        "format": "huggingface-gpt2"}
    assert [i["role"] for i in artifact.inputs] == ["config", "weights", "tokenizer"]


# ---------------------------------------------------------------- hf -> ours


@pytest.mark.parametrize("form", ["safetensors", "pytorch_model.bin", "sharded", "GPT2Model"])
def test_from_hf_equal_logits(cli, tmp_path, vocabulary, form):
    hf = hf_gpt2()
    if form == "safetensors":
        hf.save_pretrained(tmp_path / "hf")
    elif form == "GPT2Model":  # the bare transformer: names without "transformer."
        hf.transformer.save_pretrained(tmp_path / "hf")
        assert "wte.weight" in load_file(str(tmp_path / "hf" / "model.safetensors"))
    elif form == "sharded":
        hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    else:
        save_pickle_checkpoint(hf, tmp_path / "hf")
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "ours",
                 "--tokenizer", vocabulary)
    assert result.code == 0, result.err
    assert_logits_equal(tmp_path / "ours", hf)
    tokenizer = open_artifact(tmp_path / "ours" / "tokenizer", expect="tokenizer")
    assert tokenizer.meta["scheme"] == "cpm1"
    roles = [i["role"] for i in open_artifact(tmp_path / "ours").inputs]
    assert roles[0] == "config" and roles[-1] == "vocabulary" and set(roles[1:-1]) == {"weights"}


@pytest.mark.skipif(not CPM1_VOCAB.is_file(),
                    reason="CPM-1's chinese_vocab.model is not in ../shared/reference")
def test_from_hf_at_cpm1_small_width_with_the_original_vocabulary(cli, tmp_path):
    """CPM-1 small's width (768, 12 heads), positions (1,024) and vocabulary (CPM-1's own
    30,000 pieces, found beside the weights); 4 of its 12 layers, which only repeat (all 12
    take ~9 s here, mostly transformers initialising its model)."""
    hf = hf_gpt2(vocab_size=30000, n_positions=1024, n_embd=768, n_layer=4, n_head=12)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "chinese_vocab.model").write_bytes(CPM1_VOCAB.read_bytes())
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "ours")
    assert result.code == 0, result.err
    assert_logits_equal(tmp_path / "ours", hf)
    tokenizer = open_artifact(tmp_path / "ours" / "tokenizer", expect="tokenizer")
    assert tokenizer.meta == {"scheme": "cpm1", "vocab_size": 30000, "origin": "imported"}
    assert open_artifact(tmp_path / "ours").meta["parameters"] == sum(
        p.numel() for p in hf.parameters())


# ---------------------------------------------------------------- refusals


def tiny_safetensors(folder: Path) -> Path:
    hf_gpt2().save_pretrained(folder)
    return folder / "model.safetensors"


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.update({"transformer.h.0.attn.rotary.weight": torch.zeros(4)}),
     ["unexpected tensor(s) transformer.h.0.attn.rotary.weight"]),
    (lambda t: t.update({"transformer.h.2.ln_1.weight": torch.zeros(64)}),  # a 3rd layer
     ["unexpected tensor(s) transformer.h.2.ln_1.weight"]),
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"),
     ["missing tensor(s) transformer.h.1.mlp.c_fc.bias"]),
    (lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(192, 64)}),
     ["tensor transformer.h.0.attn.c_attn.weight has shape [192, 64]", "implies [64, 192]"]),
    (lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, 64)}),
     ["lm_head.weight differs from transformer.wte.weight"]),
    (lambda t: t.update({"wte.weight": t["transformer.wte.weight"].clone()}),
     ["tensor wte.weight is there twice"]),
], ids=["unknown", "extra-layer", "missing", "shape", "untied-head", "twice"])
def test_bad_tensors_are_refused_naming_tensor_and_file(cli, tmp_path, vocabulary, edit,
                                                        needles):
    weights = tiny_safetensors(tmp_path / "hf")
    edit_tensors(weights, edit)
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "out",
                 "-t", vocabulary)
    file = str(tmp_path / "hf") if "missing" in needles[0] else str(weights)
    assert_refused(result, file, *needles)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("edit, needles", [
    (lambda c: "{not json", ["config.json: not valid JSON"]),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "n_embd"}),
     ["config.json: missing key 'n_embd'"]),
    (lambda c: json.dumps({**c, "n_layer": "2"}), ["config.json: n_layer must be int, got \"2\""]),
    (lambda c: json.dumps({**c, "activation_function": "relu"}),
     ["config.json: activation_function 'relu' is not supported"]),
    (lambda c: json.dumps({**c, "model_type": "llama"}),
     ["config.json: model_type \"llama\" is not supported"]),
    (lambda c: json.dumps({**c, "tie_word_embeddings": False}),
     ["config.json: tie_word_embeddings false is not supported"]),
    (lambda c: json.dumps({**c, "n_head": 5}), ["n_embd (64) is not divisible by n_head (5)"]),
], ids=["json", "missing-key", "type", "activation", "model-type", "untied", "heads"])
def test_bad_config_is_refused_naming_the_key(cli, tmp_path, vocabulary, edit, needles):
    tiny_safetensors(tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(edit(json.loads(config.read_text())))
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "out",
                 "-t", vocabulary)
    assert_refused(result, *needles)
    assert_nothing_written(tmp_path / "out")


class NotATensor:
    """Pickled by reference: loading it would import and run code of the pickle's choosing."""


def test_pickle_with_an_object_is_refused_by_weights_only(cli, tmp_path, vocabulary):
    hf = hf_gpt2()
    save_pickle_checkpoint(hf, tmp_path / "hf")
    state = torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, tmp_path / "hf" / "pytorch_model.bin")
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "out",
                 "-t", vocabulary)
    assert_refused(result, f"{tmp_path / 'hf' / 'pytorch_model.bin'}: refused by "
                           "torch.load(weights_only=True): Unsupported global: GLOBAL "
                           f"{__name__}.NotATensor;")
    assert_nothing_written(tmp_path / "out")
    # a pickle of allowed types that is not a flat dict of tensors is refused too
    torch.save({**state, "step": 3}, tmp_path / "hf" / "pytorch_model.bin")
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "out",
                 "-t", vocabulary)
    assert_refused(result, "'step' holds a int, not a tensor")


def test_tokenizer_missing_or_too_big_is_refused(cli, tmp_path, vocabulary):
    tiny_safetensors(tmp_path / "hf")
    result = cli("model", "convert", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "out")
    assert_refused(result, f"{tmp_path / 'hf'}: no tokenizer found",
                   "tokenizer/, chinese_vocab.model, spiece.model", "--tokenizer")
    hf_gpt2(vocab_size=16).save_pretrained(tmp_path / "small")
    result = cli("model", "convert", "--from", "hf", tmp_path / "small", "-o", tmp_path / "out",
                 "-t", vocabulary)
    assert_refused(result, f"{vocabulary}: the tokenizer has 22 tokens, more than the model's "
                           "vocab_size 16")
    assert_nothing_written(tmp_path / "out")
    result = cli("model", "convert", "--from", "hf", tmp_path, "-o", tmp_path / "out")
    assert_refused(result, f"{tmp_path}: no config.json")


def test_outputs_are_replaced_only_with_force(cli, tmp_path, ours, vocabulary):
    tiny_safetensors(tmp_path / "hf")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for args in (["--from", "hf", tmp_path / "hf", "-t", vocabulary], ["--to", "hf", ours]):
        assert_refused(cli("model", "convert", *args, "-o", mine), "already exists",
                       "--force")
        assert_refused(cli("model", "convert", *args, "-o", mine, "--force"),
                       "refusing to replace it")
        assert (mine / "notes.txt").read_text() == "keep me"
    assert cli("model", "convert", "--to", "hf", ours, "-o", tmp_path / "out").code == 0
    assert cli("model", "convert", "--to", "hf", ours, "-o", tmp_path / "out",
               "--force").code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("kw, needles", [
    (dict(arch="encdec", d_ff=128), ["model.json: arch 'encdec'", "dense gpt models only"]),
    (dict(moe=MoeConfig(experts=2)), ["model.json: moe.experts 2", "dense gpt models only"]),
], ids=["encdec", "moe"])
def test_to_hf_refuses_what_gpt2_cannot_hold(cli, tmp_path, kw, needles):
    cfg = gpt_cfg(**kw)
    model = save_model(tmp_path / "m", build_model(cfg), cfg, None, meta={}, command=["test"])
    assert_refused(cli("model", "convert", "--to", "hf", model, "-o", tmp_path / "out"),
                   str(model), *needles)
    assert_nothing_written(tmp_path / "out")


def test_usage_errors(cli, tmp_path, ours):
    assert_refused(cli("model", "convert", ours, "-o", tmp_path / "out"),
                   "give one of --from hf or --to hf")
    assert_refused(cli("model", "convert", "--to", "hf", ours, "-o", tmp_path / "out", "-t",
                       ours), "--tokenizer goes with --from hf")
    assert_refused(cli("model", "convert", "--from", "hf", tmp_path / "nowhere", "-o",
                       tmp_path / "out"), "no config.json")
