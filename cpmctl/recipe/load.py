"""Reading a recipe: TOML file (or shipped name) + `--set` overrides -> a validated `Recipe`,
strictly: unknown keys (with a did-you-mean), wrong types and bad TOML are one-line errors."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from cpmctl.errors import CpmError
from cpmctl.recipe.fields import field_types, recipe_fields
from cpmctl.recipe.origin import Origin, did_you_mean, show_value
from cpmctl.recipe.schema import Recipe
from cpmctl.recipe.validate import validate

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _build(cls: type, table: Any, path: list[str], origin: Origin) -> Any:
    """An instance of dataclass `cls` from a TOML table, checking keys and types."""
    dotted = ".".join(path)
    if not isinstance(table, dict):
        raise origin.error(f"{dotted} must be a table ([{dotted}]), not {show_value(table)}",
                           dotted)
    hints = field_types(cls)
    names = [f.name for f in fields(cls)]
    for key in table:
        if key not in names:
            full = ".".join([*path, key])
            if path:
                raise origin.error(f"unknown key {full}{did_you_mean(key, names, path)}", full)
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


def _convert(kind: type, value: Any, key: str, origin: Origin) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise origin.error(f"{key} must be {_TYPE_NAMES[kind]}, not {show_value(value)}", key)
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
        if not is_dataclass(cls) or name not in field_types(cls):
            return None
        cls = field_types(cls)[name]
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
                               f"not {show_value(child)}")
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
    origin = Origin(source, original, overridden)
    recipe = _build(Recipe, merged, [], origin)
    validate(recipe, origin)
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
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


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

