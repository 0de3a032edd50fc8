"""MISIC preprocessing: robust normalization, gamma, rescale to a 10 px cell width, shape index at 3 scales.

Two forms of one recipe: ``features_np`` for a whole image in memory, ``features`` for a Dask array of any
size, computed chunk by chunk. The chunked form equals the whole-image form (tested): every filter's halo
comes from its own parameters (Gaussian truncation radius, +1 px per finite difference), and image borders
are padded globally with the same mode the whole-image filters use, so chunk seams never show.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import shape_index
from skimage.transform import rescale as sk_rescale

from hpc_retrain.config import ChannelPrep, PreprocessConfig
from hpc_retrain.errors import HpcRetrainError

# MISIC pads this much (numpy 'reflect') before the shape index, then lets the filter see zeros beyond.
MISIC_PAD = 8
SCALED_WIDTH = 10.0  # MISIC rescales every image so that cells are this wide
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default, used by skimage


class ImageError(HpcRetrainError, ValueError):
    """An image that cannot be preprocessed; the message names the source and the problem."""


def gaussian_radius(sigma: float) -> int:
    return int(_TRUNCATE * float(sigma) + 0.5)


def shape_index_halo(sigmas) -> int:
    # Gaussian support plus one pixel for each of the two np.gradient passes of the Hessian.
    return gaussian_radius(max(sigmas)) + 2


# ------------------------------------------------------------------------------------------ checks
def check_image(im, source: str = "image") -> None:
    """Reject what would otherwise crash deep in a graph or silently give empty labels."""
    if im.ndim != 2:
        raise ImageError(f"{source}: expected a 2-D image, got shape {im.shape}")
    if im.dtype.kind not in "uif":
        raise ImageError(f"{source}: unsupported pixel type {im.dtype}")
    if min(im.shape) < 16:
        raise ImageError(f"{source}: image {im.shape} is too small to segment")


MIN_SCALED = 16  # px: the smallest rescaled image (either side) worth segmenting
# Bytes per pixel of the rescaled image an in-memory field needs at once: the float64 rescale and its
# padded copy, the three float32 shape-index channels and the filters' float64 temporaries.
BYTES_PER_SCALED_PX = 64


def check_scaled(shape, scale: float, source: str = "image", in_memory: bool = True) -> tuple[int, int]:
    """The rescaled shape of an image of ``shape``; ImageError when it would be too small to segment, or (for
    an image processed whole, ``in_memory``) need more memory than the machine has available, before
    allocating it."""
    out = rescaled_shape(tuple(shape), scale)
    width = f"preprocess.mean_width {10 / scale:.3g} px" if scale > 0 else "preprocess.mean_width"
    if min(out) < MIN_SCALED:
        raise ImageError(f"{source}: {tuple(shape)} px scaled by {scale:g} (10 / {width}) is {out} px, too small "
                         f"to segment; check {width.split()[0]} (the cells' width in pixels)")
    need = out[0] * out[1] * BYTES_PER_SCALED_PX
    have = available_memory() if in_memory else None
    if have is not None and need > have:
        raise ImageError(f"{source}: {tuple(shape)} px scaled by {scale:g} (10 / {width}) is {out} px and needs "
                         f"about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available; check "
                         f"{width.split()[0]} (the cells' width in pixels) or lower compute.chunk")
    return out


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def intensity_range(im, percentiles, source: str = "image") -> tuple[float, float]:
    """Exact percentiles (integer images: from a full histogram, so chunking cannot change them)."""
    lo_p, hi_p = percentiles
    if isinstance(im, da.Array):
        if im.dtype.kind in "ui" and im.dtype.itemsize <= 2:
            nbins = int(np.iinfo(im.dtype).max) + 1
            hist = im.map_blocks(lambda b: np.bincount(b.ravel(), minlength=nbins)[None, None, :],
                                 dtype=np.int64, chunks=(1, 1, nbins), new_axis=2).sum(axis=(0, 1))
            hist = hist.compute()
            lo, hi = _hist_percentiles(hist, lo_p, hi_p)
        else:
            finite = da.isfinite(im)
            n_bad = int((~finite).sum().compute())
            if n_bad:
                raise ImageError(f"{source}: {n_bad} pixels are NaN or infinite")
            lo, hi = (float(v) for v in da.percentile(im.ravel(), [lo_p, hi_p], internal_method="tdigest").compute())
            vmin, vmax = dask.compute(im.min(), im.max())
            return _checked_range(lo, hi, float(vmin), float(vmax), source)
        vmin, vmax = float(np.flatnonzero(hist)[0]), float(np.flatnonzero(hist)[-1])
        return _checked_range(lo, hi, vmin, vmax, source)
    im = np.asarray(im)
    if im.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(im)))
        if n_bad:
            raise ImageError(f"{source}: {n_bad} pixels are NaN or infinite")
    lo, hi = (float(v) for v in np.percentile(im, [lo_p, hi_p]))
    return _checked_range(lo, hi, float(im.min()), float(im.max()), source)


def _hist_percentiles(hist: np.ndarray, lo_p: float, hi_p: float) -> tuple[float, float]:
    # Matches np.percentile's default linear interpolation on the sorted values.
    cdf = np.cumsum(hist)
    n = int(cdf[-1])

    def value_at(k: int) -> int:
        return int(np.searchsorted(cdf, k + 1))

    out = []
    for p in (lo_p, hi_p):
        pos = (n - 1) * p / 100.0
        k = int(math.floor(pos))
        frac = pos - k
        a = value_at(k)
        b = value_at(min(k + 1, n - 1))
        out.append(a + (b - a) * frac)
    return out[0], out[1]


def _checked_range(lo, hi, vmin, vmax, source):
    if vmax == vmin:
        raise ImageError(f"{source}: constant image (every pixel is {vmin:g}); nothing to segment")
    if hi <= lo:
        # Mostly constant with a few outliers: fall back to the full range rather than divide by zero.
        lo, hi = vmin, vmax
    return lo, hi


def normalize(x, lo: float, hi: float):
    """Map [lo, hi] to [0, 1], clipped: gamma needs non-negative input, outliers must not dominate."""
    if not isinstance(x, np.ndarray):
        return ((x.astype(np.float64) - lo) / (hi - lo)).clip(0.0, 1.0)
    y = x.astype(np.float64)  # the same operations in place: one float64 copy instead of three
    y -= lo
    y /= hi - lo
    return np.clip(y, 0.0, 1.0, out=y)


# ------------------------------------------------------------------------------------------ whole image
def prepare_np(im: np.ndarray, prep: ChannelPrep, scale: float, source: str = "image") -> np.ndarray:
    """Normalize, gamma, rescale one in-memory image (float64)."""
    check_image(im, source)
    if scale != 1.0:
        check_scaled(im.shape, scale, source)  # before anything is allocated
    lo, hi = intensity_range(im, prep.percentiles, source)
    x = normalize(im, lo, hi)
    if prep.gamma != 1.0:
        x = x ** prep.gamma
    if scale != 1.0:
        x = sk_rescale(x, scale, order=1, mode="reflect", preserve_range=True)
    return x


def shape_index_np(x: np.ndarray, sigmas, light_background: bool) -> np.ndarray:
    """MISIC's three-scale shape index (H, W, 3) float32; negated for dark cells on a bright background."""
    p = np.pad(x, MISIC_PAD, mode="reflect")
    out = np.empty(x.shape + (len(sigmas),), np.float32)
    sl = (slice(MISIC_PAD, -MISIC_PAD),) * 2
    for i, s in enumerate(sigmas):
        out[..., i] = _shape_index(p, s)[sl]
    return -out if light_background else out


def _shape_index(x: np.ndarray, sigma: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        s = shape_index(x, sigma, mode="constant", cval=0)
    # Flat regions have an undefined shape index (0/0); MISIC's inputs there are effectively "no shape".
    return np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def features_np(im: np.ndarray, prep: ChannelPrep, cfg: PreprocessConfig, source: str = "image") -> np.ndarray:
    x = prepare_np(np.asarray(im), prep, cfg.scale, source)
    return shape_index_np(x, cfg.sigmas, prep.light_background)


# ------------------------------------------------------------------------------------------ chunked
def rescaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return tuple(max(int(round(scale * n)), 1) for n in shape)  # type: ignore[return-value]


def rescale(x: da.Array, scale: float, chunk: int = 2048) -> da.Array:
    """skimage.transform.rescale(order=1, mode='reflect') of a Dask array, block by block, same values."""
    if scale == 1.0:
        return x
    in_shape = x.shape
    out_shape = rescaled_shape(in_shape, scale)
    factors = [i / o for i, o in zip(in_shape, out_shape)]
    if any(f > 1 for f in factors):
        # skimage's anti-aliasing before downsampling ('mirror' borders == numpy 'reflect' padding)
        aa = [max(0.0, (f - 1) / 2) for f in factors]
        depth = max(gaussian_radius(s) for s in aa) + 1
        x = _filter(x, lambda b: ndi.gaussian_filter(b, aa, mode="mirror"), depth, "reflect")
    x = x.rechunk(chunk)
    rows = _out_blocks(out_shape[0], chunk)
    cols = _out_blocks(out_shape[1], chunk)
    blocks = []
    for r0, r1 in rows:
        line = []
        ra, rb = _in_window(r0, r1, factors[0], in_shape[0])
        for c0, c1 in cols:
            ca, cb = _in_window(c0, c1, factors[1], in_shape[1])
            part = dask.delayed(_zoom_window)(x[ra:rb, ca:cb], (r0, r1), (c0, c1), (ra, ca), factors)
            line.append(da.from_delayed(part, shape=(r1 - r0, c1 - c0), dtype=np.float64))
        blocks.append(line)
    return da.block(blocks)


def _out_blocks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _in_window(o0: int, o1: int, factor: float, n_in: int) -> tuple[int, int]:
    lo = (o0 + 0.5) * factor - 0.5
    hi = (o1 - 0.5) * factor - 0.5
    # two extra pixels: one for linear interpolation, one so 'mirror' at a true image edge has its neighbour
    return max(int(math.floor(lo)) - 2, 0), min(int(math.ceil(hi)) + 3, n_in)


_ZOOM_ROWS = 128


def _zoom_window(win: np.ndarray, rows, cols, origin, factors) -> np.ndarray:
    rr = (np.arange(rows[0], rows[1]) + 0.5) * factors[0] - 0.5 - origin[0]
    cc = (np.arange(cols[0], cols[1]) + 0.5) * factors[1] - 0.5 - origin[1]
    # Coordinates past the window only occur at true image edges, where 'mirror' is what ndi.zoom does.
    win = np.asarray(win, np.float64)
    out = np.empty((len(rr), len(cc)), np.float64)
    # Bands of rows: order 1 has no prefilter, each output pixel reads only its 2 x 2 neighbours, so this is the
    # whole call's result without two float64 coordinate arrays of the window's full size.
    for i in range(0, len(rr), _ZOOM_ROWS):
        coords = np.meshgrid(rr[i:i + _ZOOM_ROWS], cc, indexing="ij")
        out[i:i + _ZOOM_ROWS] = ndi.map_coordinates(win, coords, order=1, mode="mirror")
    return out


def _filter(x: da.Array, func, depth: int, pad_mode: str, **pad_kw) -> da.Array:
    """Apply a neighbourhood filter blockwise with exact results: pad globally, overlap, crop."""
    p = da.pad(x, depth, mode=pad_mode, **pad_kw)
    p = p.rechunk(tuple(max(c, depth) for c in _chunk_edge(x)))
    y = p.map_overlap(func, depth=depth, boundary="none", dtype=np.float64)
    return y[depth:-depth, depth:-depth]


def _chunk_edge(x: da.Array) -> tuple[int, int]:
    return tuple(max(c) for c in x.chunks)  # type: ignore[return-value]


def shape_index_lazy(x: da.Array, sigmas, light_background: bool) -> da.Array:
    """The chunked twin of ``shape_index_np`` (H, W, 3) float32."""
    halo = shape_index_halo(sigmas)
    # MISIC: reflect-pad 8 px, then the filters see zeros beyond; reproduced globally, then blockwise.
    p = da.pad(x, MISIC_PAD, mode="reflect")
    p = da.pad(p, halo, mode="constant", constant_values=0.0)
    p = p.rechunk(tuple(max(c, halo) for c in _chunk_edge(x)))
    crop = MISIC_PAD + halo
    chans = []
    for s in sigmas:
        y = p.map_overlap(_shape_index, depth=halo, boundary="none", dtype=np.float64, sigma=s)
        chans.append(y[crop:-crop, crop:-crop].astype(np.float32))
    out = da.stack(chans, axis=-1)
    return -out if light_background else out


def features(im: da.Array, prep: ChannelPrep, cfg: PreprocessConfig, chunk: int = 2048,
             source: str = "image") -> da.Array:
    """Lazy MISIC features of an image of any size: (round(H*scale), round(W*scale), 3) float32."""
    if not isinstance(im, da.Array):
        im = da.from_array(np.asarray(im), chunks=chunk)
    check_image(im, source)
    check_scaled(im.shape, cfg.scale, source, in_memory=False)  # block by block: any size fits
    lo, hi = intensity_range(im, prep.percentiles, source)
    x = normalize(im, lo, hi)
    if prep.gamma != 1.0:
        x = x ** prep.gamma
    x = rescale(x, cfg.scale, chunk=chunk)
    return shape_index_lazy(x.rechunk(chunk), cfg.sigmas, prep.light_background)
