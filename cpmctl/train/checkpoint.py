"""Checkpoints of a run (docs/design.md §2 and §6), never pickled.

    RUN/checkpoints/step-00001000/      a checkpoint artifact:
        model.json, model.safetensors   the model's files (cpmctl.models.artifact)
        optimizer/state.safetensors     every tensor of optimizer.state_dict(), "{param}.{name}"
        optimizer/state.json            param_groups and the non-tensor state values
        trainer_state.json              the trainer's dict: step, consumed samples, world size,
                                        RNG states (rng_state()), ...
    RUN/checkpoints/latest              the newest folder's name (a hint for people and tools)

    save_checkpoint(run, step, model.state_dict(), cfg, optimizer.state_dict(), state, keep=2)
    path = find_resumable(run)          # newest checkpoint that opens and verifies clean
    state = load_checkpoint(path, model, optimizer)
    check_world_size(state, world_size, path)
    set_rng_state(state["rng"])

JSON cannot hold a tensor, so the optimizer's JSON writes {"__tensor__": KEY} where a tensor
was and the tensor lies in state.safetensors under KEY (the dotted path: "3.exp_avg").
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import MANIFEST, ArtifactWriter, open_artifact, read_json_object, verify
from ..console import warn
from ..errors import CpmError
from ..models.artifact import (
    MODEL_JSON,
    WEIGHTS,
    load_weights,
    read_model_json,
    write_model_files,
)
from ..models.config import ModelConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_TENSORS = "optimizer/state.safetensors"
OPTIMIZER_JSON = "optimizer/state.json"
TRAINER_STATE = "trainer_state.json"
REQUIRED = (MODEL_JSON, WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_JSON, TRAINER_STATE)
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------- RNG state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """The RNG states of torch (CPU, and every CUDA device when available), Python's `random`
    and numpy's legacy global generator, as JSON-safe data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured (missing parts are left as they are); state that is
    not what `rng_state()` writes is a CpmError."""
    try:
        _set_rng_state(state)
    except (TypeError, ValueError, RuntimeError, binascii.Error) as exc:
        raise CpmError(f"the checkpoint's RNG state is malformed ({exc})") from None


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            warn(f"the checkpoint holds RNG states for {len(saved)} CUDA device(s), this "
                 f"machine has {torch.cuda.device_count()}; restoring the first ones only")
        for index, s in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), index)


# --------------------------------------------------------------------------- optimizer state


def _encode(value, path: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON data; tensors go to `tensors` under their dotted path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)):
                raise TypeError(f"optimizer state key {key!r} at {path or 'top'} is not JSON-safe")
        return {str(k): _encode(v, f"{path}.{k}" if path else str(k), tensors)
                for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer state value at {path} has type {type(value).__name__}, "
                    "which a checkpoint cannot hold without pickle")


def _decode(value, tensors: dict[str, torch.Tensor], where: Path):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            key = value[_TENSOR]
            if key not in tensors:
                raise CpmError(f"{where}: tensor {key} is missing from {OPTIMIZER_TENSORS}")
            return tensors[key]
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors, where) for v in value[_TUPLE])
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    return value


def write_optimizer(folder: Path, sd: dict) -> None:
    """`optimizer/state.safetensors` + `optimizer/state.json` for an `optimizer.state_dict()`."""
    tensors: dict[str, torch.Tensor] = {}
    state = {str(index): _encode(values, str(index), tensors)
             for index, values in sd["state"].items()}
    groups = [_encode(group, f"param_groups.{i}", tensors)
              for i, group in enumerate(sd["param_groups"])]
    (folder / OPTIMIZER_DIR).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / OPTIMIZER_TENSORS), metadata={"format": "pt"})
    data = {"format": 1, "state": state, "param_groups": groups}
    (folder / OPTIMIZER_JSON).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def read_optimizer(folder: Path) -> dict:
    """The `optimizer.state_dict()` that `write_optimizer` wrote into `folder`."""
    try:
        data = json.loads((folder / OPTIMIZER_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CpmError(f"{folder}: unreadable optimizer state ({exc})") from None
    where = folder / OPTIMIZER_JSON
    try:
        state = {int(index): _decode(values, tensors, where)
                 for index, values in data["state"].items()}
        groups = [_decode(group, tensors, where) for group in data["param_groups"]]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CpmError(f"{where}: malformed optimizer state ({exc!r})") from None
    return {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------- checkpoints


def _write_latest(checkpoints: Path, name: str) -> None:
    tmp = checkpoints / f".{LATEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, checkpoints / LATEST)


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, newest first (hidden temporaries excluded)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def _remove(folder: Path) -> None:
    """Rename out of sight first, so no half-deleted folder stays under a checkpoint name."""
    trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    cfg: ModelConfig, optimizer_state: dict, trainer_state: dict,
                    keep: int) -> Path:
    """Write `run_dir/checkpoints/step-NNNNNNNN/` atomically from a model's `state_dict()`
    and an optimizer's, point `latest` at it and delete all but the newest `keep` checkpoints
    (keep < 1 keeps them all). Returns the folder."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    name = step_dir_name(step)
    state_json = json.dumps(trainer_state, indent=2) + "\n"  # fails early if not JSON-safe
    meta = {"step": step}
    if trainer_state.get("loss") is not None:
        meta["loss"] = trainer_state["loss"]
    if (checkpoints / name).exists():  # a damaged one a resume skipped: ours, in our run
        _remove(checkpoints / name)
    with ArtifactWriter(checkpoints / name, "checkpoint") as writer:
        write_model_files(writer.dir, weights, cfg)
        write_optimizer(writer.dir, optimizer_state)
        (writer.dir / TRAINER_STATE).write_text(state_json, encoding="utf-8")
        out = writer.commit(meta=meta)
    _write_latest(checkpoints, name)
    if keep >= 1:
        others = [folder for _, folder in _step_dirs(checkpoints) if folder.name != name]
        for folder in others[keep - 1:]:
            _remove(folder)
    return out


def _problems(folder: Path) -> list[str]:
    """What is wrong with checkpoint `folder` (empty: it can be resumed from)."""
    try:
        artifact = open_artifact(folder, expect="checkpoint", option="resuming")
    except CpmError as exc:
        return [str(exc)]
    problems = [f"{name}: not in the manifest" for name in REQUIRED
                if name not in artifact.files]
    problems += verify(artifact)
    if not problems:  # the files are the ones written: are they what a resume reads?
        for read in (read_trainer_state, read_model_json):
            try:
                read(folder)
            except CpmError as exc:
                problems.append(str(exc))
    return problems


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of the run that opens and re-hashes clean, or None. Damaged
    newer ones are reported with a warning and skipped; folders without a manifest (never
    finished) are ignored."""
    for _, folder in _step_dirs(Path(run_dir) / CHECKPOINTS):
        if not (folder / MANIFEST).is_file():
            continue
        problems = _problems(folder)
        if not problems:
            return folder
        warn(f"checkpoint {folder} is damaged ({'; '.join(problems[:3])}); "
             "trying an older one")
    return None


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a checkpoint's weights into `model` and its state into `optimizer` (None: skip);
    returns the trainer state it was saved with."""
    artifact = open_artifact(path, expect="checkpoint", option="resuming")
    folder = artifact.path
    _, tied = read_model_json(folder)
    load_weights(folder, model, tied)
    if optimizer is not None:
        sd = read_optimizer(folder)
        if len(sd["param_groups"]) != len(optimizer.param_groups):
            raise CpmError(f"{folder}: the optimizer has {len(optimizer.param_groups)} "
                           f"parameter group(s), the checkpoint {len(sd['param_groups'])}")
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CpmError(f"{folder / OPTIMIZER_JSON}: does not fit this optimizer "
                           f"({exc})") from None
    return read_trainer_state(folder)


#: trainer_state.json's fields and their JSON types (checked where present).
_STATE_FIELDS = {"step": int, "consumed_samples": int, "world_size": int, "rng": dict,
                 "rng_by_rank": list, "engine_state": dict}
#: What the trainer's resume cannot do without.
RESUME_FIELDS = ("step", "consumed_samples")


def read_trainer_state(folder: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's trainer_state.json, its known fields type-checked and `required` ones
    present (a CpmError names the bad one)."""
    path = Path(folder) / TRAINER_STATE
    state = read_json_object(path)
    for key in required:
        if key not in state:
            raise CpmError(f"{path}: {key} is missing")
    for key, kind in _STATE_FIELDS.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            wanted = {int: "a non-negative integer", dict: "a JSON object",
                      list: "a JSON array"}[kind]
            raise CpmError(f"{path}: {key} must be {wanted}, got {value!r}")
    return state


def check_world_size(trainer_state: dict, world_size: int,
                     path: str | Path | None = None) -> None:
    """Refuse to resume with a different number of processes than wrote the checkpoint."""
    saved = trainer_state.get("world_size")
    if saved is None or int(saved) == world_size:
        return
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    raise CpmError(
        f"{where} was written by {saved} processes; resuming with {world_size} is not "
        f"supported: the data position and optimizer state are laid out per process. Resume "
        f"with {saved} processes, or start a new run warm-started from it ([init])"
    )
