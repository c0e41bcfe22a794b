"""Shared test helpers: run the CLI in-process or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from cpmctl.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `cpmctl ARGS...` in this process; returns exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, input: bytes | None = None, timeout: float = 120,
                   cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m cpmctl ARGS...` as a real process (exit codes, signals, stdin)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, cwd=cwd, env=env)
