"""MISIC's crop-and-stitch tiling: tiles of ``size`` px overlap by ``2*margin``; only their centres are kept.

The grid is the one ``misic.utils.extract_tiles`` builds (reflect padding to a whole number of strides,
then ``margin`` more on every side), so tiles and stitched results match MISIC exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    shape: tuple[int, int]  # image (H, W)
    size: int  # tile edge (model input)
    margin: int  # dropped at each tile edge when stitching

    @property
    def stride(self) -> int:
        return self.size - 2 * self.margin

    @property
    def padded_shape(self) -> tuple[int, int]:
        s = self.stride
        return tuple(-(-n // s) * s for n in self.shape)  # type: ignore[return-value]

    @property
    def rows_cols(self) -> tuple[int, int]:
        return tuple(p // self.stride for p in self.padded_shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        r, c = self.rows_cols
        return r * c

    @property
    def positions(self) -> np.ndarray:
        """(N, 2) top-left corners of each tile's kept centre, row-major like MISIC."""
        r, c = self.rows_cols
        rr, cc = np.meshgrid(np.arange(r) * self.stride, np.arange(c) * self.stride, indexing="ij")
        return np.stack([rr.ravel(), cc.ravel()], axis=1)

    @property
    def indices(self) -> np.ndarray:
        """(N, 2) tile row/column numbers."""
        return self.positions // self.stride


def pad_for_tiles(im: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Reflect-pad to whole strides, then by the margin: the canvas tiles are cut from."""
    if im.ndim == 2:
        im = im[..., None]
    (h, w), (ph, pw) = grid.shape, grid.padded_shape
    im = np.pad(im, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    m = grid.margin
    return np.pad(im, ((m, m), (m, m), (0, 0)), mode="reflect")


def extract_tiles(im: np.ndarray, size: int = 256, margin: int = 16) -> tuple[np.ndarray, TileGrid]:
    """(N, size, size, C) tiles of an (H, W) or (H, W, C) image, and the grid to stitch them back."""
    grid = TileGrid(tuple(im.shape[:2]), size, margin)  # type: ignore[arg-type]
    canvas = pad_for_tiles(im, grid)
    tiles = np.stack([canvas[r:r + size, c:c + size] for r, c in grid.positions])
    return tiles, grid


def stitch_tiles(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Inverse of ``extract_tiles``: each tile's centre back in place, cropped to the image."""
    ph, pw = grid.padded_shape
    s, m = grid.stride, grid.margin
    out = np.zeros((ph, pw, tiles.shape[-1]), dtype=tiles.dtype)
    for t, (r, c) in zip(tiles, grid.positions):
        out[r:r + s, c:c + s] = t[m:m + s, m:m + s]
    h, w = grid.shape
    return out[:h, :w]
