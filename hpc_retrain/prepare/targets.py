"""Training inputs from brightfield, and the block machinery that cuts tiles from scans of any size.

A field's targets are MISIC shape-index features of its brightfield cut with the same ``TileGrid`` (same
rescaled shape, size, margin) as its labels, so tile ``i`` of both is the same patch of the field.

Large scans never exist whole in memory, nor does a graph of them: blocks of ``k x k`` tiles (``blocks``
grid, one row of blocks at a time) read their canvas window, the tiles plus the ``margin`` they share with
their neighbours, through the padding ``extract_tiles`` applies (``canvas_index``), from features computed
for that window only (``ScanFeatures``); one block is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import dask.array as da
import numpy as np

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging import blocks as B
from hpc_retrain.imaging import preprocess as P
from hpc_retrain.imaging import tiling as T


def target_tiles(bf: np.ndarray, cfg: RunConfig, source: str = "image") -> tuple[np.ndarray, T.TileGrid]:
    """(tiles (N, S, S, 3) float32, grid) of one in-memory brightfield image."""
    feats = P.features_np(bf, cfg.preprocess.brightfield, cfg.preprocess, source)
    return T.extract_tiles(feats, cfg.tiling.size, cfg.tiling.margin)


def stats_parts(tiles: np.ndarray) -> dict[str, Any]:
    t = tiles.astype(np.float64)
    total = float(t.sum())
    return {"sum": total, "sumsq": float(np.square(t, out=t).sum()), "n": int(t.size)}  # squared in place


def stats_from_parts(parts: list[dict[str, Any]]) -> dict[str, float]:
    n = max(sum(p["n"] for p in parts), 1)
    mean = sum(p["sum"] for p in parts) / n
    var = max(sum(p["sumsq"] for p in parts) / n - mean * mean, 0.0)
    return {"target_mean": float(mean), "target_std": float(np.sqrt(var))}


def target_stats(tiles: np.ndarray) -> dict[str, float]:
    return stats_from_parts([stats_parts(tiles)])


# ------------------------------------------------------------------------------------- large scans
# Rows of a block's window whose shape index is computed at once (``ScanFeatures``).
FEATURE_ROWS = 256


def block_tiles(cfg: RunConfig) -> int:
    """Tiles per block edge: a block is about ``compute.chunk`` scaled pixels, a whole number of strides."""
    stride = cfg.tiling.size - 2 * cfg.tiling.margin
    return max(1, int(round(cfg.compute.chunk / stride)))


def tile_indices(b: B.Block, grid: T.TileGrid) -> Iterator[tuple[int, int, int]]:
    """For a block of tiles (``b.rows``, ``b.cols`` in tile rows and columns): (first tile index in the
    field, tiles before it in this block, count) for each of its tile rows."""
    cols = grid.rows_cols[1]
    (r0, r1), (c0, c1) = b.rows, b.cols
    for i, r in enumerate(range(r0, r1)):
        yield r * cols + c0, i * (c1 - c0), c1 - c0


class ScanFeatures:
    """MISIC features of a scan of any size, computed window by window from its pixels (``feats[r0:r1, c0:c1]``
    reads only the input window behind it): normalized with the whole scan's percentiles, gamma, rescaled
    (``blocks.rescale_window``) and MISIC's shape index with its halo (``preprocess.shape_index_halo``) over
    the image MISIC pads (reflect ``MISIC_PAD`` px, zeros beyond). Equal to ``preprocess.features_np``."""

    def __init__(self, im, prep, cfg: RunConfig, source: str = "image"):
        if not isinstance(im, da.Array):  # percentiles as the chunked path takes them
            im = da.from_array(np.asarray(im), chunks=cfg.compute.chunk)
        P.check_image(im, source)
        self.im, self.prep, self.sigmas = im, prep, cfg.preprocess.sigmas
        self.lo, self.hi = P.intensity_range(im, prep.percentiles, source)
        self.in_shape = tuple(im.shape)
        self.shape = P.rescaled_shape(self.in_shape, cfg.preprocess.scale)
        self.halo = P.shape_index_halo(self.sigmas)
        pad = ("reflect", P.MISIC_PAD, P.MISIC_PAD), ("constant", self.halo, self.halo)
        self._index = tuple(B.axis_index(n, *pad) for n in self.shape)

    def prepared(self, r0: int, r1: int, c0: int, c1: int, gamma: float | None = None) -> np.ndarray:
        """Rows/cols of the normalized, gamma-corrected (``gamma``: else the channel's), rescaled image."""
        gamma = self.prep.gamma if gamma is None else gamma

        def read(a0, a1, b0, b1):
            x = P.normalize(np.asarray(self.im[a0:a1, b0:b1]), self.lo, self.hi)
            return x ** gamma if gamma != 1.0 else x

        if self.shape == self.in_shape:
            return read(r0, r1, c0, c1)
        # In bands of rows (each with its own halo, so the same pixels): the float64 input window, its
        # anti-aliased copy and the interpolation temporaries cover one band at a time.
        out = np.empty((r1 - r0, c1 - c0), np.float64)
        for a in range(r0, r1, FEATURE_ROWS):
            b = min(a + FEATURE_ROWS, r1)
            out[a - r0:b - r0] = B.rescale_window(read, self.in_shape, self.shape, (a, b), (c0, c1))
        return out

    def __getitem__(self, key) -> np.ndarray:
        (r0, r1, _), (c0, c1, _) = (k.indices(n) for k, n in zip(key, self.shape))
        h, off = self.halo, P.MISIC_PAD
        x = B.take(B.Window(self.shape, self.prepared), self._index[0][r0 + off: r1 + off + 2 * h],
                   self._index[1][c0 + off: c1 + off + 2 * h], 0.0)
        out = np.empty((r1 - r0, c1 - c0, len(self.sigmas)), np.float32)
        # Bands of rows, each with the halo: the same pixels (the filters reach ``h``), while skimage's float64
        # Hessian and eigenvalue temporaries (~7 per pixel) cover one band, not the whole window.
        for a in range(0, r1 - r0, FEATURE_ROWS):
            b = min(a + FEATURE_ROWS, r1 - r0)
            for i, s in enumerate(self.sigmas):
                out[a:b, :, i] = P._shape_index(x[a:b + 2 * h], s)[h:-h, h:-h]
        return np.negative(out, out=out) if self.prep.light_background else out


def lazy_features(im, prep, cfg: RunConfig, source: str) -> ScanFeatures:
    """Features of a scan, computed block by block on demand (see ``ScanFeatures``)."""
    return ScanFeatures(im, prep, cfg, source)


def canvas_index(grid: T.TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """Index maps of ``tiling.pad_for_tiles``'s canvas (reflect to whole strides, then the margin) onto the
    image, for ``blocks.Block.read``: a block's canvas window is read without building the canvas."""
    m = grid.margin
    return tuple(B.axis_index(n, ("reflect", 0, p - n), ("reflect", m, m))
                 for n, p in zip(grid.shape, grid.padded_shape))


def tile_blocks(grid: T.TileGrid, k: int) -> Iterator[tuple[B.Block, B.Block]]:
    """Blocks of ``k x k`` tiles, one row of blocks at a time: (the block in canvas pixels, halo = the tiles'
    margin, read with ``canvas_index``; the same block in tile rows and columns)."""
    for t in B.blocks(grid.rows_cols, k):
        yield t.scaled(grid.stride, grid.margin, grid.padded_shape), t


def cut(win: np.ndarray, grid: T.TileGrid, b: B.Block) -> np.ndarray:
    """Tiles (n, S, S, C) of one block window (``b`` in tile rows and columns), row-major as
    ``extract_tiles`` orders them."""
    s, S = grid.stride, grid.size
    win = win[..., None] if win.ndim == 2 else win
    (r0, r1), (c0, c1) = b.rows, b.cols
    return np.stack([win[i * s: i * s + S, j * s: j * s + S] for i in range(r1 - r0) for j in range(c1 - c0)])


def write_block(arr, first_tile: int, grid: T.TileGrid, b: B.Block, tiles: np.ndarray) -> None:
    """Write a block's tiles into a store array at the field's offset (one tile row at a time: contiguous)."""
    for start, k0, n in tile_indices(b, grid):
        arr[first_tile + start: first_tile + start + n] = tiles[k0: k0 + n]


def run_blocks(feats, grid: T.TileGrid, k: int, fn: Callable[[np.ndarray, B.Block], Any]) -> list[Any]:
    """``fn(canvas window, block)`` for every block of ``k x k`` tiles of ``feats`` (anything sliceable as
    ``feats[r0:r1, c0:c1]``), one block in memory at a time; the results in block order."""
    index = canvas_index(grid)
    return [fn(px.read(feats, index), tb) for px, tb in tile_blocks(grid, k)]


def write_target_tiles(bf, cfg: RunConfig, arr, first_tile: int, source: str = "image") -> tuple[T.TileGrid, dict]:
    """Compute and write one field's target tiles into ``arr``; a large scan goes block by block.
    Returns the grid and the field's target statistics."""
    shape = tuple(bf.shape)
    if not B.is_large(shape, cfg.compute.chunk):
        tiles, grid = target_tiles(np.asarray(bf), cfg, source)
        arr[first_tile: first_tile + len(tiles)] = tiles
        return grid, target_stats(tiles)
    feats = lazy_features(bf, cfg.preprocess.brightfield, cfg, source)
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)

    def one(win: np.ndarray, b: B.Block) -> dict:
        tiles = cut(win, grid, b)
        write_block(arr, first_tile, grid, b, tiles)
        return stats_parts(tiles)

    return grid, stats_from_parts(run_blocks(feats, grid, block_tiles(cfg), one))
