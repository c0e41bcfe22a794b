"""The one error family for user mistakes.

A `CpmError` is something the user can fix (bad usage, bad input, a wrong artifact kind): the
CLI prints its message as one line and exits 2, with no traceback unless `--debug`. Anything
else that escapes a command is a bug or an environment failure and exits 1.
"""


class CpmError(Exception):
    """Bad usage or bad input. The message names the file, line or key at fault."""

    exit_code = 2
