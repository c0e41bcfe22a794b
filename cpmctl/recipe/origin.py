"""Where a recipe value came from (the file or `--set`), for one-line error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from cpmctl.errors import CpmError


def did_you_mean(name: str, candidates: Iterable[str], prefix: list[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*prefix, close[0]])}?)" if close else ""


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array {value!r}"
    return str(value)


class Origin:
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
