"""An order-preserving, bounded parallel map over worker processes.

Results come back in input order whatever the worker count, which is what makes the output of
`data build` (and later `data tokenize`) byte-identical for any `--workers`. At most `window`
items are in flight, so a corpus larger than memory streams through.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    # NOTE: Ctrl-C reaches the whole process group; only the main process handles it (it
    # cancels the queue and removes its temporaries), so workers ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def ordered_map(
    function: Callable,
    items: Iterable,
    *,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    window: int | None = None,
) -> Iterator:
    """Yield `function(item)` for every item, in order. `workers <= 1` runs in this process."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    # NOTE: "spawn", not "fork": the main process may hold threads (progress display) and
    # forking a threaded process can deadlock.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(initializer, initargs),
    )
    window = window or 2 * workers
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
