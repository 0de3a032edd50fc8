"""The training tiles, batch by batch, from the Zarr store: a plain threaded loader, the same on every backend.

It replaces the ``tf.data`` pipeline (which only TensorFlow has): tiles are read by a few threads (zarr and
its codecs release the GIL), at most ``depth`` batches are read ahead, and batches come out in exactly the
given order, each tile turned by its augmentation code. Batches are NumPy arrays, so every backend trains on
the very same numbers: a run's batches are identical on TensorFlow, JAX and PyTorch.

Augmentation codes (``trainingdata.epoch_plan``): ``k = code % 4`` quarter turns counter-clockwise
(``np.rot90``, as ``tf.image.rot90`` did), then, for ``code >= 4``, a left-right flip (``tf.reverse`` on the
width axis did). Target and label are turned together, so they cannot drift apart.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Batches read ahead, and threads reading tiles. A tile reads and decodes in ~4 ms and a CPU training step of
# 2-8 tiles takes seconds, so 2 tiles in flight and 2 batches ready keep a step fed (the depths tf.data had,
# fixed rather than autotuned: benchmarks/RESULTS.md section 4); a GPU step is ~100x faster, hence
# ``benchmarks gpu`` measures this loader against tiles already in memory.
PREFETCH_DEPTH = 2
READ_THREADS = 2


def augment(a: np.ndarray, code: int) -> np.ndarray:
    """``a`` (H, W, C) turned by ``code``: ``code % 4`` quarter turns, then flipped left-right if ``code >= 4``."""
    code = int(code)
    out = np.rot90(a, code % 4, axes=(0, 1))
    if code >= 4:
        out = out[:, ::-1]
    return out


def augment_pair(x: np.ndarray, y: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """The same flip/quarter-turn for target and label."""
    return augment(x, code), augment(y, code)


class TileLoader:
    """Iterable of batches ``(x (n, S, S, 3) float32, y (n, S, S, 2) float32)`` of ``tiles`` in order.

    ``reader``: a ``trainingdata.TileReader`` (its ``read(i)`` gives one tile's target and label, and names
    the chunk file of a tile that does not decode); each iteration reads the tiles afresh, so one loader
    serves every validation pass. A tile that fails to read raises its error at the batch that holds it."""

    def __init__(self, reader, tiles: np.ndarray, codes: np.ndarray, batch: int, depth: int = PREFETCH_DEPTH,
                 threads: int = READ_THREADS):
        self.reader = reader
        self.tiles = np.asarray(tiles, np.int64)
        self.codes = np.asarray(codes, np.int32)
        if len(self.codes) != len(self.tiles):
            raise ValueError(f"{len(self.tiles)} tiles but {len(self.codes)} augmentation codes")
        self.batch, self.depth, self.threads = int(batch), max(1, int(depth)), max(1, int(threads))

    def __len__(self) -> int:
        return -(-len(self.tiles) // self.batch)

    def _load(self, i: int, code: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.reader.read(i)
        return augment_pair(np.asarray(x, np.float32), np.asarray(y, np.float32), code)

    def __iter__(self):
        starts = range(0, len(self.tiles), self.batch)
        pending: deque = deque()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hpc-retrain-tiles")
        try:
            nxt = iter(starts)

            def submit_next() -> None:
                s = next(nxt, None)
                if s is not None:
                    sl = slice(s, s + self.batch)
                    pending.append([pool.submit(self._load, int(i), int(c))
                                    for i, c in zip(self.tiles[sl], self.codes[sl])])

            for _ in range(self.depth + 1):  # the batch to hand out first and ``depth`` behind it
                submit_next()
            while pending:
                parts = [f.result() for f in pending.popleft()]
                yield np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
                submit_next()  # the consumer is back for the next batch: keep ``depth`` behind that one
        finally:
            # A loop that stops early (a signal, an error) leaves reads queued: drop them, wait for the ones
            # running (a thread mid-read must not outlive the store it reads).
            pool.shutdown(wait=True, cancel_futures=True)
