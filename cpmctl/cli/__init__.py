"""The cpmctl command line: a typer app whose command groups follow docs/design.md §1.

The CLI is thin: each command parses its options, calls the library, and prints the result to
stdout. This module owns the exit codes: 0 done, 1 the job failed, 2 bad usage or bad input
(one line, no traceback unless --debug), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import typer

from cpmctl import __version__, artifacts
from cpmctl.cli import (
    bench,
    completion,
    data,
    generate,
    grow,
    model,
    plot,
    quickstart,
    tokenizer,
    train,
    tune_prompt,
)
from cpmctl.console import settings, stderr
from cpmctl.errors import CpmError

app = typer.Typer(
    name="cpmctl",
    help="Train and serve CPM-style Chinese language models, one composable command at a time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data.app, name="data")
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(model.app, name="model")
app.add_typer(bench.app, name="bench")
app.command("train")(train.train)
app.command("grow")(grow.grow)
app.command("tune-prompt")(tune_prompt.tune_prompt)
app.command("plot")(plot.plot)
app.command("generate")(generate.generate)
app.command("quickstart")(quickstart.quickstart)
app.command("completion")(completion.completion)


def _version(value: bool) -> None:
    if value:
        print(f"cpmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for every error."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    settings.debug = debug
    settings.quiet = quiet


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int) -> None:
    stderr.print(f"error: {message}", markup=False, style="red")
    sys.exit(code)


def _usage_error(exc: typer.TyperException) -> None:
    """Typer's usage errors (unknown option, missing argument), as one line."""
    ctx = getattr(exc, "ctx", None)
    message = exc.format_message()
    if not message and ctx is not None:  # a group run without a command: show its help
        print(ctx.get_help(), end="")  # NOTE: typer's rich help prints itself, returning ""
        sys.exit(exc.exit_code)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    _fail(exc.format_message() + hint, exc.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Run cpmctl and turn every way of ending into the documented exit code.

    NOTE: we invoke the command tree ourselves rather than through typer's `main`, which
    turns Ctrl-C and broken pipes into its own exit codes before we could see them.
    """
    # SIGTERM takes the same path as Ctrl-C: temporaries removed, nothing half-written.
    # NOTE: SIGINT is set explicitly because a process started in the background by a
    # non-interactive shell inherits it ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    args = sys.argv[1:] if argv is None else list(argv)
    artifacts.invocation[:] = ["cpmctl", *args]
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        with command.make_context("cpmctl", args) as ctx:
            command.invoke(ctx)
    except CpmError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    except typer.TyperException as exc:
        _usage_error(exc)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (`cpmctl ... | head -1`): exit quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
