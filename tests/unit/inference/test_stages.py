"""The thread pipeline behind ``segment_fields``: order kept, errors raised in the caller, every thread stopped."""

import threading
import time

import pytest

from hpc_retrain.inference.stages import staged


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("test-")}


def test_items_flow_through_every_stage_in_order():
    def double(x):
        time.sleep(0.001 * (x % 3))
        yield 2 * x

    def pairs(x):  # a stage may yield several items, or none
        if x % 4 == 0:
            yield x
            yield x + 1

    assert list(staged(range(20), double, pairs, depth=1, name="test-a")) == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                                                          20, 21, 24, 25, 28, 29, 32, 33, 36, 37]
    assert not _threads()


@pytest.mark.parametrize("where", ["source", "stage"])
def test_an_error_in_any_stage_is_raised_in_the_caller_and_stops_the_rest(where):
    def source():
        yield from range(3)
        if where == "source":
            raise RuntimeError("source broke")
        yield from range(3, 1000)

    def stage(x):
        if where == "stage" and x == 5:
            raise ValueError("stage broke")
        yield x

    got = []
    with pytest.raises((RuntimeError, ValueError), match="broke"):
        for x in staged(source(), stage, name="test-b"):
            got.append(x)
    assert got == list(range(3 if where == "source" else 5))
    assert not _threads()


def test_a_caller_that_stops_early_stops_the_threads():
    gen = staged(iter(range(10**6)), lambda x: [x], name="test-c")
    assert next(gen) == 0
    gen.close()
    assert not _threads()
