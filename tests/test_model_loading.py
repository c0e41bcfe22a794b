"""Loading model weights without trusting them: model.json and the safetensors headers are
checked before anything is built or allocated, and each tensor as it is read.

Every hostile case exits 2 with one line naming the file and the tensor or key, and allocates
nothing big on the way (measured: Python allocations with tracemalloc, the process's peak
resident memory with getrusage)."""

from __future__ import annotations

import dataclasses
import json
import resource
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpmctl.artifacts import MANIFEST, ArtifactWriter
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, MoeConfig, build_model
from cpmctl.models.artifact import load_model, load_weights, save_model
from cpmctl.models.hf import write_hf_folder
from cpmctl.tokenizer.cpm1 import train_processor

GPT = dict(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2, max_positions=64)
MOE = dict(arch="encdec", vocab_size=100, d_model=64, n_heads=4, n_layers=2, d_ff=96,
           moe=MoeConfig(experts=4))
MiB = 2**20


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loading")
    out = {}
    for name, config in (("gpt", GPT), ("moe", MOE)):
        torch.manual_seed(0)
        cfg = ModelConfig(**config)
        out[name] = save_model(root / name, build_model(cfg), cfg, None, meta={},
                               command=["test"])
    # NOTE: the first meta-device build imports ~60 MB of PyTorch's Python: not the loader's
    load_model(out["gpt"])
    import cpmctl.infer  # noqa: F401  (what generate imports, for the same reason)
    return out


def variant(source: Path, out: Path, edit) -> Path:
    """A copy of the model artifact `source` at `out`, `edit(folder)` applied before commit."""
    with ArtifactWriter(out, "model", command=["test"]) as writer:
        for child in source.iterdir():
            if child.name != MANIFEST and child.is_file():
                (writer.dir / child.name).write_bytes(child.read_bytes())
        edit(writer.dir)
        return writer.commit({})


def set_config(**changes):
    def edit(folder: Path) -> None:
        data = json.loads((folder / "model.json").read_text())
        data.update(changes)
        (folder / "model.json").write_text(json.dumps(data))
    return edit


def set_tensors(change):
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
    return edit


def truncate(n: int):
    def edit(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-n])
    return edit


def put(name: str, value: torch.Tensor):
    return set_tensors(lambda t: t.__setitem__(name, value))


def poke_nan(t: dict) -> None:
    t["blocks.1.attn.c_proj.weight"][3, 5] = float("nan")


def huge_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


CASES = {
    "huge n_layers": (set_config(n_layers=1_000_000_000),
                      ["model.json", "1,000,000,000 blocks need more tensors"]),
    "huge d_model": (set_config(d_model=10**12, n_heads=1),
                     ["model.json", "d_model 1,000,000,000,000 is larger than all of"]),
    "huge vocab_size": (set_config(vocab_size=10**11), ["vocab_size", "larger than all of"]),
    "more parameters than the file": (set_config(d_model=2048),
                                      ["model.json describes", "parameters", "holds"]),
    "int64 weights": (put("ln_f.weight", torch.ones(64, dtype=torch.int64)),
                      ["model.safetensors", "ln_f.weight is I64", "floating point"]),
    "NaN weight": (set_tensors(poke_nan), ["blocks.1.attn.c_proj.weight holds NaN"]),
    "inf weight": (put("ln_f.bias", torch.full((64,), float("inf"))),
                   ["ln_f.bias holds NaN or infinite"]),
    "truncated file": (truncate(100), ["model.safetensors", "(truncated: tensor"]),
    "header length past the file": (huge_header, ["header length", "exceeds"]),
    "shape mismatch": (put("ln_f.weight", torch.ones(65)),
                       ["ln_f.weight has shape [65]", "implies [64]"]),
    "missing tensor": (set_tensors(lambda t: t.pop("blocks.0.ln_1.bias")),
                       ["1 missing tensor(s): blocks.0.ln_1.bias"]),
    "extra tensor": (put("blocks.7.mlp.extra", torch.zeros(3)),
                     ["1 unexpected tensor(s): blocks.7.mlp.extra"]),
}


def assert_one_line_error(result, needles) -> None:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_weights_are_refused_without_allocating(models, cli, tmp_path, case):
    edit, needles = CASES[case]
    bad = variant(models["gpt"], tmp_path / "bad", edit)
    rss_before = peak_rss()
    tracemalloc.start()
    try:
        result = cli("generate", "--model", bad, "--max-new-tokens", "1", "x")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_error(result, needles)
    assert python_peak < 20 * MiB, python_peak  # a meta model of 10^9 blocks: many GB
    assert peak_rss() - rss_before < 200 * MiB  # a model of d_model 10^12: far more


def test_expert_weights_are_checked_too(models, tmp_path):
    name = "encoder.1.moe.experts.2.wi_0.weight"
    bad = variant(models["moe"], tmp_path / "bad", put(name, torch.zeros(96, 64,
                                                                         dtype=torch.int32)))
    with pytest.raises(CpmError, match=f"{name} is I32"):
        load_model(bad)
    bad = variant(models["moe"], tmp_path / "experts",
                  set_config(moe=dataclasses.asdict(MoeConfig(experts=100_000))))
    with pytest.raises(CpmError, match="4 blocks of 100,000 experts need more tensors"):
        load_model(bad)


@pytest.mark.parametrize("name", ["gpt", "moe"])
def test_good_weights_load_equal_and_tied(models, name):
    model, cfg = load_model(models[name])
    stored = load_file(str(models[name] / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert not value.is_meta and value.dtype == torch.float32
        if key in stored:
            assert torch.equal(value, stored[key]), key
    if name == "gpt":
        assert model.lm_head.weight is model.wte.weight
        assert torch.equal(model.lm_head.weight, stored["wte.weight"])


def test_loading_into_a_real_model_keeps_its_parameters(models):
    """A checkpoint is loaded into the trainer's model: the optimizer holds its Parameters."""
    cfg = ModelConfig(**GPT)
    model = build_model(cfg)
    before = {name: id(p) for name, p in model.named_parameters()}
    load_weights(models["gpt"], model, {"lm_head.weight": "wte.weight"})
    assert before == {name: id(p) for name, p in model.named_parameters()}
    assert torch.equal(model.wte.weight, load_file(str(models["gpt"] / "model.safetensors"))
                       ["wte.weight"])


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(**GPT)
    folder = write_hf_folder(tmp_path_factory.mktemp("hf") / "hf", build_model(cfg), cfg, None)
    (folder / "chinese_vocab.model").write_bytes(train_processor(
        ["今天 天气 很 好", "我们 一起 去 公园"] * 2, vocab_size=22, byte_fallback=False,
        threads=1))
    return folder


def hf_variant(source: Path, out: Path, config: dict | None = None, tensors=None) -> Path:
    out.mkdir()
    (out / "chinese_vocab.model").write_bytes((source / "chinese_vocab.model").read_bytes())
    data = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **(config or {})}))
    state = load_file(str(source / "model.safetensors"))
    if tensors:
        tensors(state)
    save_file(state, str(out / "model.safetensors"))
    return out


HF_CASES = {
    "huge n_layer": (dict(config={"n_layer": 1_000_000_000}),
                     ["config.json", "1,000,000,000 blocks need more tensors"]),
    "huge n_embd": (dict(config={"n_embd": 10**12, "n_head": 1}),
                    ["config.json", "d_model 1,000,000,000,000 is larger than all of"]),
    "bigger than its tensors": (dict(config={"n_embd": 2048}),
                                ["model.safetensors: tensor transformer.", "config.json implies"]),
    "int64 tensor": (dict(tensors=lambda t: t.__setitem__(
        "transformer.ln_f.weight", torch.ones(64, dtype=torch.int64))),
        ["transformer.ln_f.weight is int64", "floating point"]),
    "NaN tensor": (dict(tensors=lambda t: t["transformer.h.0.mlp.c_fc.weight"].fill_(
        float("nan"))), ["transformer.h.0.mlp.c_fc.weight holds NaN"]),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hostile_hf_folders_are_refused(hf_folder, cli, tmp_path, case):
    changes, needles = HF_CASES[case]
    bad = hf_variant(hf_folder, tmp_path / "bad", **changes)
    tracemalloc.start()
    try:
        result = cli("model", "convert", "--from", "hf", bad, "-o", tmp_path / "out")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_error(result, needles)
    assert python_peak < 20 * MiB, python_peak
    assert not (tmp_path / "out").exists()
