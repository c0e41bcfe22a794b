"""Hugging Face PEFT's prompt-tuning format, to and from a prompt artifact.

    PEFT_DIR/adapter_model.safetensors   one tensor, "prompt_embeddings" [n, token_dim]
    PEFT_DIR/adapter_config.json         peft_type PROMPT_TUNING, task_type CAUSAL_LM,
                                         num_virtual_tokens n, token_dim, ...

`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(HF), PEFT_DIR)` uses it on the same
base model exported with `cpmctl model convert --to hf`. PEFT prepends its virtual tokens to
the input and cannot place them anywhere else, so only a prompt with every slot in front
converts; others are refused. The base model's digest travels in the safetensors metadata
(key `cpmctl_base_digest`, which PEFT ignores), so a prompt coming back is still checked
against its base. The folder carries cpmctl's export marker, so `--force` replaces it and
never a user's own adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..artifacts import (
    check_replaceable,
    move_into_place,
    open_artifact,
    read_json_object,
    temporary_sibling,
)
from ..console import warn
from ..errors import CpmError
from ..models.artifact import read_model_json
from ..models.hf import EXPORT_MARKER, is_hf_export
from .artifact import load_prompt, prompt_info, save_prompt
from .soft import PromptLayout, SoftPrompt

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"
DIGEST_KEY = "cpmctl_base_digest"


def to_peft(prompt_path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the prompt artifact at `prompt_path` as a PEFT prompt-tuning adapter at `out`."""
    out = Path(out)
    prompt = load_prompt(prompt_path, None)
    layout = prompt.layout
    if layout.front != layout.length:
        raise CpmError(f"{prompt.path}: its prompt sits at {layout.spec} (front:middle:back "
                       f"{layout.front}:{layout.middle}:{layout.back}); PEFT only prepends "
                       "virtual tokens to the input, so only a front prompt converts "
                       "(tune with --position front)")
    if prompt.info["base_model"].get("arch") not in (None, "gpt"):
        raise CpmError(f"{prompt.path}: its base model is "
                       f"{prompt.info['base_model']['arch']}; the PEFT export is for gpt models "
                       "(the ones `cpmctl model convert --to hf` writes)")
    check_replaceable(out, force, owned=is_hf_export,
                      what=f"a PEFT folder written by cpmctl (no {EXPORT_MARKER})")
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
        "num_virtual_tokens": layout.length, "token_dim": int(prompt.table.shape[1]),
        "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": None, "revision": None,
    }
    folder = temporary_sibling(out)
    try:
        save_file({PEFT_TENSOR: prompt.table.detach().contiguous()},
                  str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", DIGEST_KEY: prompt.base_digest})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n",
                                             encoding="utf-8")
        (folder / EXPORT_MARKER).write_text(json.dumps(
            {"written_by": "cpmctl", "cpmctl": __version__, "format": "peft-prompt-tuning"},
            indent=2) + "\n", encoding="utf-8")
        move_into_place(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _read_adapter(folder: Path) -> tuple[torch.Tensor, str | None]:
    """(prompt_embeddings, the base digest it carries or None), checked against the config."""
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CpmError(f"{folder}: no {ADAPTER_CONFIG}; --from peft needs a PEFT adapter folder")
    config = read_json_object(config_path)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise CpmError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only "
                       "PROMPT_TUNING adapters are soft prompts")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CpmError(f"{config_path}: num_transformer_submodules must be 1 (one prompt, "
                       "for a decoder-only model)")
    length, width = config.get("num_virtual_tokens"), config.get("token_dim")
    for key, value in (("num_virtual_tokens", length), ("token_dim", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CpmError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    path = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            if PEFT_TENSOR not in f.keys():
                raise CpmError(f"{path}: no tensor {PEFT_TENSOR!r}")
            shape = tuple(f.get_slice(PEFT_TENSOR).get_shape())
            if shape != (length, width):
                raise CpmError(f"{path}: {PEFT_TENSOR} is {list(shape)}, {ADAPTER_CONFIG} "
                               f"says [{length}, {width}]")
            table = f.get_tensor(PEFT_TENSOR)
            digest = (f.metadata() or {}).get(DIGEST_KEY)
    except (SafetensorError, OSError) as exc:
        raise CpmError(f"{path}: unreadable ({exc})") from None
    if not table.is_floating_point() or not bool(torch.isfinite(table).all()):
        raise CpmError(f"{path}: {PEFT_TENSOR} holds non-finite or non-float values")
    return table.float(), digest


def from_peft(folder: str | Path, model_path: str | Path, task: dict, out: str | Path, *,
              force: bool = False) -> Path:
    """A prompt artifact at `out` from the PEFT adapter in `folder`, for the cpmctl model at
    `model_path` (the one that was exported to HF) and the task definition `task`."""
    folder = Path(folder)
    base = open_artifact(model_path, expect=("model", "checkpoint"), option="--model")
    cfg, _ = read_model_json(base.path)
    table, digest = _read_adapter(folder)
    if digest is not None and digest != base.digest:
        raise CpmError(f"{folder}: the adapter was exported from a prompt for the model with "
                       f"digest {digest}, not this --model ({base.digest})")
    if digest is None:
        warn(f"{folder}: the adapter does not say which model it was tuned on; it is taken "
             f"to be {base.path}")
    if cfg.arch != "gpt":
        raise CpmError(f"{base.path} is an {cfg.arch} model; PEFT adapters come from gpt models")
    if table.shape[1] != cfg.d_model:
        raise CpmError(f"{folder / ADAPTER_CONFIG}: token_dim is {table.shape[1]}, the model's "
                       f"d_model is {cfg.d_model}")
    prompt = SoftPrompt(PromptLayout(table.shape[0], 0, 0), cfg.d_model)
    with torch.no_grad():
        prompt.table.copy_(table)
    info = prompt_info(prompt, init="peft", task=task, base=base, d_model=cfg.d_model)
    return save_prompt(out, prompt, info, force=force)
