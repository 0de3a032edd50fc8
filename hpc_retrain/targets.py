"""Training inputs from brightfield, and the block machinery that cuts tiles from scans of any size.

A field's targets are MISIC shape-index features of its brightfield cut with the same ``TileGrid`` (same
rescaled shape, size, margin) as its labels, so tile ``i`` of both is the same patch of the field.

Large scans never exist whole in memory: the lazy feature map (``preprocess.features``, in chunks of
about a block) is padded the way ``extract_tiles`` pads, rechunked on block edges and cut block by block;
each block is ``k x k`` tiles plus the ``margin`` they share with their neighbours, and blocks are
computed in vertical strips so the chunks in flight do not grow with the scan's width.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import dask.array as da
import numpy as np

from hpc_retrain import preprocess as P
from hpc_retrain import tiling as T
from hpc_retrain.config import RunConfig


def target_tiles(bf: np.ndarray, cfg: RunConfig, source: str = "image") -> tuple[np.ndarray, T.TileGrid]:
    """(tiles (N, S, S, 3) float32, grid) of one in-memory brightfield image."""
    feats = P.features_np(bf, cfg.preprocess.brightfield, cfg.preprocess, source)
    return T.extract_tiles(feats, cfg.tiling.size, cfg.tiling.margin)


def stats_parts(tiles: np.ndarray) -> dict[str, Any]:
    t = tiles.astype(np.float64)
    return {"sum": float(t.sum()), "sumsq": float((t * t).sum()), "n": int(t.size)}


def stats_from_parts(parts: list[dict[str, Any]]) -> dict[str, float]:
    n = max(sum(p["n"] for p in parts), 1)
    mean = sum(p["sum"] for p in parts) / n
    var = max(sum(p["sumsq"] for p in parts) / n - mean * mean, 0.0)
    return {"target_mean": float(mean), "target_std": float(np.sqrt(var))}


def target_stats(tiles: np.ndarray) -> dict[str, float]:
    return stats_from_parts([stats_parts(tiles)])


# ------------------------------------------------------------------------------------- large scans
# Width of the vertical strips a large scan is processed in (scaled pixels); see ``run_blocks``.
STRIP_PX = 8192


def is_large(shape: tuple[int, int], cfg: RunConfig) -> bool:
    """Fields this big are processed chunk by chunk (never as one float64 image)."""
    return max(shape) > 2 * cfg.infer.chunk


def block_tiles(cfg: RunConfig) -> int:
    """Tiles per block edge: a block is about ``infer.chunk`` scaled pixels, a whole number of strides."""
    stride = cfg.tiling.size - 2 * cfg.tiling.margin
    return max(1, int(round(cfg.infer.chunk / stride)))


@dataclass(frozen=True)
class Block:
    r0: int
    r1: int
    c0: int
    c1: int  # tile rows [r0, r1) and columns [c0, c1)

    def tile_indices(self, grid: T.TileGrid) -> Iterator[tuple[int, int, int]]:
        """(first tile index in the field, tiles before it in this block, count) for each tile row."""
        cols = grid.rows_cols[1]
        nc = self.c1 - self.c0
        for i, r in enumerate(range(self.r0, self.r1)):
            yield r * cols + self.c0, i * nc, nc


def lazy_features(im: da.Array, prep, cfg: RunConfig, source: str) -> da.Array:
    """Features of a scan in chunks of one block (a whole number of tile strides)."""
    stride = cfg.tiling.size - 2 * cfg.tiling.margin
    chunk = block_tiles(cfg) * stride
    if not isinstance(im, da.Array):
        im = da.from_array(im, chunks=cfg.infer.chunk)
    # Whole-file inputs (a TIFF is one chunk) are split so downstream tasks stay chunk-sized.
    im = im.rechunk(cfg.infer.chunk)
    return P.features(im, prep, cfg.preprocess, chunk=chunk, source=source)


def lazy_canvas(x: da.Array, grid: T.TileGrid) -> da.Array:
    """``tiling.pad_for_tiles`` of a Dask array: reflect to whole strides, then the margin on every side."""
    (h, w), (ph, pw), m = grid.shape, grid.padded_shape, grid.margin
    if x.ndim == 2:
        x = x[..., None]
    x = da.pad(x, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    return da.pad(x, ((m, m), (m, m), (0, 0)), mode="reflect")


def cut(win: np.ndarray, grid: T.TileGrid, b: Block) -> np.ndarray:
    """Tiles (n, S, S, C) of one block window, row-major as ``extract_tiles`` orders them."""
    s, S = grid.stride, grid.size
    return np.stack([win[i * s: i * s + S, j * s: j * s + S]
                     for i in range(b.r1 - b.r0) for j in range(b.c1 - b.c0)])


def write_block(arr, first_tile: int, grid: T.TileGrid, b: Block, tiles: np.ndarray) -> None:
    """Write a block's tiles into a store array at the field's offset (one tile row at a time: contiguous)."""
    for start, k0, n in b.tile_indices(grid):
        arr[first_tile + start: first_tile + start + n] = tiles[k0: k0 + n]


def _block_edges(n: int, k: int, s: int, m: int) -> tuple[int, ...]:
    sizes = [min(k, n - i) * s for i in range(0, n, k)]
    sizes[0] += m
    sizes[-1] += m
    return tuple(sizes)


def map_windows(canvas: da.Array, grid: T.TileGrid, k: int, fn, chunks=None, dtype=object) -> da.Array:
    """``fn(window, block)`` over every block of ``k x k`` tiles, as one Dask collection.

    The canvas is chunked on block edges and overlapped by the margin, so each chunk *is* a block's window
    and neighbouring blocks share computed chunks instead of recomputing them (separate collections per
    window would each inline their own copy of the feature graph). ``chunks=None``: ``fn`` returns any
    object, collected in a (block rows, block cols) object array; otherwise it returns an array of the
    block's ``chunks`` entry.
    """
    s, m = grid.stride, grid.margin
    rows, cols = grid.rows_cols
    c = canvas.rechunk((_block_edges(rows, k, s, m), _block_edges(cols, k, s, m), -1))
    ov = da.overlap.overlap(c, depth={0: m, 1: m, 2: 0}, boundary="none")

    def call(win: np.ndarray, block_id=None):
        i, j = block_id[0], block_id[1]
        b = Block(i * k, min(i * k + k, rows), j * k, min(j * k + k, cols))
        y = fn(win, b)
        if chunks is not None:
            return y
        out = np.empty((1, 1), object)
        out[0, 0] = y
        return out

    # A fresh name: Dask would otherwise hash ``fn`` and everything it closes over (a Keras model, ...).
    name = f"tile-blocks-{uuid.uuid4().hex}"
    if chunks is None:
        nb = ov.numblocks
        return ov.map_blocks(call, drop_axis=2, chunks=((1,) * nb[0], (1,) * nb[1]), dtype=object,
                             meta=np.empty((0, 0), object), name=name)
    return ov.map_blocks(call, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype), name=name)


def strip_blocks(cfg: RunConfig) -> int:
    """Block columns computed together in a large scan: about ``STRIP_PX`` scaled pixels, at least two."""
    stride = cfg.tiling.size - 2 * cfg.tiling.margin
    return max(2, STRIP_PX // (block_tiles(cfg) * stride))


def run_blocks(canvas: da.Array, grid: T.TileGrid, k: int, fn: Callable[[np.ndarray, Block], Any],
               strip: int | None = None) -> list[Any]:
    """``fn(window, block)`` for every block, synchronously; returns the results in block order.

    Computed in one go, the stencil keeps a row of chunks of every intermediate in flight, so memory grows
    with the scan's width. Vertical strips of ``strip`` block columns cut that part: each strip recomputes
    the chunk column of features it shares with a neighbour (about 2/strip more feature work). What still
    grows with the scan is the task graph, materialized whole for every strip (about 1 KB per task: 0.4 M
    tasks for a 32768 px scan in 1024 px chunks). Square regions were tried: 1-13 % lower peaks for 60-70 %
    more time, as the graph is paid per region.
    """
    out = map_windows(canvas, grid, k, fn)
    res = np.empty(out.shape, object)
    step = strip or out.shape[1]
    for j in range(0, out.shape[1], step):
        res[:, j: j + step] = out[:, j: j + step].compute(scheduler="synchronous")
    return list(res.ravel())


def write_target_tiles(bf, cfg: RunConfig, arr, first_tile: int, source: str = "image") -> tuple[T.TileGrid, dict]:
    """Compute and write one field's target tiles into ``arr``; a large scan goes block by block.
    Returns the grid and the field's target statistics."""
    shape = tuple(bf.shape)
    if not is_large(shape, cfg):
        tiles, grid = target_tiles(np.asarray(bf), cfg, source)
        arr[first_tile: first_tile + len(tiles)] = tiles
        return grid, target_stats(tiles)
    feats = lazy_features(bf, cfg.preprocess.brightfield, cfg, source)
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
    canvas = lazy_canvas(feats, grid)

    def one(win: np.ndarray, b: Block) -> dict:
        tiles = cut(win, grid, b)
        write_block(arr, first_tile, grid, b, tiles)
        return stats_parts(tiles)

    return grid, stats_from_parts(run_blocks(canvas, grid, block_tiles(cfg), one, strip_blocks(cfg)))
