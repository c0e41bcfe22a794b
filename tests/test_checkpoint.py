"""Model artifacts and run checkpoints: safetensors + JSON round trips (weights, tied heads, MoE
experts, AdamW state, RNG states), the artifact tree, retention, resuming past a damaged
checkpoint, and the errors a user can hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cpmctl.artifacts import MANIFEST, ArtifactWriter, open_artifact, verify
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, MoeConfig, build_model
from cpmctl.models.artifact import load_model, save_model, split_tied
from cpmctl.train.checkpoint import (
    check_world_size,
    find_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CONFIGS = {
    "gpt": dict(arch="gpt", vocab_size=100, d_model=32, n_heads=4, n_layers=2,
                max_positions=64),
    "encdec": dict(arch="encdec", vocab_size=100, d_model=32, n_heads=4, n_layers=2,
                   n_decoder_layers=1, d_ff=48),
    "moe": dict(arch="gpt", vocab_size=100, d_model=32, n_heads=4, n_layers=2,
                max_positions=64, moe=MoeConfig(experts=4)),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**CONFIGS[name])
    model = build_model(cfg)
    with torch.no_grad():  # norms away from 1/0 so loading them is actually tested
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model, cfg


def forward(model, cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=g)
    if cfg.arch == "encdec":
        return model(ids, torch.randint(0, cfg.vocab_size, (2, 5), generator=g))
    return model(ids)


def make_tokenizer(path: Path) -> Path:
    with ArtifactWriter(path, "tokenizer", command=["test"]) as writer:
        (writer.dir / "tokenizer.json").write_text('{"scheme": "test"}')
        (writer.dir / "vocab.txt").write_text("a\nb\n")
        return writer.commit({"vocab_size": 2})


def states_equal(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_round_trip(tmp_path, name):
    model, cfg = make(name)
    out = save_model(tmp_path / "m", model, cfg, None, meta={"lineage": None},
                     command=["test"])
    loaded, cfg2 = load_model(out)
    assert cfg2 == cfg
    states_equal(model, loaded)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(forward(model, cfg), forward(loaded, cfg2))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    tied = json.loads((out / "model.json").read_text())["tied_weights"]
    if cfg.arch == "gpt":
        assert tied == {"lm_head.weight": "wte.weight"}
        assert "lm_head.weight" not in stored and "wte.weight" in stored
        assert loaded.lm_head.weight is loaded.wte.weight
    else:
        assert tied == {} and "lm_head.weight" in stored
    if cfg.moe.experts:
        for e in range(4):
            assert any(f".experts.{e}." in key for key in stored)


def test_model_artifact_tree(tmp_path):
    model, cfg = make("gpt")
    tokenizer = make_tokenizer(tmp_path / "tok")
    out = save_model(tmp_path / "m", model, cfg, tokenizer, meta={"lineage": "x"},
                     command=["test"])
    assert {p.name for p in out.iterdir()} == {MANIFEST, "model.json", "model.safetensors",
                                               "tokenizer"}
    assert {p.name for p in (out / "tokenizer").iterdir()} == {MANIFEST, "tokenizer.json",
                                                               "vocab.txt"}
    artifact = open_artifact(out, expect="model")
    assert verify(artifact) == []
    assert open_artifact(out / "tokenizer", expect="tokenizer").kind == "tokenizer"
    unique = {id(p): p.numel() for p in model.parameters()}
    assert artifact.meta == {"lineage": "x", "parameters": sum(unique.values()), "arch": "gpt"}
    assert [i["role"] for i in artifact.inputs] == ["tokenizer"]
    model_json = json.loads((out / "model.json").read_text())
    assert model_json["format"] == 1 and model_json["moe"]["experts"] == 0
    # without a tokenizer: no tokenizer/ folder
    bare = save_model(tmp_path / "bare", model, cfg, None, meta={}, command=["test"])
    assert {p.name for p in bare.iterdir()} == {MANIFEST, "model.json", "model.safetensors"}


def test_split_tied_views_and_overlaps(tmp_path):
    base = torch.arange(6.0)
    stored, tied = split_tied({"a": base, "b": base, "c": base[:3], "d": base.view(2, 3).t()})
    assert tied == {"b": "a"} and set(stored) == {"a", "c", "d"}
    save_file(stored, str(tmp_path / "x.safetensors"))  # no shared storage left
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["d"], base.view(2, 3).t())


def test_load_model_wrong_kind(tmp_path):
    with ArtifactWriter(tmp_path / "corpus", "corpus", command=["test"]) as writer:
        (writer.dir / "stats.json").write_text("{}")
        writer.commit({})
    with pytest.raises(CpmError, match="is a corpus; --model needs a model or a checkpoint"):
        load_model(tmp_path / "corpus")


def rewrite(folder: Path, edit) -> None:
    """Edit a committed model's files and re-commit it, so only the edit is wrong."""
    with ArtifactWriter(folder, "model", force=True, command=["test"]) as writer:
        for child in folder.iterdir():
            if child.name != MANIFEST:
                (writer.dir / child.name).write_bytes(child.read_bytes())
        edit(writer.dir)
        writer.commit({})


def test_load_model_errors(tmp_path):
    model, cfg = make("gpt")
    out = save_model(tmp_path / "m", model, cfg, None, meta={}, command=["test"])

    def add_tensor(d: Path):
        tensors = load_file(str(d / "model.safetensors"))
        tensors["blocks.9.extra"] = torch.zeros(3)
        save_file(tensors, str(d / "model.safetensors"))

    rewrite(out, add_tensor)
    with pytest.raises(CpmError, match=r"1 unexpected tensor\(s\): blocks.9.extra"):
        load_model(out)

    def drop_tensor(d: Path):
        tensors = load_file(str(d / "model.safetensors"))
        del tensors["ln_f.weight"]
        save_file(tensors, str(d / "model.safetensors"))

    rewrite(out, drop_tensor)
    with pytest.raises(CpmError, match=r"1 missing tensor\(s\): ln_f.weight"):
        load_model(out)

    rewrite(out, lambda d: (d / "model.safetensors").unlink())
    with pytest.raises(CpmError, match=r"m: model.safetensors is missing"):
        load_model(out)

    def unknown_key(d: Path):
        data = json.loads((d / "model.json").read_text())
        data["moe"]["color"] = "red"
        (d / "model.json").write_text(json.dumps(data))

    rewrite(out, unknown_key)
    with pytest.raises(CpmError, match=r"model.json: unknown key 'moe.color'"):
        load_model(out)

    def wrong_type(d: Path):
        data = json.loads((d / "model.json").read_text())
        data["d_model"] = "32"
        (d / "model.json").write_text(json.dumps(data))

    rewrite(out, wrong_type)
    with pytest.raises(CpmError, match=r"model.json: d_model must be int"):
        load_model(out)


# -------------------------------------------------------------------------------- checkpoints


def train_steps(model, cfg, optimizer, n: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=g)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size),
                                                 ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


@pytest.mark.parametrize("name", ["gpt", "moe"])
def test_optimizer_round_trip_is_bitwise(tmp_path, name):
    model, cfg = make(name)
    opt = adamw(model)
    loss = train_steps(model, cfg, opt, 3, seed=5)
    state = {"step": 3, "consumed_samples": 6, "world_size": 1, "loss": loss}
    ckpt = save_checkpoint(tmp_path / "run", 3, model.state_dict(), cfg, opt.state_dict(), state,
                           keep=2)
    assert ckpt == tmp_path / "run" / "checkpoints" / "step-00000003"
    artifact = open_artifact(ckpt, expect="checkpoint")
    assert verify(artifact) == [] and artifact.meta == {"step": 3, "loss": loss}
    assert set(artifact.files) == {"model.json", "model.safetensors", "trainer_state.json",
                                   "optimizer/state.safetensors", "optimizer/state.json"}

    fresh, _ = make(name, seed=99)
    fresh_opt = adamw(fresh)
    assert load_checkpoint(ckpt, fresh, fresh_opt) == state
    states_equal(model, fresh)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    at_save = {k: v.clone() for k, v in fresh.state_dict().items()}
    train_steps(model, cfg, opt, 1, seed=7)
    train_steps(fresh, cfg, fresh_opt, 1, seed=7)
    states_equal(model, fresh)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for a, b in zip(sa.values(), sb.values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # a checkpoint is also a model for load_model
    loaded, _ = load_model(ckpt)
    assert loaded.state_dict().keys() == at_save.keys()
    assert all(torch.equal(v, at_save[k]) for k, v in loaded.state_dict().items())
    assert loaded.lm_head.weight is loaded.wte.weight


def test_rng_state_round_trip():
    torch.manual_seed(123)
    import random

    import numpy as np

    torch.rand(5)
    saved = json.loads(json.dumps(rng_state()))  # JSON-safe
    expect = (torch.rand(7), random.random(), np.random.rand(3))
    torch.rand(100)
    random.random()
    np.random.rand(9)
    set_rng_state(saved)
    got = (torch.rand(7), random.random(), np.random.rand(3))
    assert torch.equal(expect[0], got[0])
    assert expect[1] == got[1]
    assert (expect[2] == got[2]).all()


def save_steps(run: Path, steps, keep: int):
    model, cfg = make("gpt")
    opt = adamw(model)
    for step in steps:
        save_checkpoint(run, step, model.state_dict(), cfg, opt.state_dict(),
                        {"step": step, "world_size": 1}, keep=keep)


def test_keep_and_latest(tmp_path):
    run = tmp_path / "run"
    save_steps(run, [10, 20, 30, 40], keep=2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-00000030", "step-00000040"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    assert find_resumable(run) == run / "checkpoints" / "step-00000040"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, why", [(flip_byte, "sha256 differs"),
                                         (truncate, "bytes, manifest says")])
def test_find_resumable_skips_damaged(tmp_path, capsys, damage, why):
    run = tmp_path / "run"
    save_steps(run, [1, 2], keep=3)
    newest = run / "checkpoints" / "step-00000002"
    damage(newest / "model.safetensors")
    # an interrupted write: a hidden temporary and a folder without a manifest are ignored
    (run / "checkpoints" / ".step-00000003.tmp-1-abcd").mkdir()
    (run / "checkpoints" / "step-00000004").mkdir()
    capsys.readouterr()
    assert find_resumable(run) == run / "checkpoints" / "step-00000001"
    err = capsys.readouterr().err
    assert "step-00000002" in err and "model.safetensors" in err and why in err
    assert "step-00000004" not in err and "step-00000003" not in err


def test_find_resumable_none(tmp_path):
    assert find_resumable(tmp_path / "nothing") is None
    run = tmp_path / "run"
    save_steps(run, [1], keep=1)
    (run / "checkpoints" / "step-00000001" / "trainer_state.json").unlink()
    assert find_resumable(run) is None


def test_world_size_mismatch(tmp_path):
    check_world_size({"step": 1, "world_size": 2}, 2)
    with pytest.raises(CpmError, match=r"checkpoint ck was written by 2 processes; resuming "
                                       r"with 4 is not supported: "):
        check_world_size({"step": 1, "world_size": 2}, 4, "ck")


def test_no_pickle():
    root = Path(__file__).resolve().parents[1] / "cpmctl"
    for path in (root / "models" / "artifact.py", root / "train" / "checkpoint.py"):
        text = path.read_text()
        for needle in ("torch.save", "torch.load", "import pickle", "pickle.load"):
            assert needle not in text, (path, needle)
