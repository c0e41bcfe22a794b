"""Sharded model files: `model-NNNNN.safetensors` + `model.safetensors.index.json`, written one
tensor at a time so that no model, however large, is ever held whole.

    reshard_model("work/moe", "work/moe-sharded", max_shard_bytes=2 * 10**9)
    write_random_model(cfg, "work/big-moe", max_shard_bytes=2 * 10**9)   # bench weights

Layout rules: tensors are written in the model's own order (a layer's tensors together); an
MoE expert's tensors are one unit that a shard boundary never splits, so offloaded inference
reads one expert from one file; a unit larger than the shard size gets a shard of its own.
The index records every tensor's crc32 (weights.py checks it when the tensor is read).

`write_random_model` builds the model on the meta device and materialises, initialises,
writes and frees one layer at a time: the cpm2-moe recipe's ~400 GB model needs the memory of
one layer to write.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..artifacts import ArtifactWriter, open_artifact
from ..errors import CpmError
from ..folders import copy_tree
from .artifact import (
    MODEL_JSON,
    MODEL_JSON_FORMAT,
    TOKENIZER_DIR,
    build_on_meta,
    check_config_fits,
    check_weights,
    parameter_count,
    read_model_json,
)
from .config import ModelConfig
from .layers import RMSNorm, init_normal
from .weights import (
    ELEMENT_BYTES,
    SHARD_NAME,
    TORCH_CODES,
    open_weights,
    tensor_crc32,
    write_header,
    write_index,
    write_tensor,
)

_EXPERT = re.compile(r"(.+\.experts\.\d+)\.")
_LAYER = re.compile(r"([^.]+\.\d+)\.|([^.]+)\.")

Spec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


def unit_of(name: str) -> str:
    """What a shard boundary never splits: an expert (`blocks.3.moe.experts.7`) or a tensor."""
    match = _EXPERT.match(name)
    return match[1] if match else name


def layer_of(name: str) -> str:
    """The top-level module a tensor belongs to: `blocks.3`, `encoder.0`, `wte`."""
    match = _LAYER.match(name)
    return (match[1] or match[2]) if match else name


def plan_shards(specs: list[Spec], max_shard_bytes: int) -> list[list[Spec]]:
    """Consecutive units packed into shards of at most `max_shard_bytes` (a bigger unit alone)."""
    units: list[list[Spec]] = []
    for spec in specs:
        if units and unit_of(units[-1][0][0]) == unit_of(spec[0]):
            units[-1].append(spec)
        else:
            units.append([spec])
    shards: list[list[Spec]] = []
    size = 0
    for unit in units:
        unit_bytes = sum(_nbytes(s) for s in unit)
        if not shards or size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return shards


def _nbytes(spec: Spec) -> int:
    n = ELEMENT_BYTES[spec[1]]
    for d in spec[2]:
        n *= d
    return n


def write_shards(folder: Path, specs: list[Spec], tensors: Iterator[tuple[str, torch.Tensor]],
                 max_shard_bytes: int) -> int:
    """Write `tensors` (in the order of `specs`, each matching its spec) as shards + index in
    `folder`; returns the number of shards."""
    plan = plan_shards(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    crcs: dict[str, int] = {}
    for number, shard in enumerate(plan, start=1):
        file_name = SHARD_NAME.format(number)
        with (folder / file_name).open("wb") as f:
            write_header(f, shard)
            for name, dtype, shape in shard:
                got, tensor = next(tensors)
                if got != name or TORCH_CODES.get(tensor.dtype) != dtype or \
                        tuple(tensor.shape) != shape:
                    raise AssertionError(f"shard writer: expected {name}, got {got}")
                write_tensor(f, tensor)
                crcs[name] = tensor_crc32(tensor)
                weight_map[name] = file_name
    write_index(folder, weight_map, crcs, sum(_nbytes(s) for s in specs))
    return len(plan)


def reshard_model(source: str | Path, out: str | Path, *, max_shard_bytes: int,
                  force: bool = False, command=None) -> Path:
    """Write model `source` (one file or shards) as shards of at most `max_shard_bytes`, at
    `out`, reading one tensor at a time (each checked as it is read)."""
    if max_shard_bytes <= 0:
        raise CpmError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    artifact = open_artifact(source, expect="model", option="MODEL")
    cfg, tied = read_model_json(artifact.path)
    with open_weights(artifact.path) as weights:
        check_config_fits(cfg, len(weights.entries) + len(tied), weights.total_numel,
                          artifact.path / MODEL_JSON, weights.where)
        model = build_on_meta(cfg)
        check_weights(weights, model, tied)
        order = [name for name in model.state_dict() if name in weights.entries]
        specs = [(n, weights.entries[n].dtype, weights.entries[n].shape) for n in order]
        with ArtifactWriter(out, "model", force=force, command=command) as writer:
            shutil.copyfile(artifact.path / MODEL_JSON, writer.dir / MODEL_JSON)
            if (artifact.path / TOKENIZER_DIR).is_dir():
                copy_tree(artifact.path / TOKENIZER_DIR, writer.dir / TOKENIZER_DIR)
            shards = write_shards(writer.dir, specs, ((n, weights.read(n)) for n in order),
                                  max_shard_bytes)
            writer.add_input("model", str(source), artifact.digest)
            return writer.commit(meta={**artifact.meta, "shards": shards})


def _random_layer(module: nn.Module, std: float) -> None:
    """Fresh weights for one materialised layer, in the models' init distribution: N(0, std)
    for matrices and centroids, zero biases, norms at one."""
    for p in module.parameters():
        nn.init.normal_(p, mean=0.0, std=std)
    init_normal(module, std)
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def write_random_model(cfg: ModelConfig, out: str | Path, *, max_shard_bytes: int,
                       seed: int = 0, force: bool = False, command=None) -> Path:
    """A model artifact of random weights for `cfg`, sharded, written one layer at a time
    (the benchmarks' models; no tokenizer)."""
    model = build_on_meta(cfg)
    state = model.state_dict(keep_vars=True)
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        if id(tensor) in first_name:
            tied[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
    order = [name for name in state if name not in tied]
    specs = [(n, TORCH_CODES[state[n].dtype], tuple(state[n].shape)) for n in order]

    parameters = parameter_count(model)  # NOTE: before materialising unties the head

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        current, values, number = None, {}, 0
        for name in order:
            layer = layer_of(name)
            if layer != current:
                if current is not None:
                    model.get_submodule(current).to_empty(device="meta")
                current, number = layer, number + 1
                torch.manual_seed(seed * 100_003 + number)
                module = model.get_submodule(layer).to_empty(device="cpu")
                with torch.no_grad():
                    _random_layer(module, cfg.init_std)
                values = dict(module.named_parameters(prefix=layer, remove_duplicate=False))
            yield name, values[name].detach()

    config = {"format": MODEL_JSON_FORMAT, **dataclasses.asdict(cfg), "tied_weights": tied}
    with ArtifactWriter(out, "model", force=force, command=command) as writer:
        (writer.dir / MODEL_JSON).write_text(json.dumps(config, indent=2) + "\n",
                                             encoding="utf-8")
        shards = write_shards(writer.dir, specs, tensors(), max_shard_bytes)
        return writer.commit(meta={"parameters": parameters, "arch": cfg.arch,
                                   "shards": shards, "weights": f"random (seed {seed})"})
