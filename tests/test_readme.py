"""The README's promises: a two-command quick start that CI runs, and working examples."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import run_subprocess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_second():
    quick_start = README.split("## Quick start", 1)[1]
    commands = code_blocks(quick_start)[0].strip().splitlines()
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup\n\t\$\(BIN\)/cpmctl quickstart$", makefile, re.M)
    assert re.search(r"^test: setup\n\t\$\(BIN\)/python -m pytest$", makefile, re.M)
    assert 'TORCH ?= torch==2.13.0' in makefile


def readme_cpmctl_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks(README):
        for line in block.splitlines():
            line = line.split("#", 1)[0].split("|", 1)[0].split("<", 1)[0].strip()
            if line.startswith("cpmctl "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.parametrize("args", readme_cpmctl_commands(), ids=" ".join)
def test_readme_examples_parse(args):
    """Every `cpmctl ...` line of the README names real commands and options: appending
    --help makes the parser check them all without running the job."""
    done = run_subprocess(*args, "--help")
    assert done.returncode == 0, done.stderr.decode()
