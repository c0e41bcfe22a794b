"""Field help: each field's docstring, parsed from the dataclass source (the comments of a
run's recipe.toml, dump.py), and every leaf field of a recipe with its type and default (the
did-you-mean of a key outside any section, load.py)."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from cpmctl.errors import CpmError
from cpmctl.recipe.origin import did_you_mean
from cpmctl.recipe.schema import Recipe


@functools.cache
def field_docstrings(cls: type) -> dict[str, str]:
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
def field_types(cls: type) -> dict[str, Any]:
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
                           f"{did_you_mean(name, names, walked)}")
        hint = field_types(cls)[name]
        doc = field_docstrings(cls).get(name, "")
        walked.append(name)
        if is_dataclass(hint):
            cls, doc = hint, doc or _class_doc(hint)
        else:
            cls = None
    return doc


def recipe_fields() -> Iterator[tuple[str, str, Any, str]]:
    """Every leaf field of a recipe as (dotted key, type name, default, help), in file order."""

    def walk(cls: type, prefix: str, instance: Any) -> Iterator[tuple[str, str, Any, str]]:
        docs = field_docstrings(cls)
        for f in fields(cls):
            hint = field_types(cls)[f.name]
            value = getattr(instance, f.name)
            if is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.", value)
            else:
                yield f"{prefix}{f.name}", hint.__name__, value, docs.get(f.name, "")

    return walk(Recipe, "", Recipe())

