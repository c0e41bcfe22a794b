"""Sharded model files: `cpmctl model reshard`, the shard index and its safety rules, and the
random-weight writer that materialises one layer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmctl.artifacts import MANIFEST, ArtifactWriter, open_artifact, verify
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, MoeConfig, build_model
from cpmctl.models.artifact import load_model, save_model
from cpmctl.models.shard import reshard_model, unit_of
from cpmctl.models.weights import INDEX, open_weights

CONFIGS = {
    "gpt-moe": dict(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                    max_positions=64, d_ff=96, moe=MoeConfig(experts=4)),
    "encdec-moe": dict(arch="encdec", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                       d_ff=96, moe=MoeConfig(experts=4)),
    "gpt": dict(arch="gpt", vocab_size=100, d_model=64, n_heads=4, n_layers=2,
                max_positions=64),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshard")
    out = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        cfg = ModelConfig(**config)
        out[name] = save_model(root / name, build_model(cfg), cfg, None, meta={"x": 1},
                               command=["test"])
    return out


def logits(model, cfg):
    ids = torch.arange(10, 26).reshape(2, 8)
    with torch.no_grad():
        return model.eval()(ids, ids[:, :5]) if cfg.arch == "encdec" else model.eval()(ids)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reshard_round_trip_keeps_every_tensor_and_experts_whole(models, cli, tmp_path, name):
    out = tmp_path / "sharded"
    result = cli("model", "reshard", models[name], "--max-shard-size", "60KB", "-o", out)
    assert result.code == 0, result.err
    assert result.out.strip() == str(out)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert set(files) == {*shards, INDEX, "model.json", MANIFEST}
    assert verify(open_artifact(out)) == []
    index = json.loads((out / INDEX).read_text())
    units: dict[str, set[str]] = {}
    for tensor, shard in index["weight_map"].items():
        units.setdefault(unit_of(tensor), set()).add(shard)
    assert all(len(where) == 1 for where in units.values())  # an expert is never split
    for shard in shards:  # every shard within the size, unless it is one unit
        size = (out / shard).stat().st_size
        held = {unit_of(t) for t, s in index["weight_map"].items() if s == shard}
        assert size <= 60_000 + 4096 or len(held) == 1, (shard, size)
    original, cfg = load_model(models[name])
    resharded, _ = load_model(out)
    for key, value in original.state_dict().items():
        assert torch.equal(value, resharded.state_dict()[key]), key
    torch.testing.assert_close(logits(resharded, cfg), logits(original, cfg), rtol=0, atol=0)
    if name == "gpt":
        assert resharded.lm_head.weight is resharded.wte.weight
    # resharding a sharded model again gives the same tensors
    again = reshard_model(out, tmp_path / "again", max_shard_bytes=10**9)
    assert sorted(p.name for p in again.iterdir() if p.name.startswith("model-")) == [
        "model-00001.safetensors"]


def rewrite(source: Path, out: Path, edit) -> Path:
    with ArtifactWriter(out, "model", command=["test"]) as writer:
        for child in source.iterdir():
            if child.name != MANIFEST:
                (writer.dir / child.name).write_bytes(child.read_bytes())
        edit(writer.dir)
        return writer.commit({})


@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory) -> Path:
    return reshard_model(models["gpt-moe"], tmp_path_factory.mktemp("s") / "sharded",
                         max_shard_bytes=60_000)


def point_index(first_shard_as: str):
    def edit(folder: Path) -> None:
        data = json.loads((folder / INDEX).read_text())
        data["weight_map"] = {k: (first_shard_as if v == "model-00001.safetensors" else v)
                              for k, v in data["weight_map"].items()}
        (folder / INDEX).write_text(json.dumps(data))
    return edit


def symlinked_shard(folder: Path) -> None:
    outside = folder.parent / "outside.safetensors"
    outside.write_bytes((folder / "model-00001.safetensors").read_bytes())
    (folder / "model-00001.safetensors").unlink()
    (folder / "model-00001.safetensors").symlink_to(outside)


def truncated_shard(folder: Path) -> None:
    path = folder / "model-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-8])


BAD_INDEXES = {
    "a parent path": (point_index("../model-00001.safetensors"), "is not a plain file name"),
    "an absolute path": (point_index("/etc/hostname"), "is not a plain file name"),
    "a sub-folder": (point_index("sub/model-00001.safetensors"), "is not a plain file name"),
    "a missing file": (point_index("model-00099.safetensors"),
                       "shard model-00099.safetensors is missing"),
    "a symlink": (symlinked_shard, "model-00001.safetensors"),
    "a truncated shard": (truncated_shard, "model-00002.safetensors: not a valid safetensors "
                                           "file (the header declares"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_every_index_path_stays_inside_the_artifact(sharded, cli, tmp_path, case):
    edit, message = BAD_INDEXES[case]
    bad = rewrite(sharded, tmp_path / "bad", edit)
    with pytest.raises(CpmError, match=message.replace("(", r"\(")):
        load_model(bad)
    result = cli("model", "reshard", bad, "-o", tmp_path / "out")
    assert result.code == 2 and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_symlinked_shard_is_refused_by_the_weights_reader_too(sharded, tmp_path):
    """Below the manifest's own check: a folder that is not an artifact (an HF export)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for child in sharded.iterdir():
        (folder / child.name).write_bytes(child.read_bytes())
    symlinked_shard(folder)
    with pytest.raises(CpmError, match="model-00001.safetensors.* leads outside .* through a "
                                       "symlink"):
        open_weights(folder)


def test_shard_and_index_must_agree(sharded, tmp_path):
    def drop_from_index(folder: Path) -> None:
        data = json.loads((folder / INDEX).read_text())
        name = next(k for k, v in data["weight_map"].items() if v == "model-00001.safetensors")
        del data["weight_map"][name]
        data["metadata"]["crc32"].pop(name)
        (folder / INDEX).write_text(json.dumps(data))

    bad = rewrite(sharded, tmp_path / "bad", drop_from_index)
    with pytest.raises(CpmError, match="shard model-00001.safetensors does not match the index"):
        open_weights(bad)
    both = rewrite(sharded, tmp_path / "both", lambda d: (d / "model.safetensors").write_bytes(
        b"x"))
    with pytest.raises(CpmError, match="holds both model.safetensors and"):
        open_weights(both)


def test_bad_max_shard_size(models, cli, tmp_path):
    result = cli("model", "reshard", models["gpt"], "--max-shard-size", "2XB", "-o",
                 tmp_path / "o")
    assert result.code == 2 and "--max-shard-size: cannot read '2XB' as a size" in result.err


def test_random_model_is_written_one_layer_at_a_time(tmp_path):
    """A 67 MB model written by a fresh process grows its peak memory by about one layer
    (17 MB), not by the model."""
    script = f"""
import resource, sys
from cpmctl.models import ModelConfig, MoeConfig
from cpmctl.models.shard import write_random_model
cfg = ModelConfig(arch="gpt", vocab_size=1000, d_model=256, n_heads=4, n_layers=4,
                  d_ff=1024, max_positions=64, moe=MoeConfig(experts=8))
import torch
with torch.device("meta"):
    from cpmctl.models import build_model; build_model(cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_random_model(cfg, {str(tmp_path / "big")!r}, max_shard_bytes=50_000_000, command=["t"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    grown_mib = int(done.stdout.strip()) / 1024
    assert grown_mib < 45, grown_mib  # the whole model is 67 MB
    shards = sorted(p.name for p in (tmp_path / "big").glob("model-*.safetensors"))
    assert len(shards) == 2
    model, cfg = load_model(tmp_path / "big")
    assert model.blocks[3].moe.centroids.std() > 0.01  # every layer got its own weights
    assert not torch.equal(model.blocks[0].moe.experts[0].c_fc.weight,
                           model.blocks[1].moe.experts[0].c_fc.weight)
