"""Everything cpmctl prints to stderr: log lines, warnings, and progress.

Results go to stdout (the CLI prints them); this module only writes to stderr, so
`$(cpmctl data build ...)` captures just the artifact path. Progress is a rich bar when stderr
is a terminal and a plain log line every few seconds otherwise (CI, pipes).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class _Settings:
    quiet = False
    debug = False


settings = _Settings()


def info(message: str) -> None:
    if not settings.quiet:
        stderr.print(message, markup=False)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet: they report data that was not used."""
    stderr.print(f"warning: {message}", markup=False, style="yellow")


class RateMeter:
    """Progress over bytes with a documents/s and MB/s readout.

    `total` is the number of input bytes when known (None for stdin), which gives the bar and ETA.
    """

    LOG_EVERY_S = 5.0

    def __init__(self, label: str, total: int | None):
        self.label = label
        self.total = total
        self.bytes = 0
        self.docs = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> RateMeter:
        if not settings.quiet and stderr.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def rate_text(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.docs / elapsed:,.0f} docs/s, {self.bytes / elapsed / 1e6:.2f} MB/s"

    def advance(self, nbytes: int, ndocs: int) -> None:
        self.bytes += nbytes
        self.docs += ndocs
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bytes, rate=self.rate_text())
            return
        now = time.perf_counter()
        if not settings.quiet and now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            done = f"{self.bytes / 1e6:,.1f} MB"
            if self.total:
                done += f" of {self.total / 1e6:,.1f} MB"
            info(f"{self.label}: {done}, {self.docs:,} docs ({self.rate_text()})")
