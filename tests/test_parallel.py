"""ordered_map: results in input order, the caller working as one of the processes."""

from __future__ import annotations

import os
import time

import pytest

from cpmctl.data.parallel import ordered_map

_state = {}


def remember(value: int) -> None:
    _state["value"] = value


def square_where(x: int) -> tuple[int, int, int]:
    time.sleep(0.01)  # long enough for both processes to take items
    return x * x, os.getpid(), _state["value"]


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_order_with_every_process_working(workers):
    results = list(ordered_map(square_where, range(60), workers=workers,
                               initializer=remember, initargs=(42,), window=4))
    assert [r[0] for r in results] == [x * x for x in range(60)]
    assert {r[2] for r in results} == {42}  # the initializer ran wherever items ran
    pids = {r[1] for r in results}
    assert os.getpid() in pids and len(pids) == workers


def test_an_error_in_an_item_reaches_the_caller():
    with pytest.raises(ValueError, match="seven"):
        list(ordered_map(fail_on_seven, range(20), workers=2))
