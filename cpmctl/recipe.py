"""Recipes: a TOML file <-> one typed dataclass tree (ARCHITECTURE §6).

A recipe is the written form of `Recipe`. Every field has a default and a docstring (the string
literal right after it), which `field_help` returns as the field's `--help` text. Values come
from three places, the later winning:

    defaults (this module)  <  the recipe file  <  --set section.key=value (command line)

    recipe = load_recipe("recipes/tiny-gpt.toml", ["train.lr=3e-4", "model.moe.experts=4"])
    model = build_model(recipe.model)  # each component gets its own section only

Loading is strict: an unknown section or key (with a did-you-mean), a value of the wrong type,
a value outside its range or two settings that contradict each other is a `CpmError` whose
one-line message names the file (or `--set`) and the key. `dump_recipe` writes the fully
resolved tree back as TOML; loading that text gives an equal `Recipe`, and `recipe_digest`
hashes it, so a run records exactly what it trained with.

Paths in a recipe (dataset, output, init model, teacher) are used as written: a relative path
is relative to the working directory the command runs in, not to the recipe file.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import inspect
import math
import re
import textwrap
import tomllib
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from cpmctl.errors import CpmError
from cpmctl.models.config import ARCHS, ROUTERS, ModelConfig, MoeConfig

SCHEDULES = ("cosine", "linear", "noam", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
ENGINES = ("torch", "deepspeed")


@dataclass
class RunConfig:
    """What the run is called, where it writes, and its seed."""

    name: str = "run"
    """Name of the run; a plain name, no '/' (it names the output folder by default)."""
    output: str = ""
    """Folder of the run artifact (checkpoints, metrics, final model); empty means runs/<name>."""
    seed: int = 1234
    """Seed of the initialisation, the data order and dropout (Megatron's default, kept by the
    CPM scripts)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name


@dataclass
class DataConfig:
    """The training data: a dataset artifact cut into fixed-length samples."""

    dataset: str = ""
    """Path of the dataset artifact (`cpmctl data tokenize` output) to train on."""
    train_split: str = "train"
    """Split of the dataset to train on."""
    eval_split: str = "valid"
    """Split to evaluate on every train.eval_every steps; empty disables evaluation."""
    seq_len: int = 1024
    """Tokens per sample: the context length (gpt), or the encoder input length after span
    corruption (encdec). CPM-1: 1,024; CPM-2: 512."""
    decoder_seq_len: int = 0
    """encdec: decoder (target) length; 0 means derived: the length span corruption of a
    seq_len input produces (T5's rule). CPM-2: 256."""
    noise_density: float = 0.15
    """encdec: fraction of the raw tokens masked by span corruption (T5 and CPM-2: 0.15)."""
    mean_span: float = 3.0
    """encdec: mean length of a masked span, in tokens (T5 and CPM-2: 3)."""

    def span_lengths(self) -> tuple[int, int]:
        """encdec: (raw tokens cut per sample, decoder length) for span corruption."""
        raw, targets = span_corruption_lengths(self.seq_len, self.noise_density, self.mean_span)
        return raw, self.decoder_seq_len or targets


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, AdamW, learning-rate schedule, precision, logging."""

    steps: int = 1000
    """Optimizer steps to train for."""
    global_batch: int = 0
    """Samples per optimizer step, over all processes and accumulation micro-steps. 0 means
    derived from global_batch_tokens, or micro_batch × processes when that is 0 too."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step (a multiple of data.seq_len); the alternative to global_batch,
    0 when unused."""
    micro_batch: int = 8
    """Samples per process per forward/backward pass; the rest of the global batch is gradient
    accumulation."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of warmup."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: 'cosine' or 'linear' decay to lr × min_lr_ratio at
    the last step, 'noam' (lr × sqrt(warmup / step), the peak-normalised inverse square root)
    or 'constant'. Warmup is linear from 0 in every case."""
    warmup_steps: int = 0
    """Steps of linear warmup; set this or warmup_ratio, not both (0: unused)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of train.steps; set this or warmup_steps, not both (0: unused)."""
    min_lr_ratio: float = 0.1
    """cosine and linear: the final learning rate as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices only, not to biases and norm scales, as
    in Megatron (CPM-1 and CPM-2: 0.01)."""
    beta1: float = 0.9
    """Adam beta1 (CPM-1 and CPM-2: 0.9)."""
    beta2: float = 0.999
    """Adam beta2 (CPM-1 and CPM-2: 0.999)."""
    eps: float = 1e-8
    """Adam epsilon (CPM-1 and CPM-2: 1e-8)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (CPM: 1.0)."""
    precision: str = "fp32"
    """'fp32', 'bf16' (mixed, fp32 master weights) or 'fp16' (mixed with dynamic loss scaling;
    needs CUDA, which the trainer checks)."""
    eval_every: int = 1000
    """Evaluate on data.eval_split every this many steps; 0 disables evaluation."""
    eval_steps: int = 10
    """Batches of global_batch samples per evaluation."""
    log_every: int = 10
    """Write a metrics line (loss, lr, tokens/s) every this many steps."""

    @property
    def warmup(self) -> int:
        """Warmup in steps, whichever of warmup_steps and warmup_ratio is set."""
        return self.warmup_steps or int(round(self.warmup_ratio * self.steps))

    def batch_samples(self, seq_len: int, world_size: int = 1) -> int:
        """Samples per optimizer step for this sequence length and number of processes."""
        if self.global_batch:
            return self.global_batch
        if self.global_batch_tokens:
            return self.global_batch_tokens // seq_len
        return self.micro_batch * world_size

    def accumulation(self, seq_len: int, world_size: int = 1) -> int:
        """Micro-steps per optimizer step; a `CpmError` when the batch does not divide."""
        samples = self.batch_samples(seq_len, world_size)
        per_pass = self.micro_batch * world_size
        if samples % per_pass:
            raise CpmError(f"train.global_batch {samples} is not a multiple of train.micro_batch "
                           f"{self.micro_batch} × {world_size} processes")
        return samples // per_pass


@dataclass
class EngineConfig:
    """How the training step is executed: plain PyTorch (DDP) or DeepSpeed."""

    name: str = "torch"
    """'torch' (one process or DDP under torchrun) or 'deepspeed' (ZeRO, offload; multi-node)."""
    zero_stage: int = 0
    """deepspeed: ZeRO stage 0-3 (1 partitions optimizer state, 2 also gradients, 3 also
    parameters); bf16 needs stage >= 1."""
    offload_optimizer: bool = False
    """deepspeed, zero_stage >= 1: keep the optimizer state and step in host memory."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~1/3 more compute."""
    compile: bool = False
    """torch engine: run the model through torch.compile (the first steps compile; needs a C++
    compiler on CPU)."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every: int = 1000
    """Write a checkpoint every this many steps; 0 writes only the final one."""
    keep: int = 3
    """Keep the newest this many step checkpoints; 0 keeps all."""


@dataclass
class InitConfig:
    """Where the weights start."""

    model: str = ""
    """Model artifact to warm-start from (e.g. a `cpmctl grow` output); empty means random
    initialisation."""


@dataclass
class InheritConfig:
    """Knowledge inheritance (ARCHITECTURE §7): distil from a frozen teacher while training."""

    teacher: str = ""
    """Model artifact of the teacher; empty disables knowledge inheritance."""
    alpha: float = 1.0
    """Starting weight of the distillation loss: loss = (1 - a)·LM + a·T²·KL, a decaying
    linearly from alpha to 0 (the KI paper: 1)."""
    decay_steps: int = 0
    """Steps over which alpha decays to 0; 0 means train.steps (the KI paper: 55k of 125k)."""
    temperature: float = 2.0
    """Softmax temperature T of teacher and student in the KL term (the KI paper: 2)."""


@dataclass
class Recipe:
    """A training recipe: one section per component."""

    run: RunConfig = field(default_factory=RunConfig)
    """[run]: name, output folder, seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """[model]: architecture and sizes, with [model.moe]."""
    data: DataConfig = field(default_factory=DataConfig)
    """[data]: dataset and sequence lengths."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """[train]: steps, batch, optimizer, schedule, precision, logging."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """[engine]: torch or deepspeed and their memory options."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """[checkpoint]: how often to save, how many to keep."""
    init: InitConfig = field(default_factory=InitConfig)
    """[init]: warm-start weights."""
    inherit: InheritConfig = field(default_factory=InheritConfig)
    """[inherit]: knowledge-inheritance teacher."""


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_span: float) -> tuple[int, int]:
    """(raw tokens, target length) such that span corruption of the raw tokens gives an encoder
    input of at most `inputs_length`: T5's rule, where the input keeps the unmasked tokens plus
    one sentinel per span and the target holds the masked tokens plus one sentinel per span,
    each with one closing token."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise = min(max(int(round(tokens * noise_density)), 1), tokens - 1)
        spans = max(int(round(noise / mean_span)), 1)
        return tokens - noise + spans + 1, noise + spans + 1

    # NOTE: T5 scans upwards from inputs_length - 1 one token at a time, which is slow for dense
    # noise. The input length never falls as tokens grow (each extra token adds at most one
    # noise token), so a binary search finds the same answer. inputs_length - 1 always fits.
    fits, over = max(inputs_length - 1, 2), inputs_length
    while lengths(over)[0] <= inputs_length:
        fits, over = over, over * 2
    while over - fits > 1:
        middle = (fits + over) // 2
        if lengths(middle)[0] <= inputs_length:
            fits = middle
        else:
            over = middle
    return fits, lengths(fits)[1]


# ---------------------------------------------------------------- field help


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, parsed from its source: {field: text}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): help is empty, loading still works
        return {}
    classdef = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    body = getattr(classdef, "body", [])
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _class_doc(cls: type) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split())


def field_help(section: str, key: str | None = None) -> str:
    """The docstring of `section.key` (e.g. ("train", "lr"), ("model", "moe.experts") or
    ("model.moe", "experts")) as one line; of the section itself when key is None."""
    path = section if key is None else f"{section}.{key}"
    cls: Any = Recipe  # None once a leaf is reached: nothing lies below it
    doc = ""
    walked: list[str] = []
    for name in path.split("."):
        names = [f.name for f in fields(cls)] if cls is not None else []
        if name not in names:
            raise CpmError(f"unknown key {'.'.join([*walked, name])}"
                           f"{_suggest(name, names, walked)}")
        hint = _hints(cls)[name]
        doc = _docstrings(cls).get(name, "")
        walked.append(name)
        if is_dataclass(hint):
            cls, doc = hint, doc or _class_doc(hint)
        else:
            cls = None
    return doc


def recipe_fields() -> Iterator[tuple[str, str, Any, str]]:
    """Every leaf field of a recipe as (dotted key, type name, default, help), in file order."""

    def walk(cls: type, prefix: str, instance: Any) -> Iterator[tuple[str, str, Any, str]]:
        docs = _docstrings(cls)
        for f in fields(cls):
            hint = _hints(cls)[f.name]
            value = getattr(instance, f.name)
            if is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.", value)
            else:
                yield f"{prefix}{f.name}", hint.__name__, value, docs.get(f.name, "")

    return walk(Recipe, "", Recipe())


# ---------------------------------------------------------------- loading


def _suggest(name: str, candidates: Iterable[str], prefix: list[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*prefix, close[0]])}?)" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array {value!r}"
    return str(value)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class _Origin:
    """Says where a key's value came from: the file (or defaults) or a --set override."""

    def __init__(self, label: str, data: dict, overridden: list[str]):
        self.label, self.data, self.overridden = label, data, overridden

    def _in_file(self, key: str) -> bool:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def _from_set(self, key: str) -> bool:
        for o in self.overridden:
            if key == o or key.startswith(o + "."):
                return True
            if o.startswith(key + ".") and not self._in_file(key):
                return True
        return False

    def error(self, message: str, *keys: str) -> CpmError:
        from_set = [k for k in keys if self._from_set(k)]
        if not from_set:
            where = self.label
        elif len(from_set) == len(keys):
            where = "--set"
        else:
            where = f"{self.label} and --set"
        return CpmError(f"{where}: {message}")


def _build(cls: type, table: Any, path: list[str], origin: _Origin) -> Any:
    """An instance of dataclass `cls` from a TOML table, checking keys and types."""
    dotted = ".".join(path)
    if not isinstance(table, dict):
        raise origin.error(f"{dotted} must be a table ([{dotted}]), not {_show(table)}", dotted)
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    for key in table:
        if key not in names:
            full = ".".join([*path, key])
            if path:
                raise origin.error(f"unknown key {full}{_suggest(key, names, path)}", full)
            if isinstance(table[key], dict):
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                raise origin.error(f"unknown section [{key}]{hint}", key)
            # a key outside any section: suggest the section it probably belongs to
            leaves: dict[str, str] = {}
            for leaf_key, *_ in recipe_fields():
                leaves.setdefault(leaf_key.rsplit(".", 1)[-1], leaf_key)
            close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
            hint = (f"did you mean {leaves[close[0]]}?" if close
                    else "keys belong in a section such as [train]")
            raise origin.error(f"unknown key {key} ({hint})", key)
    values = {}
    for f in fields(cls):
        if f.name not in table:
            continue
        hint, value, key = hints[f.name], table[f.name], ".".join([*path, f.name])
        if is_dataclass(hint):
            values[f.name] = _build(hint, value, [*path, f.name], origin)
        else:
            values[f.name] = _convert(hint, value, key, origin)
    return cls(**values)


def _convert(kind: type, value: Any, key: str, origin: _Origin) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise origin.error(f"{key} must be {_TYPE_NAMES[kind]}, not {_show(value)}", key)
    return value


def _parse_value(raw: str) -> Any:
    """A --set value: a TOML value when it parses as one, else the text itself."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["v"] if list(parsed) == ["v"] else raw


def _field_kind(path: list[str]) -> type | None:
    """The type of the leaf field at `path`, or None when there is no such field."""
    cls: Any = Recipe
    for name in path:
        if not is_dataclass(cls) or name not in _hints(cls):
            return None
        cls = _hints(cls)[name]
    return None if is_dataclass(cls) else cls


_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _apply_overrides(data: dict, overrides: Iterable[str], label: str) -> list[str]:
    """Apply `section.key=value` overrides to `data` in place; returns the keys they set."""
    keys = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not _KEY.fullmatch(key):
            raise CpmError(f"--set {item}: expected section.key=value (e.g. train.lr=3e-4)")
        path = key.split(".")
        value = _parse_value(raw)
        if _field_kind(path) is str and not isinstance(value, str):
            value = raw  # NOTE: `--set run.name=2024` names the run "2024", not an error
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[:depth + 1])
                raise CpmError(f"{label}: {prefix} must be a table ([{prefix}]), "
                               f"not {_show(child)}")
            node = child
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            _merge(node[path[-1]], value)
        else:
            node[path[-1]] = value
        keys.append(key)
    return keys


def recipe_from_dict(data: dict, source: str = "<recipe>",
                     overrides: Iterable[str] = ()) -> Recipe:
    """Build and validate a `Recipe` from parsed TOML `data` (not modified) plus overrides;
    `source` names the file in error messages."""
    original = _copy(data)
    merged = _copy(data)
    overridden = _apply_overrides(merged, overrides, source)
    origin = _Origin(source, original, overridden)
    recipe = _build(Recipe, merged, [], origin)
    _validate(recipe, origin)
    return recipe


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_copy(v) for v in data]
    return data


def _toml_error(path: str, text: str, exc: Exception) -> CpmError:
    message = " ".join(str(exc).split())
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if found:
        line, detail = int(found[1]), f"{message[:found.start()]} (column {found[2]})"
    else:
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        detail = re.sub(r"\s*\(at end of document\)$", " (at the end of the file)", message)
    detail = detail[:1].lower() + detail[1:]
    return CpmError(f"{path}: line {max(line, 1)}: {detail}")


#: The recipes shipped with cpmctl; `--recipe tiny-gpt` names one of them.
SHIPPED = Path(__file__).resolve().parent / "recipes"


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file, or the name of a shipped one ("tiny-gpt") when no such file exists."""
    file = Path(path)
    shipped = SHIPPED / f"{path}.toml"
    if not file.exists() and file.parent == Path(".") and shipped.is_file():
        return shipped
    return file


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe file (or a shipped recipe by name), apply `--set` overrides
    (`section.key=value`), build and validate."""
    label = str(path)
    file = resolve_recipe(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        folder = file.parent if file.parent != Path(".") else SHIPPED
        siblings = {p.stem: p for p in folder.glob("*.toml")} if folder.is_dir() else {}
        close = difflib.get_close_matches(file.stem, list(siblings), n=1, cutoff=0.75)
        hint = f" (did you mean {siblings[close[0]]}?)" if close else ""
        raise CpmError(f"{label}: no such recipe{hint}") from None
    except IsADirectoryError:
        raise CpmError(f"{label}: is a directory, not a recipe file") from None
    except OSError as exc:
        raise CpmError(f"{label}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise CpmError(f"{label}: line {line}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(label, text, exc) from None
    return recipe_from_dict(data, label, overrides)


# ---------------------------------------------------------------- validation


def _validate(r: Recipe, origin: _Origin) -> None:
    """Ranges, enumerations and contradictions; raises the first problem found."""

    def fail(message: str, key: str, *more: str) -> typing.NoReturn:
        raise origin.error(message, key, *more)

    def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            fail(f"{key} must be one of {', '.join(choices)}, not {value!r}{hint}", key)

    def at_least(key: str, value: float, low: float) -> None:
        if not value >= low:
            fail(f"{key} must be at least {low}, not {_show(value)}", key)

    def within(key: str, value: float, low: float, high: float, *, high_open=True,
               low_open=False) -> None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            fail(f"{key} must be in {span}, not {_show(value)}", key)

    run, m, moe, d, t, e = r.run, r.model, r.model.moe, r.data, r.train, r.engine

    # [run]
    if not run.name or "/" in run.name or "\\" in run.name or run.name in (".", ".."):
        fail(f"run.name must be a plain name (not empty, no '/'), not {run.name!r}", "run.name")

    # [model]
    one_of("model.arch", m.arch, ARCHS)
    for key in ("vocab_size", "d_model", "n_heads", "n_layers", "max_positions",
                "relative_buckets", "relative_max_distance"):
        at_least(f"model.{key}", getattr(m, key), 1)
    for key in ("d_head", "d_ff", "n_decoder_layers"):
        at_least(f"model.{key}", getattr(m, key), 0)
    if not m.d_head and m.d_model % m.n_heads:
        fail(f"model.d_model {m.d_model} is not divisible by model.n_heads {m.n_heads} "
             "(set model.d_head)", "model.d_model", "model.n_heads")
    if m.arch == "gpt" and m.n_decoder_layers:
        fail("model.n_decoder_layers applies to encdec models only (arch is gpt)",
             "model.n_decoder_layers", "model.arch")
    within("model.dropout", m.dropout, 0.0, 1.0)
    at_least("model.layer_norm_eps", m.layer_norm_eps, 0.0)
    within("model.init_std", m.init_std, 0.0, math.inf, low_open=True)
    at_least("model.moe.experts", moe.experts, 0)
    one_of("model.moe.router", moe.router, ROUTERS)
    at_least("model.moe.top_k", moe.top_k, 1)
    if moe.router == "base" and moe.top_k != 1:
        fail("model.moe.top_k must be 1 with the base router (BASE layers route each token "
             f"to one expert), not {moe.top_k}", "model.moe.top_k", "model.moe.router")
    if moe.experts and moe.top_k > moe.experts:
        fail(f"model.moe.top_k {moe.top_k} is more than model.moe.experts {moe.experts}",
             "model.moe.top_k", "model.moe.experts")
    within("model.moe.capacity_factor", moe.capacity_factor, 0.0, math.inf, low_open=True)
    at_least("model.moe.aux_loss_weight", moe.aux_loss_weight, 0.0)

    # [data]
    at_least("data.seq_len", d.seq_len, 3 if m.arch == "encdec" else 1)
    at_least("data.decoder_seq_len", d.decoder_seq_len, 0)
    if not d.train_split:
        fail("data.train_split must not be empty", "data.train_split")
    if m.arch == "gpt":
        if d.seq_len > m.max_positions:
            fail(f"data.seq_len {d.seq_len} is longer than model.max_positions "
                 f"{m.max_positions}", "data.seq_len", "model.max_positions")
        if d.decoder_seq_len:
            fail("data.decoder_seq_len applies to encdec models only (arch is gpt)",
                 "data.decoder_seq_len", "model.arch")
    else:
        within("data.noise_density", d.noise_density, 0.0, 1.0, low_open=True)
        within("data.mean_span", d.mean_span, 1.0, d.seq_len, high_open=False)
        _, targets = span_corruption_lengths(d.seq_len, d.noise_density, d.mean_span)
        if d.decoder_seq_len and d.decoder_seq_len < targets:
            fail(f"data.decoder_seq_len {d.decoder_seq_len} is shorter than the {targets} "
                 f"target tokens span corruption makes of data.seq_len {d.seq_len} "
                 "(set 0 to derive it)", "data.decoder_seq_len", "data.seq_len")

    # [train]
    at_least("train.steps", t.steps, 1)
    at_least("train.micro_batch", t.micro_batch, 1)
    at_least("train.global_batch", t.global_batch, 0)
    at_least("train.global_batch_tokens", t.global_batch_tokens, 0)
    if t.global_batch and t.global_batch_tokens:
        fail("train.global_batch and train.global_batch_tokens are both set; set one",
             "train.global_batch", "train.global_batch_tokens")
    if t.global_batch_tokens:
        if t.global_batch_tokens % d.seq_len:
            fail(f"train.global_batch_tokens {t.global_batch_tokens} is not a multiple of "
                 f"data.seq_len {d.seq_len}", "train.global_batch_tokens", "data.seq_len")
        samples = t.global_batch_tokens // d.seq_len
        if samples % t.micro_batch:
            fail(f"train.global_batch_tokens {t.global_batch_tokens} ({samples} samples) is not "
                 f"a multiple of train.micro_batch {t.micro_batch} samples",
                 "train.global_batch_tokens", "train.micro_batch")
    if t.global_batch % t.micro_batch:
        fail(f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch "
             f"{t.micro_batch}", "train.global_batch", "train.micro_batch")
    within("train.lr", t.lr, 0.0, math.inf, low_open=True)
    one_of("train.schedule", t.schedule, SCHEDULES)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    within("train.warmup_ratio", t.warmup_ratio, 0.0, 1.0)
    if t.warmup_steps and t.warmup_ratio:
        fail("train.warmup_steps and train.warmup_ratio are both set; set one",
             "train.warmup_steps", "train.warmup_ratio")
    if t.warmup_steps > t.steps:
        fail(f"train.warmup_steps {t.warmup_steps} is more than train.steps {t.steps}",
             "train.warmup_steps", "train.steps")
    if t.schedule == "noam" and not t.warmup:
        fail("train.schedule noam needs a warmup (set train.warmup_steps or "
             "train.warmup_ratio)", "train.schedule")
    within("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, high_open=False)
    at_least("train.weight_decay", t.weight_decay, 0.0)
    within("train.beta1", t.beta1, 0.0, 1.0)
    within("train.beta2", t.beta2, 0.0, 1.0)
    within("train.eps", t.eps, 0.0, math.inf, low_open=True)
    at_least("train.grad_clip", t.grad_clip, 0.0)
    one_of("train.precision", t.precision, PRECISIONS)
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.eval_steps", t.eval_steps, 1)
    at_least("train.log_every", t.log_every, 1)

    # [engine]
    one_of("engine.name", e.name, ENGINES)
    within("engine.zero_stage", e.zero_stage, 0, 3, high_open=False)
    if e.name == "torch" and e.zero_stage:
        fail(f"engine.zero_stage {e.zero_stage} needs engine.name deepspeed (torch has no ZeRO)",
             "engine.zero_stage", "engine.name")
    if e.offload_optimizer and not (e.name == "deepspeed" and e.zero_stage >= 1):
        fail("engine.offload_optimizer needs engine.name deepspeed with engine.zero_stage >= 1",
             "engine.offload_optimizer", "engine.name", "engine.zero_stage")
    if e.name == "deepspeed" and e.compile:
        fail("engine.compile works with engine.name torch only", "engine.compile",
             "engine.name")
    if e.name == "deepspeed" and e.zero_stage == 0 and t.precision != "fp32":
        # NOTE: DeepSpeed's stage-0 mixed-precision optimizer accumulates gradients in half
        # precision and exposes no per-parameter view of its fp32 state to checkpoint.
        fail(f"engine.zero_stage 0 with train.precision {t.precision!r}: DeepSpeed trains "
             "half precision with ZeRO only; use engine.zero_stage >= 1 (or the torch engine)",
             "engine.zero_stage", "train.precision")

    # [checkpoint], [inherit]
    at_least("checkpoint.every", r.checkpoint.every, 0)
    at_least("checkpoint.keep", r.checkpoint.keep, 0)
    within("inherit.alpha", r.inherit.alpha, 0.0, 1.0, high_open=False)
    at_least("inherit.decay_steps", r.inherit.decay_steps, 0)
    within("inherit.temperature", r.inherit.temperature, 0.0, math.inf, low_open=True)


# ---------------------------------------------------------------- writing


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: 0.0001, 3e-05, inf, nan
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_recipe(recipe: Recipe, *, comments: bool = False) -> str:
    """The fully resolved recipe as TOML text, every field written; with `comments`, each
    field's help precedes it (the digest is of the text without them)."""
    lines = ["# cpmctl recipe, fully resolved"]

    def emit(obj: Any, name: str) -> None:
        cls = type(obj)
        lines.extend(["", f"[{name}]"])
        docs = _docstrings(cls)
        nested = []
        for f in fields(cls):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                nested.append(f.name)
                continue
            if comments and docs.get(f.name):
                lines.extend("# " + line for line in textwrap.wrap(docs[f.name], 98))
            lines.append(f"{f.name} = {_toml_value(value)}")
        for sub in nested:
            emit(getattr(obj, sub), f"{name}.{sub}")

    for section in fields(Recipe):
        emit(getattr(recipe, section.name), section.name)
    return "\n".join(lines) + "\n"


def recipe_digest(recipe: Recipe) -> str:
    """`sha256:...` of the resolved recipe's TOML text: equal recipes, equal digests."""
    return "sha256:" + hashlib.sha256(dump_recipe(recipe).encode("utf-8")).hexdigest()


__all__ = [
    "ENGINES", "PRECISIONS", "SCHEDULES", "CheckpointConfig", "DataConfig", "EngineConfig",
    "InheritConfig", "InitConfig", "ModelConfig", "MoeConfig", "Recipe", "RunConfig",
    "TrainConfig", "dump_recipe", "field_help", "load_recipe", "recipe_digest",
    "recipe_fields", "recipe_from_dict", "span_corruption_lengths",
]
