"""Writing a recipe back: the fully resolved tree as TOML text, and its digest."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import fields, is_dataclass
from typing import Any

from cpmctl.recipe.fields import field_docstrings
from cpmctl.recipe.schema import Recipe

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
        docs = field_docstrings(cls)
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

