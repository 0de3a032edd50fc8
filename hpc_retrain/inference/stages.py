"""A pipeline of threads joined by bounded queues: each stage works on the next item while the one after it
works on this one, so the model is fed continuously (``predictor.segment_fields``).

``staged(source, f1, f2, ...)`` runs ``source`` (an iterable) in one thread and each ``f`` (item -> iterable
of items, in order) in a thread of its own, ``depth`` items at most waiting between two stages, and yields
the last stage's items in the caller's thread. Items keep their order. An exception in any stage stops
every stage and is raised in the caller; a caller that stops early (``close`` on the generator) stops them
too. NumPy, SciPy, TensorFlow and OpenVINO release the GIL in their heavy parts, so stages overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()
_POLL = 0.1  # s: how often a blocked stage checks whether the pipeline was stopped


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def staged(source: Iterable, *stages: Callable[[Any], Iterable], depth: int = 2,
           name: str = "stage") -> Iterator:
    stop = threading.Event()
    queues = [queue.Queue(depth) for _ in range(len(stages) + 1)]

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                pass
        return False

    def get(q: queue.Queue):
        while True:
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                if stop.is_set():
                    return _END

    def run(i: int) -> None:
        out = queues[i]
        try:
            if i == 0:
                for item in source:
                    if not put(out, item):
                        return
            else:
                while True:
                    item = get(queues[i - 1])
                    if item is _END or isinstance(item, _Failed):
                        put(out, item)
                        return
                    for y in stages[i - 1](item):
                        if not put(out, y):
                            return
            put(out, _END)
        except BaseException as e:  # raised again in the caller
            put(out, _Failed(e))

    threads = [threading.Thread(target=run, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(len(stages) + 1)]
    for t in threads:
        t.start()
    try:
        while True:
            item = get(queues[-1])
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()
