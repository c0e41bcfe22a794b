"""Model weights on disk (docs/design.md §2): `model.json` + `model.safetensors` (or shards and
their index, weights.py) (+ `tokenizer/`).

    write_model_files(folder, model.state_dict(), cfg)     # the two files, into any folder
    save_model(out, model, cfg, tokenizer_dir, meta={})    # a whole model artifact
    model, cfg = load_model(path)                          # a model or a checkpoint

`model.json` is the `ModelConfig` (dataclasses.asdict) plus "format" and "tied_weights"
(alias name -> stored name). safetensors refuses tensors that share storage, so a tied weight
(the GPT head is the word embedding) is stored once, under its first name, and loading fills
the alias from it. MoE experts are separate tensors already (`...experts.N....`). Never pickle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..artifacts import ArtifactWriter, open_artifact, read_json_object
from ..errors import CpmError
from ..folders import copy_tree
from . import build_on_meta
from .config import ModelConfig, MoeConfig
from .weights import WEIGHTS, Weights, open_weights

MODEL_JSON = "model.json"
TOKENIZER_DIR = "tokenizer"
MODEL_JSON_FORMAT = 1
_RESERVED = ("format", "tied_weights")
_SHOW = 5  # names listed in a missing/unexpected tensor error


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, {alias: stored name}). Exact views of one tensor are stored once;
    other tensors that merely overlap another's storage are stored as copies."""
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = _view_key(tensor)
        if key in first_by_view:
            tied[name] = first_by_view[key]
            continue
        first_by_view[key] = name
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(ptr)
        tensor = tensor.contiguous()
        stored[name] = tensor.cpu()
    return stored, tied


def write_model_files(folder: str | Path, state: dict[str, torch.Tensor],
                      cfg: ModelConfig) -> None:
    """Write `model.json` and `model.safetensors` for a model's `state_dict()` into `folder`
    (tied weights are views of one tensor there, and are stored once)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored, tied = split_tied(state)
    config = {"format": MODEL_JSON_FORMAT, **dataclasses.asdict(cfg), "tied_weights": tied}
    (folder / MODEL_JSON).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(stored, str(folder / WEIGHTS), metadata={"format": "pt"})


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied ones counted once."""
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(unique.values())


def save_model(out: str | Path, model: nn.Module, cfg: ModelConfig,
               tokenizer_dir: Path | None, *, meta: dict, force: bool = False,
               command=None, inputs: list[tuple[str, str, str]] | None = None) -> Path:
    """Write a model artifact at `out`; `tokenizer_dir` (a tokenizer artifact) is copied into
    `tokenizer/`. The manifest's meta is `meta` plus `parameters` and `arch`; its inputs are
    `inputs` ((role, path, digest) triples), by default the tokenizer."""
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = open_artifact(tokenizer_dir, expect="tokenizer", option="the tokenizer")
        if inputs is None:
            inputs = [("tokenizer", str(tokenizer_dir), tokenizer.digest)]
    with ArtifactWriter(out, "model", force=force, command=command) as writer:
        write_model_files(writer.dir, model.state_dict(), cfg)
        if tokenizer is not None:
            copy_tree(tokenizer.path, writer.dir / TOKENIZER_DIR)
        for role, path, digest in inputs or []:
            writer.add_input(role, path, digest)
        return writer.commit(meta={**meta, "parameters": parameter_count(model),
                                   "arch": cfg.arch})


def _check_fields(data: dict, cls, where: str, prefix: str = "") -> dict:
    """Keyword arguments for `cls` from `data`: unknown keys and wrong types are CpmErrors."""
    if not isinstance(data, dict):
        raise CpmError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise CpmError(f"{where}: unknown key '{prefix}{key}'")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = type(default)(**_check_fields(value, type(default), where,
                                                        f"{prefix}{key}."))
            continue
        is_bool = isinstance(value, bool)
        if isinstance(default, bool):
            ok = is_bool
        else:
            ok = isinstance(value, type(default)) and not is_bool
        if isinstance(default, float) and isinstance(value, int) and not is_bool:
            ok, value = True, float(value)
        if not ok:
            raise CpmError(f"{where}: {prefix}{key} must be {type(default).__name__}, "
                           f"got {value!r}")
        kwargs[key] = value
    return kwargs


def read_model_json(folder: str | Path) -> tuple[ModelConfig, dict[str, str]]:
    """(config, tied aliases) from `folder/model.json`."""
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise CpmError(f"{Path(folder)}: {MODEL_JSON} is missing")
    data = read_json_object(path)
    fmt = data.get("format", MODEL_JSON_FORMAT)
    if not isinstance(fmt, int) or fmt > MODEL_JSON_FORMAT:
        raise CpmError(f"{path}: format {fmt!r} is newer than this cpmctl reads "
                       f"(format {MODEL_JSON_FORMAT}); upgrade cpmctl")
    tied = data.get("tied_weights", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise CpmError(f"{path}: tied_weights must map names to names")
    body = {k: v for k, v in data.items() if k not in _RESERVED}
    kwargs = _check_fields(body, ModelConfig, str(path))
    kwargs.setdefault("moe", MoeConfig())
    return ModelConfig(**kwargs), tied


def summarize_names(names: set[str]) -> str:
    """The first few names, sorted, and how many more: for one-line errors."""
    shown = sorted(names)[:_SHOW]
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(shown) + more


def check_config_fits(cfg: ModelConfig, n_tensors: int, n_values: int, where: Path,
                      weights: Path) -> None:
    """Refuse, before anything is built, a config that cannot describe the weights `weights`
    holds (`n_tensors` tensors of `n_values` values): every size is a dimension of some tensor,
    so none can exceed the values there, and every block (and every expert of it) has at least
    one tensor of its own. Building even on the meta device costs memory per module, so a
    model.json claiming 10^9 layers must be refused here, not after building."""
    sizes = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_ff": cfg.ffn_size,
             "n_heads * d_head": cfg.n_heads * cfg.head_size, "moe.experts": cfg.moe.experts}
    if cfg.arch == "gpt":
        sizes["max_positions"] = cfg.max_positions
    else:
        sizes["relative_buckets"] = cfg.relative_buckets
    for key, size in sizes.items():
        if size > n_values:
            raise CpmError(f"{where}: {key} {size:,} is larger than all of {weights} "
                           f"({n_values:,} values); the file cannot hold this model")
    blocks = cfg.n_layers + (cfg.decoder_layers if cfg.arch == "encdec" else 0)
    if blocks * max(1, cfg.moe.experts) > n_tensors:
        what = (f"{blocks:,} blocks of {cfg.moe.experts:,} experts" if cfg.moe.experts
                else f"{blocks:,} blocks")
        raise CpmError(f"{where}: {what} need more tensors than the {n_tensors:,} that "
                       f"{weights} holds; the file cannot hold this model")


def check_parameter_count(model: nn.Module, n_values: int, where: Path, weights: Path) -> None:
    """Refuse a model with more parameters than the weights file holds values (a model.json
    whose sizes outgrow its weights: caught before the shapes, with the sizes in the message)."""
    needed = parameter_count(model)
    if needed > n_values:
        raise CpmError(f"{where} describes {needed:,} parameters ({4 * needed / 2**30:,.1f} GiB "
                       f"in fp32); {weights} holds {n_values:,}")


def _tensor_sources(weights: Weights, tied: dict[str, str]) -> dict[str, str]:
    """{name the model may ask for: stored name} (aliases of tied weights included)."""
    sources = {name: name for name in weights.entries}
    for alias, name in tied.items():
        if name not in weights.entries:
            raise CpmError(f"{weights.where.parent / MODEL_JSON}: tied weight {alias} names "
                           f"{name}, which {weights.where.name} does not hold")
        sources.setdefault(alias, name)
    return sources


def check_weights(weights: Weights, model: nn.Module, tied: dict[str, str]) -> dict[str, str]:
    """Check every tensor `model` (meta or real) expects against the headers, reading no
    tensor data: names, then the parameter count, then each shape and dtype. Returns {name the
    model expects: stored name} (tied aliases resolved)."""
    where = weights.where
    sources = _tensor_sources(weights, tied)
    expected = model.state_dict(keep_vars=True)
    missing, unexpected = set(expected) - set(sources), set(sources) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {summarize_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): "
                         f"{summarize_names(unexpected)}")
        raise CpmError(f"{where} does not match its model.json: " + "; ".join(parts))
    check_parameter_count(model, weights.total_numel, where.parent / MODEL_JSON, where)
    for name, tensor in expected.items():
        entry = weights.entries[sources[name]]
        if entry.shape != tuple(tensor.shape):
            raise CpmError(f"{entry.path}: tensor {entry.name} has shape {list(entry.shape)}; "
                           f"its model.json implies {list(tensor.shape)}")
        entry.check_float()
    return sources


def fill_model(weights: Weights, model: nn.Module, tied: dict[str, str],
               skip=lambda name: False) -> None:
    """`check_weights`, then read the tensors one at a time into `model`: a meta tensor is
    replaced by the one read (cast to the model's dtype), a real one is copied into, so an
    optimizer holding it keeps it. Tensors the model ties (one Parameter under two names) are
    read once and stay tied. Names for which `skip(name)` is true stay as they are (offloaded
    inference leaves the experts on the meta device)."""
    sources = check_weights(weights, model, tied)
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        if not skip(name):
            groups.setdefault(id(tensor), []).append(name)
    with torch.no_grad():
        for names in groups.values():
            first = next((n for n in names if n in weights.entries), names[0])
            value = weights.read(sources[first])
            for other in names:
                if other != first and other in weights.entries and \
                        not torch.equal(weights.read(other), value):
                    raise CpmError(f"{weights.where}: {other} differs from {first}, which the "
                                   f"model ties it to")
            _place(model, names, expected[first], value)


def _place(model: nn.Module, names: list[str], current: torch.Tensor,
           value: torch.Tensor) -> None:
    if not current.is_meta:
        current.copy_(value)
        return
    value = value.to(current.dtype)
    if isinstance(current, nn.Parameter):
        value = nn.Parameter(value, requires_grad=current.requires_grad)
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        slots = module._parameters if attr in module._parameters else module._buffers
        slots[attr] = value


def load_weights(folder: str | Path, model: nn.Module, tied: dict[str, str]) -> None:
    """Load the folder's weights (`model.safetensors`, or shards and their index) into `model`
    strictly: every tensor, nothing extra, shapes and dtypes checked before any is read."""
    with open_weights(folder) as weights:
        fill_model(weights, model, tied)


def load_model(path: str | Path, option: str = "--model") -> tuple[nn.Module, ModelConfig]:
    """Build the model a model (or checkpoint) artifact describes and load its weights.

    Nothing is allocated before the weights' headers say the model fits them: the config is
    checked against the headers (`check_config_fits`), the model is built on the meta device
    and its parameter count checked, then each tensor is read and checked as it is placed."""
    artifact = open_artifact(path, expect=("model", "checkpoint"), option=option)
    cfg, tied = read_model_json(artifact.path)
    config_path = artifact.path / MODEL_JSON
    with open_weights(artifact.path) as weights:
        check_config_fits(cfg, len(weights.entries) + len(tied), weights.total_numel,
                          config_path, weights.where)
        model = build_on_meta(cfg)
        fill_model(weights, model, tied)
    return model, cfg
