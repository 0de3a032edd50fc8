"""One block engine for every large-image stage: a grid of blocks, each a core plus a halo of context.

In the spirit of stardist's ``big.py`` (a block reads its core with context, predicts, crops the context
off and writes the core) and of dask-image (the halo comes from the filter's own parameters): a scan is
cut into blocks of ``block`` pixels (the cores tile the image exactly once), each read with ``halo`` pixels
of context on every side, and iterated strip by strip (one row of blocks at a time), so no task graph or
buffer grows with the scan: at any time one block's window is in memory.

Halos: a Gaussian of ``sigma`` needs ``gaussian_halo(sigma)`` (scipy's truncation, 4 sigma), +1 px per
finite difference after it (the shape index's Hessian: 2); the model's tiles need the tiling margin; a
resize needs the anti-aliasing Gaussian plus the interpolation's neighbours (``rescale_window``); instance
labelling needs about one long cell (``instances.halo``).

Borders: a block at the image edge reads a clipped window (its halo is cut short, ``Block.read``), or,
given index maps built like successive ``np.pad`` calls (``axis_index``), the very window a globally
padded image would give, so block results equal whole-image results.

Cells crossing seams: ``join`` turns pairs of labels that are the same object (``seam_pairs``) into one id
per connected component of the pair graph (``scipy.sparse.csgraph.connected_components``, as dask-image's
``label`` merges labels across chunk boundaries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from hpc_retrain.imaging import preprocess as P


def is_large(shape: tuple[int, ...], chunk: int) -> bool:
    """The one rule: a field whose longer side exceeds ``chunk`` pixels goes block by block."""
    return max(shape) > chunk


def gaussian_halo(sigma: float, derivatives: int = 0) -> int:
    """Context a Gaussian of ``sigma`` (scipy's truncation), then ``derivatives`` finite differences, need."""
    return (P.gaussian_radius(sigma) if sigma > 0 else 0) + int(derivatives)


def axis_index(n: int, *pads: tuple[str, int, int]) -> np.ndarray:
    """Source index behind each position of an axis of length ``n`` padded by successive ``np.pad`` steps
    ``(mode, before, after)``; -1 where a "constant" step fills. Position 0 is the first padded one."""
    idx = np.arange(n)
    for mode, before, after in pads:
        if mode == "constant":
            idx = np.pad(idx, (before, after), constant_values=-1)
        else:
            idx = np.pad(idx, (before, after), mode=mode)
    return idx


def take(array, rows: np.ndarray, cols: np.ndarray, fill=0) -> np.ndarray:
    """``array[rows][:, cols]`` (index -1: ``fill``) reading only the smallest window of ``array`` behind it."""
    vr, vc = rows[rows >= 0], cols[cols >= 0]
    r0, c0 = int(vr.min()), int(vc.min())
    win = np.asarray(array[r0:int(vr.max()) + 1, c0:int(vc.max()) + 1])
    ri, ci = np.maximum(rows - r0, 0), np.maximum(cols - c0, 0)
    if (rows < 0).any() or (cols < 0).any():
        out = win[ri[:, None], ci[None, :]]  # one copy, not one per axis
        out[rows < 0] = fill
        out[:, cols < 0] = fill
        return out
    if _run(ri) and _run(ci):  # no reflection inside: the window itself, uncopied
        return win[ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1]
    return win[ri[:, None], ci[None, :]]


def _run(idx: np.ndarray) -> bool:
    """``idx`` is k, k+1, ..., a plain slice."""
    return len(idx) > 0 and int(idx[-1]) - int(idx[0]) == len(idx) - 1 and bool((np.diff(idx) == 1).all())


class Window:
    """A 2-D array-like computed on demand: ``w[r0:r1, c0:c1]`` calls ``fn(r0, r1, c0, c1)``."""

    def __init__(self, shape: tuple[int, int], fn: Callable[[int, int, int, int], np.ndarray]):
        self.shape, self.fn = tuple(shape), fn

    def __getitem__(self, key) -> np.ndarray:
        (r0, r1, _), (c0, c1, _) = (k.indices(n) for k, n in zip(key, self.shape))
        return self.fn(r0, r1, c0, c1)


@dataclass(frozen=True)
class Block:
    rows: tuple[int, int]  # the core, [r0, r1) x [c0, c1), in the grid's coordinates
    cols: tuple[int, int]
    halo: int
    shape: tuple[int, int]  # the extent the grid covers
    index: tuple[int, int] = (0, 0)  # (block row, block column)

    @property
    def core(self) -> tuple[slice, slice]:
        return slice(*self.rows), slice(*self.cols)

    @property
    def window(self) -> tuple[slice, slice]:
        """The core with its halo, clipped to the grid."""
        h = self.halo
        return tuple(slice(max(a - h, 0), min(b + h, n)) for (a, b), n in zip((self.rows, self.cols), self.shape))

    @property
    def inner(self) -> tuple[slice, slice]:
        """The core within the clipped window."""
        return tuple(slice(a - w.start, b - w.start) for (a, b), w in zip((self.rows, self.cols), self.window))

    def read(self, array, index: tuple[np.ndarray, np.ndarray] | None = None, fill=0) -> np.ndarray:
        """The block with its halo: ``array[window]`` clipped at the borders; or, given index maps of the
        padded axes (``axis_index``; their position ``halo`` is grid coordinate 0), the full halo everywhere,
        read through the maps (reflect, constant ``fill``, ...)."""
        if index is None:
            return np.asarray(array[self.window])
        (r0, r1), (c0, c1), h = self.rows, self.cols, self.halo
        return take(array, index[0][r0:r1 + 2 * h], index[1][c0:c1 + 2 * h], fill)

    def crop(self, result: np.ndarray) -> np.ndarray:
        """The core of a result computed on this block's window (clipped or full), halo removed."""
        cut = []
        for (a, b), w, n in zip((self.rows, self.cols), self.window, result.shape[:2]):
            top = self.halo if n == b - a + 2 * self.halo else a - w.start
            cut.append(slice(top, top + b - a))
        return result[tuple(cut)]

    def write(self, out, result: np.ndarray) -> None:
        """``out[core] = crop(result)``."""
        out[self.core] = self.crop(result)

    def scaled(self, factor: int, halo: int, shape: tuple[int, int] | None = None) -> Block:
        """This block in units ``factor`` times smaller (tiles -> pixels), with its own halo."""
        shape = shape or tuple(n * factor for n in self.shape)
        return Block(tuple(x * factor for x in self.rows), tuple(x * factor for x in self.cols), halo, shape,
                     self.index)


def strips(shape: tuple[int, int], block, halo: int = 0) -> Iterator[list[Block]]:
    """The grid of ``block`` (an edge or (rows, cols)) blocks over ``shape``, one row of blocks at a time."""
    bh, bw = (block, block) if np.isscalar(block) else block
    H, W = shape
    for i, r in enumerate(range(0, H, bh)):
        yield [Block((r, min(r + bh, H)), (c, min(c + bw, W)), halo, (H, W), (i, j))
               for j, c in enumerate(range(0, W, bw))]


def blocks(shape: tuple[int, int], block, halo: int = 0) -> Iterator[Block]:
    """Every block of the grid, strip by strip, row-major."""
    for strip in strips(shape, block, halo):
        yield from strip


# ------------------------------------------------------------------------------------------ resize
def rescale_window(read: Callable[[int, int, int, int], np.ndarray], in_shape: tuple[int, int],
                   out_shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int],
                   dtype=np.float64) -> np.ndarray:
    """Rows/cols of ``skimage.transform.resize(whole, out_shape, order=1)`` (anti-aliased when shrinking,
    'reflect' borders) from a window of the input only: ``read(r0, r1, c0, c1)`` returns input pixels
    (h, w) or (h, w, C). The halo: the interpolation's neighbours plus the anti-aliasing Gaussian's radius."""
    factors = [i / o for i, o in zip(in_shape, out_shape)]
    down = any(o < i for i, o in zip(in_shape, out_shape))
    sigma = [max(0.0, (f - 1) / 2) if down else 0.0 for f in factors]
    win = []
    for (o0, o1), f, n, sg in zip((rows, cols), factors, in_shape, sigma):
        a, b = P._in_window(o0, o1, f, n)
        g = gaussian_halo(sg, 1) if sg > 0 else 0
        win.append((max(a - g, 0), min(b + g, n)))
    (a0, b0), (a1, b1) = win
    x = read(a0, b0, a1, b1)
    flat = x.ndim == 2
    x = x[..., None] if flat else x
    res = np.empty((rows[1] - rows[0], cols[1] - cols[0], x.shape[-1]), dtype)
    for ch in range(x.shape[-1]):
        xc = x[..., ch]
        if down:
            # skimage filters in the input's float type with 'reflect' (= ndimage 'mirror') borders
            xc = ndi.gaussian_filter(xc, sigma, mode="mirror")
        res[..., ch] = P._zoom_window(xc, rows, cols, (a0, a1), factors)
    return res[..., 0] if flat else res


# ------------------------------------------------------------------------------------------ seams
def seam_pairs(theirs: np.ndarray, ours: np.ndarray, share: float = 0.5) -> np.ndarray:
    """(2, n) label pairs that are one object seen from both sides of a seam: the two labellings of the
    same seam pixels agree on more than ``share`` of the smaller object's seam pixels (a touching
    neighbour shares only the odd pixel where the two sides disagree)."""
    both = (theirs > 0) & (ours > 0)
    if not both.any():
        return np.zeros((2, 0), np.int64)
    pairs, counts = np.unique(np.stack([theirs[both], ours[both]]).astype(np.int64), axis=1, return_counts=True)
    na = np.bincount(theirs.ravel().astype(np.int64))
    nb = np.bincount(ours.ravel().astype(np.int64))
    return pairs[:, counts > share * np.minimum(na[pairs[0]], nb[pairs[1]])]


def join(pairs: np.ndarray, n: int) -> np.ndarray:
    """Lookup table 0..n-1 -> final ids: labels linked by ``pairs`` (2, k) become one id (the connected
    components of the pair graph), numbered 1.. in the order of their smallest label; 0 stays 0."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, np.int64).reshape(2, -1)
    graph = coo_matrix((np.ones(pairs.shape[1], np.int8), (pairs[0], pairs[1])), shape=(n, n))
    nc, comp = connected_components(graph, directed=False)
    first = np.full(nc, n, np.int64)
    np.minimum.at(first, comp, np.arange(n))
    rank = np.empty(nc, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(nc)
    lut = rank[comp]  # the background's component (label 0, never paired) ranks first: 0
    return lut
