"""Model weights on disk (ARCHITECTURE §2): `model.json` + `model.safetensors` (+ `tokenizer/`).

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
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import ArtifactWriter, open_artifact, read_json_object
from ..errors import CpmError
from . import build_model
from .config import ModelConfig, MoeConfig

MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
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
            shutil.copytree(tokenizer.path, writer.dir / TOKENIZER_DIR)
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


def load_weights(folder: str | Path, model: nn.Module, tied: dict[str, str]) -> None:
    """Load `folder/model.safetensors` into `model` strictly (every tensor, nothing extra)."""
    folder = Path(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        raise CpmError(f"{folder}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CpmError(f"{path}: unreadable ({exc})") from None
    for alias, name in tied.items():
        if name not in tensors:
            raise CpmError(f"{folder / MODEL_JSON}: tied weight {alias} names {name}, "
                           f"which {WEIGHTS} does not hold")
        tensors.setdefault(alias, tensors[name])
    expected = set(model.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {summarize_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): "
                         f"{summarize_names(unexpected)}")
        raise CpmError(f"{path} does not match its model.json: " + "; ".join(parts))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        raise CpmError(f"{path} does not match its model.json: "
                       f"{first[-1].strip() if first else exc}") from None


def load_model(path: str | Path, option: str = "--model") -> tuple[nn.Module, ModelConfig]:
    """Build the model a model (or checkpoint) artifact describes and load its weights."""
    artifact = open_artifact(path, expect=("model", "checkpoint"), option=option)
    cfg, tied = read_model_json(artifact.path)
    model = build_model(cfg)
    load_weights(artifact.path, model, tied)
    return model, cfg
