"""Regenerate the committed shell-completion scripts in completions/ from the CLI.

Run it after changing any command or option: python scripts/update_completions.py
(tests/test_completion.py fails while the files are stale).
"""

from __future__ import annotations

from pathlib import Path

import typer

from cpmctl.cli import app
from cpmctl.cli.completion import FILE_NAMES, render


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "completions"
    folder.mkdir(exist_ok=True)
    root = typer.main.get_command(app)
    for shell, name in FILE_NAMES.items():
        (folder / name).write_text(render(shell, root), encoding="utf-8")
        print(folder / name)


if __name__ == "__main__":
    main()
