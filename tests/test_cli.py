"""The CLI's contract: exit codes, one-line errors, --debug, --quiet, --version, pipes."""

from __future__ import annotations

import subprocess
import sys

from cpmctl import __version__
from tests.conftest import run_subprocess

TEXT = "今天天气很好，我们一起去公园散步吧。\n这本书的内容非常丰富，值得每个人认真阅读。\n"


def test_version_and_module_entry_point():
    done = run_subprocess("--version")
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"cpmctl {__version__}"


def test_usage_errors_exit_2_with_one_line(cli):
    for args, message in [
        (("frobnicate",), "error: No such command 'frobnicate'."),
        (("data", "build", "x.txt"), "error: Missing option '--output' / '-o'."),
        (("data", "build", "x.txt", "-o", "y", "--bogus"), "error: No such option: --bogus"),
    ]:
        result = cli(*args)
        assert result.code == 2, args
        assert result.err.startswith(message) and len(result.err.strip().splitlines()) == 1


def test_a_group_without_command_shows_its_help(cli):
    result = cli("data")
    shown = result.out + result.err
    assert result.code == 2 and "build" in shown and "inspect" in shown


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, cli):
    plain = cli("data", "build", tmp_path / "nope.txt", "-o", tmp_path / "c")
    assert plain.code == 2 and "Traceback" not in plain.err
    debug = cli("--debug", "data", "build", tmp_path / "nope.txt", "-o", tmp_path / "c")
    assert debug.code == 2 and "Traceback" in debug.err and "input not found" in debug.err


def test_unexpected_failures_exit_1(tmp_path, cli, monkeypatch):
    import cpmctl.cli.data as data_cli

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(data_cli, "build_corpus", broken)
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    result = cli("data", "build", tmp_path / "a.txt", "-o", tmp_path / "c")
    assert result.code == 1
    assert result.err.strip() == (
        "error: RuntimeError: disk on fire (run with --debug for the traceback)")


def test_quiet_prints_nothing_on_stderr_and_the_path_on_stdout(tmp_path, cli):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    result = cli("--quiet", "data", "build", tmp_path / "a.txt", "-o", tmp_path / "c",
                 "--workers", "1")
    assert result.code == 0 and result.err == ""
    assert result.out == f"{tmp_path / 'c'}\n"


def test_stdout_is_capturable_and_a_closed_pipe_is_quiet(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 2000, encoding="utf-8")
    corpus = tmp_path / "c"
    assert run_subprocess("--quiet", "data", "build", tmp_path / "a.txt", "-o", corpus,
                          "--workers", "1", "--dedup", "none").returncode == 0
    pipeline = (f"set -o pipefail; {sys.executable} -m cpmctl data inspect {corpus} --json "
                f"--sample 3000 | head -c 10")
    done = subprocess.run(["bash", "-c", pipeline], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b'{\n  "path"' and done.stderr == b""
