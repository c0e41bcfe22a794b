"""Checkpoints of a tune-prompt run: what is trained, its optimizer state, the trainer state.

    OUT.partial/.checkpoints/step-00000040/   (scratch of the resumable output, ArtifactWriter)
        prompt.safetensors      the prompt table ("prompt")
        model.safetensors       stage 2 only: the whole model (model.json beside it)
        optimizer/              the optimizer's state (cpmctl.train.checkpoint's layout)
        trainer_state.json      step, best accuracy, evaluations since, RNG states; written
                                last: a folder without it never finished
    OUT.partial/.checkpoints/latest   the newest finished folder's name
    OUT.partial/.best/                the state of the best validation so far (the prompt;
                                      stage 2: the model too), what the output is made of

Stage 1 checkpoints hold the prompt only: the backbone is frozen and its weights are the base
model's, so nothing of it is written (a test asserts it). Never pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import read_json_object
from ..errors import CpmError
from ..models.artifact import MODEL_JSON, load_weights, read_model_json, write_model_files
from ..train.checkpoint import read_optimizer, step_dir_name, write_optimizer

#: A model's weights as they are written: (state dict, ModelConfig). A model's own
#: `state_dict()` under the torch engine; the gathered fp32 masters under DeepSpeed.
Weights = tuple[dict, object]

CHECKPOINTS = ".checkpoints"
BEST = ".best"
LATEST = "latest"
PROMPT_FILE = "prompt.safetensors"
STATE_FILE = "trainer_state.json"


def _write_state(folder: Path, prompt: torch.Tensor | None, model: Weights | None) -> None:
    if prompt is not None:
        save_file({"prompt": prompt.detach().float().cpu().contiguous()},
                  str(folder / PROMPT_FILE), metadata={"format": "pt"})
    if model is not None:
        write_model_files(folder, *model)


def _read_state(folder: Path, prompt: torch.Tensor | None, model: nn.Module | None) -> None:
    if prompt is not None:
        try:
            table = load_file(str(folder / PROMPT_FILE)).get("prompt")
        except (SafetensorError, OSError) as exc:
            raise CpmError(f"{folder / PROMPT_FILE}: unreadable ({exc})") from None
        if table is None or table.shape != prompt.shape:
            raise CpmError(f"{folder}: its prompt does not fit this run")
        with torch.no_grad():
            prompt.copy_(table)
    if model is not None:
        if not (folder / MODEL_JSON).is_file():
            raise CpmError(f"{folder}: no model weights to resume stage 2 from")
        _, tied = read_model_json(folder)
        load_weights(folder, model, tied)


def save_best(folder: Path, *, prompt: torch.Tensor | None, model: Weights | None) -> None:
    """Keep the current state as the best one (replacing the previous best atomically)."""
    building = folder / f".{BEST}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    _write_state(building, prompt, model)
    shutil.rmtree(folder / BEST, ignore_errors=True)
    os.rename(building, folder / BEST)


def load_best(folder: Path, *, prompt: torch.Tensor | None, model: nn.Module | None) -> bool:
    """Load the best state kept by `save_best`, if any; True when there was one."""
    if not (folder / BEST).is_dir():
        return False
    _read_state(folder / BEST, prompt, model)
    return True


def save(folder: Path, step: int, *, prompt: torch.Tensor | None, model: Weights | None,
         optimizer: dict, state: dict) -> Path:
    """Write checkpoint `step` (`optimizer`: a torch optimizer state dict) under
    `folder/.checkpoints/`, point `latest` at it and remove the older ones."""
    root = folder / CHECKPOINTS
    root.mkdir(exist_ok=True)
    name = step_dir_name(step)
    building = root / f".{name}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    _write_state(building, prompt, model)
    write_optimizer(building, optimizer)
    (building / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    shutil.rmtree(root / name, ignore_errors=True)
    os.rename(building, root / name)
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST)
    for old in root.iterdir():
        if old.name not in (name, LATEST) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest(folder: Path) -> Path | None:
    """The newest finished checkpoint under `folder/.checkpoints`, or None."""
    pointer = folder / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    found = folder / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return found if (found / STATE_FILE).is_file() else None


def load(checkpoint: Path, *, prompt: torch.Tensor | None, model: nn.Module | None,
         optimizer) -> dict:
    """Restore a checkpoint into the prompt table, the model (stage 2) and the optimizer;
    returns the trainer state. `optimizer`: a torch optimizer, or a function given the saved
    state dict (DeepSpeed writes it into its partitions)."""
    _read_state(checkpoint, prompt, model)
    load_optimizer = getattr(optimizer, "load_state_dict", optimizer)
    try:
        load_optimizer(read_optimizer(checkpoint))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CpmError(f"{checkpoint}: its optimizer state does not fit this run ({exc})") \
            from None
    return read_json_object(checkpoint / STATE_FILE)
