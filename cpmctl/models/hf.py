"""The Hugging Face GPT-2 format of a CPM-1 model: config translation and weight mapping.

CPM-Generate was published for transformers as a `GPT2LMHeadModel`: a folder with
`config.json` and `pytorch_model.bin` or `model.safetensors` (either possibly sharded, with an
`*.index.json` naming each tensor's file). Our GPT keeps GPT-2's parameter names, so:

    transformer.wte / wpe / ln_f           <->  wte / wpe / ln_f
    transformer.h.N.<rest>                 <->  blocks.N.<rest>
    Conv1D weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj): [in, out]
                                           <->  nn.Linear weights [out, in], transposed
    lm_head.weight                         tied to wte: on reading it must equal wte;
                                           never written (transformers ties it on load)

The `transformer.` prefix is optional on reading (a bare `GPT2Model` saves without it). The
causal-mask buffers older transformers saved (`h.N.attn.bias`, `h.N.attn.masked_bias`) are
skipped. Any other tensor we do not know, a missing one or a wrong shape is an error naming
the tensor and the file: a conversion that dropped or invented weights would give a model that
only looks right.

NOTE: `pytorch_model.bin` is a pickle, and unpickling runs code. It is read only through
`torch.load(weights_only=True)`, which refuses everything but tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..artifacts import check_replaceable, move_into_place, read_json_object, temporary_sibling
from ..errors import CpmError
from ..folders import copy_tree, member
from ..tokenizer import from_folder
from .artifact import (
    TOKENIZER_DIR,
    build_on_meta,
    check_config_fits,
    summarize_names,
)
from .config import ModelConfig

CONFIG = "config.json"
EXPORT_MARKER = "cpmctl-export.json"
"""Marks a Hugging Face folder as written by `cpmctl model convert --to hf`, so that --force
replaces it and never a user's own model folder."""
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"

#: tanh-approximated GELU under its transformers names: what our GPT computes.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
#: GPT-2 options our GPT does not implement, each with the value it matches.
FIXED_OPTIONS = {"model_type": "gpt2", "scale_attn_weights": True,
                 "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                 "tie_word_embeddings": True}
_DEFAULT_EPS = ModelConfig(arch="gpt").eps

_HF_BLOCK = re.compile(r"h\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_CONV1D = re.compile(r"blocks\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_HEAD, _EMBEDDING = "lm_head.weight", "wte.weight"
_REQUIRED = object()


# ---------------------------------------------------------------- config.json


def _value(config: dict, key: str, types: tuple, where: Path, default=_REQUIRED):
    if key not in config:
        if default is _REQUIRED:
            raise CpmError(f"{where}: missing key '{key}'")
        return default
    value = config[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise CpmError(f"{where}: {key} must be {wanted}, got {json.dumps(value)}")
    return value


def _positive(config: dict, key: str, where: Path) -> int:
    value = _value(config, key, (int,), where)
    if value <= 0:
        raise CpmError(f"{where}: {key} must be positive, got {value}")
    return value


def read_hf_config(folder: Path) -> ModelConfig:
    """The `ModelConfig` of a GPT-2 `config.json`; a GPT-2 option our GPT does not implement is
    an error naming its key. Keys GPT-2 itself gives defaults take GPT-2's defaults, except the
    sizes, which must be there. cpmctl has one dropout rate: resid_pdrop's."""
    where = folder / CONFIG
    if not where.is_file():
        raise CpmError(f"{folder}: no {CONFIG} (is it a Hugging Face model folder?)")
    config = read_json_object(where)
    for key, expected in FIXED_OPTIONS.items():
        value = _value(config, key, (type(expected),), where, default=expected)
        if value != expected:
            raise CpmError(f"{where}: {key} {json.dumps(value)} is not supported (cpmctl's "
                           f"GPT needs {json.dumps(expected)})")
    activation = _value(config, "activation_function", (str,), where, default="gelu_new")
    if activation not in ACTIVATIONS:
        raise CpmError(f"{where}: activation_function {activation!r} is not supported (cpmctl's "
                       f"GPT computes tanh-approximated GELU: {' or '.join(ACTIVATIONS)})")
    d_model, n_heads = _positive(config, "n_embd", where), _positive(config, "n_head", where)
    if d_model % n_heads:
        raise CpmError(f"{where}: n_embd ({d_model}) is not divisible by n_head ({n_heads})")
    inner = _value(config, "n_inner", (int, type(None)), where, default=None)
    if inner is not None and inner <= 0:
        raise CpmError(f"{where}: n_inner must be positive or null, got {inner}")
    # NOTE: n_ctx is the older name of n_positions; configs from transformers 2.x have only it.
    positions = "n_ctx" if "n_positions" not in config and "n_ctx" in config else "n_positions"
    eps = float(_value(config, "layer_norm_epsilon", (int, float), where, default=_DEFAULT_EPS))
    return ModelConfig(
        arch="gpt", vocab_size=_positive(config, "vocab_size", where), d_model=d_model,
        n_heads=n_heads, d_ff=inner or 0, n_layers=_positive(config, "n_layer", where),
        max_positions=_positive(config, positions, where),
        dropout=float(_value(config, "resid_pdrop", (int, float), where, default=0.1)),
        # the default stays 0 ("the architecture's default") so a round trip keeps model.json
        layer_norm_eps=0.0 if eps == _DEFAULT_EPS else eps,
        init_std=float(_value(config, "initializer_range", (int, float), where,
                              default=0.02)))


def check_gpt2_compatible(cfg: ModelConfig, where: Path) -> None:
    """Refuse a model that has no GPT-2 form, naming the model.json key at fault."""
    if cfg.arch != "gpt":
        raise CpmError(f"{where}: arch {cfg.arch!r} (CPM-2 encoder-decoder) has no Hugging Face "
                       f"GPT-2 form; --to hf converts dense gpt models only")
    if cfg.moe.experts:
        raise CpmError(f"{where}: moe.experts {cfg.moe.experts}: a mixture-of-experts model has "
                       f"no Hugging Face GPT-2 form; --to hf converts dense gpt models only")
    if cfg.head_size * cfg.n_heads != cfg.d_model:
        raise CpmError(f"{where}: d_head {cfg.d_head} x n_heads {cfg.n_heads} is not d_model "
                       f"{cfg.d_model}, which GPT-2 requires")


def hf_config(cfg: ModelConfig, special: dict[str, int] | None = None) -> dict:
    """The GPT-2 `config.json` of a dense GPT config; `special` (a tokenizer's special ids)
    gives generation its end token (<eod>) and padding."""
    special = special or {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_positions, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff or None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std, "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": special.get("eod"),
        "pad_token_id": special.get("pad"),
    }


def to_transformers(model: nn.Module, **config) -> nn.Module:
    """transformers' `GPT2LMHeadModel` holding our dense GPT's weights (the baselines of the
    benchmarks and the equality tests); `config` adds GPT2Config fields (attn_implementation).
    Needs transformers, which only the dev extra installs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    theirs = GPT2LMHeadModel(GPT2Config.from_dict({**hf_config(model.cfg), **config}))
    weights = to_hf_state_dict(model.state_dict())
    names = {name for name, _ in theirs.named_parameters()}  # the tied head appears once
    if names != set(weights):
        raise CpmError(f"transformers' GPT-2 does not take these weights: "
                       f"{', '.join(sorted(names ^ set(weights)))}")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(weights[name])
    return theirs.eval()


# ---------------------------------------------------------------- tensor names


def our_name(hf_name: str) -> str:
    name = hf_name.removeprefix("transformer.")
    block = _HF_BLOCK.fullmatch(name)
    return f"blocks.{block[1]}.{block[2]}" if block else name


def hf_name(name: str) -> str:
    block = _OUR_BLOCK.fullmatch(name)
    return "transformer." + (f"h.{block[1]}.{block[2]}" if block else name)


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT's state dict in GPT2LMHeadModel's names and layout, without the tied head."""
    return {hf_name(name): tensor.t().contiguous() if _CONV1D.fullmatch(name) else tensor
            for name, tensor in state.items() if name != _HEAD}


def from_hf_state_dict(tensors: dict[str, torch.Tensor], files: dict[str, Path],
                       expected: dict[str, torch.Size], where: Path) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (`files`: the file each came from) -> our GPT's state dict, checked
    against `expected` (our names and shapes). `where` names the whole set in errors."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    heads: list[str] = []
    for name, tensor in tensors.items():
        ours = our_name(name)
        if _MASK_BUFFER.fullmatch(name.removeprefix("transformer.")):
            continue
        if ours == _HEAD:
            heads.append(name)
            continue
        if ours not in expected:
            unexpected.append(name)
            continue
        if ours in state:
            raise CpmError(f"{files[name]}: tensor {name} is there twice (also as "
                           f"{origin[ours]})")
        conv1d = _CONV1D.fullmatch(ours) is not None
        wanted = list(expected[ours])[::-1] if conv1d else list(expected[ours])
        if list(tensor.shape) != wanted:
            raise CpmError(f"{files[name]}: tensor {name} has shape {list(tensor.shape)}; "
                           f"{CONFIG} implies {wanted}")
        state[ours], origin[ours] = (tensor.t() if conv1d else tensor), name
    if unexpected:
        raise CpmError(f"{files[unexpected[0]]}: unexpected tensor(s) "
                       f"{summarize_names(set(unexpected))} (not in the GPT-2 model its "
                       f"{CONFIG} describes)")
    missing = {hf_name(n) for n in expected if n not in state and n != _HEAD}
    if missing:
        raise CpmError(f"{where}: missing tensor(s) {summarize_names(missing)}")
    for name in heads:
        if not torch.equal(tensors[name], state[_EMBEDDING]):
            raise CpmError(f"{files[name]}: {name} differs from {origin[_EMBEDDING]}; cpmctl's "
                           f"GPT ties the output head to the word embedding")
    state[_HEAD] = state[_EMBEDDING]
    return state


# ---------------------------------------------------------------- reading the weights


def _weight_files(folder: Path) -> tuple[list[Path], Path]:
    """(the files that hold the weights, the path that names them all in errors).
    safetensors first, as transformers prefers it."""
    for single in (SAFETENSORS, PICKLE):
        if (folder / single).is_file():
            return [folder / single], folder / single
        index = folder / (single + INDEX_SUFFIX)
        if index.is_file():
            return _shards(index), index
    raise CpmError(f"{folder}: no weights (looked for {SAFETENSORS}, {PICKLE} and their "
                   f"sharded {INDEX_SUFFIX} forms)")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CpmError(f"{index}: not a shard index (expected a JSON object with a "
                       f"'weight_map' of tensor name -> file; {exc})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise CpmError(f"{index}: shard {name!r} is not a file name in {index.parent}")
        if not member(index.parent, name, str(index)).is_file():
            raise CpmError(f"{index}: shard {name} is missing")
    return [index.parent / name for name in names]


def _unpickler_reason(exc: Exception) -> str:
    """The one informative line of torch's weights_only refusal, e.g. 'Unsupported global:
    GLOBAL mymodule.MyClass' (the rest of its message is advice to unpickle anyway)."""
    detail = str(exc).split("WeightsUnpickler error:", 1)[-1]
    line = next((part.strip() for part in detail.splitlines() if part.strip()), "")
    return line.split(" was not an allowed global")[0] or "not a plain tensor checkpoint"


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CpmError(f"{path}: refused by torch.load(weights_only=True): "
                       f"{_unpickler_reason(exc)}; cpmctl reads tensors only and never "
                       f"unpickles anything else") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise CpmError(f"{path}: unreadable ({first[0] if first else type(exc).__name__})"
                       ) from None
    if not isinstance(state, dict):
        raise CpmError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CpmError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor")
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".bin"):
        return _read_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CpmError(f"{path}: unreadable ({exc})") from None


def _check_values(name: str, tensor: torch.Tensor, path: Path) -> None:
    """A weight is floating point and finite; the causal-mask buffers older transformers
    saved (bool or uint8) are skipped on reading and exempt."""
    if _MASK_BUFFER.fullmatch(name.removeprefix("transformer.")):
        return
    if not tensor.is_floating_point():
        raise CpmError(f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                       f"model weights must be floating point, never cast from another type")
    if not bool(torch.isfinite(tensor).all()):
        raise CpmError(f"{path}: tensor {name} holds NaN or infinite values")


def read_hf_weights(folder: Path, cfg: ModelConfig) -> tuple[nn.Module, list[Path]]:
    """Our GPT holding the folder's GPT-2 weights (in their dtype), and the files read.

    The model is built on the meta device and the checkpoint's tensors are assigned to it, so
    nothing is initialised or copied: a 2.6B model needs its weights' memory once. Before it
    is built, config.json is checked against the tensors read (`check_config_fits`: sizes and
    block count), so a config of 10^9 layers is refused before it costs memory.
    """
    paths, where = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    for path in paths:
        for name, tensor in _read_file(path).items():
            if name in tensors:
                raise CpmError(f"{path}: tensor {name} is also in {files[name]}")
            _check_values(name, tensor, path)
            tensors[name], files[name] = tensor, path
    values = sum(t.numel() for n, t in tensors.items()
                 if not _MASK_BUFFER.fullmatch(n.removeprefix("transformer.")))
    # NOTE: + 1 tensor: the tied head, which a GPT-2 checkpoint may leave out
    check_config_fits(cfg, len(tensors) + 1, values, folder / CONFIG, where)
    model = build_on_meta(cfg)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    model.load_state_dict(from_hf_state_dict(tensors, files, expected, where), assign=True)
    model.lm_head.weight = model.wte.weight  # NOTE: assign=True replaced wte's Parameter: re-tie
    return model, paths


# ---------------------------------------------------------------- writing a folder


def is_hf_export(folder: Path) -> bool:
    """Whether `folder` is a Hugging Face folder cpmctl wrote: it carries EXPORT_MARKER."""
    try:
        return read_json_object(folder / EXPORT_MARKER).get("written_by") == "cpmctl"
    except CpmError:
        return False


def check_hf_output(out: Path, force: bool) -> None:
    """Refuse to overwrite `out` without `force`, and even with it a folder cpmctl did not
    write (no EXPORT_MARKER: a user's own model folder, config.json or not)."""
    check_replaceable(out, force, owned=is_hf_export,
                      what=f"a Hugging Face folder written by cpmctl (no {EXPORT_MARKER})")


def write_hf_folder(out: Path, model: nn.Module, cfg: ModelConfig,
                    tokenizer_dir: Path | None, *, force: bool = False) -> Path:
    """Write a dense GPT (see `check_gpt2_compatible`) as `config.json` + `model.safetensors`
    (+ the tokenizer artifact as `tokenizer/`) at `out`, built in a hidden sibling and renamed
    into place, marked as cpmctl's by EXPORT_MARKER. `force` replaces only such a folder."""
    check_hf_output(out, force)
    folder = temporary_sibling(out)
    try:
        save_file(to_hf_state_dict(model.state_dict()), str(folder / SAFETENSORS),
                  metadata={"format": "pt"})
        special = None
        if tokenizer_dir is not None:
            copy_tree(tokenizer_dir, folder / TOKENIZER_DIR)
            special = from_folder(folder / TOKENIZER_DIR).special
        (folder / EXPORT_MARKER).write_text(json.dumps(
            {"written_by": "cpmctl", "cpmctl": __version__, "format": "huggingface-gpt2"},
            indent=2) + "\n", encoding="utf-8")
        (folder / CONFIG).write_text(json.dumps(hf_config(cfg, special), indent=2) + "\n",
                                     encoding="utf-8")
        move_into_place(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out
