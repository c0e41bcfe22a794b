"""The prompt artifact (docs/design.md §2): the soft prompt alone, kilobytes, tied to its base.

    PROMPT/prompt.safetensors   one tensor, "prompt" [length, d_model], fp32
    PROMPT/prompt.json          length, position (front/middle/back counts), init, d_model,
                                the task definition, the base model's digest
    PROMPT/cpm-artifact.json    kind "prompt"; meta: base_model_digest, length, position, task

    save_prompt(out, prompt, init=..., task=..., base=open_artifact(model), force=False)
    prompt = load_prompt("work/prompt", open_artifact(model).digest)   # refuses another base

A prompt is learnt against one model's weights and means nothing for another, so loading it
onto a model with a different digest is an error naming both digests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..artifacts import Artifact, ArtifactWriter, open_artifact, read_json_object
from ..errors import CpmError
from .soft import PromptLayout, SoftPrompt

PROMPT_TENSORS = "prompt.safetensors"
PROMPT_JSON = "prompt.json"
TENSOR = "prompt"
PROMPT_JSON_FORMAT = 1


class LoadedPrompt(SoftPrompt):
    """A soft prompt read from an artifact, with what it was tuned for."""

    def __init__(self, layout: PromptLayout, d_model: int, info: dict, path: Path):
        super().__init__(layout, d_model)
        self.info = info
        self.path = path

    @property
    def base_digest(self) -> str:
        return self.info["base_model"]["digest"]

    @property
    def task(self) -> dict:
        """The task definition it was tuned on (as `prompt_task_definition` wrote it)."""
        return self.info["task"]


def prompt_info(prompt: SoftPrompt, *, init: str, task: dict, base: Artifact,
                d_model: int) -> dict:
    layout = prompt.layout
    return {
        "format": PROMPT_JSON_FORMAT,
        "length": layout.length,
        "position": {"front": layout.front, "middle": layout.middle, "back": layout.back,
                     "spec": layout.spec},
        "init": init,
        "d_model": d_model,
        "task": task,
        "base_model": {"digest": base.digest, "path": str(base.path),
                       "arch": base.meta.get("arch")},
    }


def write_prompt_files(folder: Path, prompt: SoftPrompt, info: dict) -> None:
    """prompt.safetensors + prompt.json into `folder` (an artifact being built, a checkpoint)."""
    table = prompt.table.detach().float().cpu().contiguous()
    save_file({TENSOR: table}, str(folder / PROMPT_TENSORS), metadata={"format": "pt"})
    (folder / PROMPT_JSON).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")


def save_prompt(out: str | Path, prompt: SoftPrompt, info: dict, *, force: bool = False,
                command=None, inputs: list[tuple[str, str, str]] = ()) -> Path:
    """Write a prompt artifact at `out`; `info` is `prompt_info(...)`."""
    with ArtifactWriter(out, "prompt", force=force, command=command) as writer:
        write_prompt_files(writer.dir, prompt, info)
        writer.add_input("base-model", info["base_model"]["path"], info["base_model"]["digest"])
        for role, path, digest in inputs:
            writer.add_input(role, path, digest)
        return writer.commit(meta={"base_model_digest": info["base_model"]["digest"],
                                   "length": info["length"],
                                   "position": info["position"]["spec"],
                                   "task": info["task"].get("name")})


def _int(info: dict, key: str, where: Path, minimum: int) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CpmError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def read_prompt_json(folder: Path) -> tuple[dict, PromptLayout]:
    """prompt.json of a prompt artifact or checkpoint, checked key by key."""
    where = folder / PROMPT_JSON
    info = read_json_object(where)
    fmt = info.get("format")
    if not isinstance(fmt, int) or fmt > PROMPT_JSON_FORMAT:
        raise CpmError(f"{where}: format {fmt!r} is not one this cpmctl reads "
                       f"(format {PROMPT_JSON_FORMAT})")
    length = _int(info, "length", where, 1)
    _int(info, "d_model", where, 1)
    position = info.get("position")
    if not isinstance(position, dict):
        raise CpmError(f"{where}: position must be an object with front, middle, back")
    counts = [_int(position, key, where, 0) for key in ("front", "middle", "back")]
    if sum(counts) != length:
        raise CpmError(f"{where}: position counts {counts} do not sum to length {length}")
    base = info.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("digest"), str):
        raise CpmError(f"{where}: base_model.digest is missing")
    if not isinstance(info.get("task"), dict):
        raise CpmError(f"{where}: task must be an object (the task definition)")
    return info, PromptLayout(*counts)


def read_prompt_table(path: Path, length: int, d_model: int) -> torch.Tensor:
    """The prompt tensor, its shape checked against prompt.json before it is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != {TENSOR}:
                raise CpmError(f"{path}: expected one tensor named {TENSOR!r}, found "
                               f"{sorted(f.keys())}")
            shape = tuple(f.get_slice(TENSOR).get_shape())
            if shape != (length, d_model):
                raise CpmError(f"{path}: the prompt is {list(shape)}, prompt.json says "
                               f"[{length}, {d_model}]")
            table = f.get_tensor(TENSOR)
    except (SafetensorError, OSError) as exc:
        raise CpmError(f"{path}: unreadable ({exc})") from None
    if not table.is_floating_point() or not bool(torch.isfinite(table).all()):
        raise CpmError(f"{path}: the prompt holds non-finite or non-float values")
    return table.float()


def load_prompt(path: str | Path, model_digest: str | None,
                option: str = "--prompt") -> LoadedPrompt:
    """The prompt artifact at `path`, refused when it was tuned on a model other than the one
    whose digest is `model_digest` (None skips the check: inspecting, converting)."""
    artifact = open_artifact(path, expect="prompt", option=option)
    info, layout = read_prompt_json(artifact.path)
    if model_digest is not None and info["base_model"]["digest"] != model_digest:
        raise CpmError(f"{artifact.path} was tuned on the model with digest "
                       f"{info['base_model']['digest']}, not on this --model "
                       f"({model_digest}); a prompt only works with its own base model")
    prompt = LoadedPrompt(layout, info["d_model"], info, artifact.path)
    with torch.no_grad():
        prompt.table.copy_(read_prompt_table(artifact.path / PROMPT_TENSORS, layout.length,
                                             info["d_model"]))
    prompt.requires_grad_(False)
    return prompt


def check_fits_model(prompt: SoftPrompt, cfg, where: str) -> None:
    """The table's width must be the model's d_model."""
    if prompt.table.shape[1] != cfg.d_model:
        raise CpmError(f"{where}: the prompt is {prompt.table.shape[1]} wide, the model's "
                       f"d_model is {cfg.d_model}")


def artifact_kib(path: Path) -> float:
    """The prompt's files in KiB (what `cpmctl data inspect` would total)."""
    return math.fsum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()) / 1024
