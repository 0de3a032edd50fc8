"""Tiled inference: a field or a scan of any size -> (body, contour) probabilities and instance labels.

Pipeline, the same as training's: brightfield features (``preprocess``), 256 px tiles in the rescaled space,
the model in batches, tiles put back together, probabilities resized to the original pixel grid (as MISIC
does, ``skimage.transform.resize`` order 1), then MISIC-style watershed instances (``instances``).

Two ways to put tiles back together:
- ``stitch``: MISIC's crop-and-stitch (each tile's centre, margins dropped); equals the misic package's
  own ``extract_tiles`` + ``predict`` + ``stitch_tiles`` (tested to 1e-4);
- ``blend``: the same tiles, but every pixel of each tile counts, weighted by a window that ramps as
  sin^2 over the tiles' overlap (weights of neighbouring tiles sum to one there), so no seams show.

Fields larger than ``compute.chunk`` (``blocks.is_large``) are processed in bounded memory with the block
engine (``blocks``) and give the whole-image result: tiles are predicted in blocks aligned to the tile
stride (so every tile is exactly the whole-image tiling's tile, reflect padding at the true image edges
included), from features computed for each block's window only (``targets.ScanFeatures``), into a
temporary Zarr array; the resize reads windows with the anti-aliasing and interpolation halo
(``blocks.rescale_window``); instances are labelled per window with a halo and joined across seams.
Results go straight into the output Zarr arrays.

A plate goes through ``segment`` (the stage), which writes into the plate ``outputs`` describes.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from hpc_retrain.config import MODES, ChannelPrep, RunConfig
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.imaging import blocks as B
from hpc_retrain.imaging import preprocess as P
from hpc_retrain.imaging import tiling as T
from hpc_retrain.inference import instances as I
from hpc_retrain.prepare import targets as TG

# Tiles per TensorFlow call on a CPU: each tile in flight holds ~80 MB of activations, and larger batches are
# no faster there (1, 2, 8 timed the same on 2 cores, outputs bit-identical), so more only costs memory.
CPU_BATCH = 1


class InferError(HpcRetrainError, ValueError):
    """An inference request that cannot run as asked; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ model
class Predictor:
    """The model on its engine (``compute.engine``, see ``hpc_retrain.inference.engine``), tiles in batches of ``batch_size``:
    OpenVINO compiled once per model (CPU, TensorFlow backend only), or Keras on its backend compiled once
    (``backend.predict_function``: TensorFlow as one traced function with a dynamic batch, no retracing and
    none of ``predict``'s per-call pipeline set-up; JAX jit-compiled; PyTorch without autograd). ``engine``:
    the one it runs on ("openvino", or the Keras backend: "tensorflow", "jax", "torch"), for provenance;
    ``requested``: the ``compute.engine`` value asked for. Without a GPU it takes ``CPU_BATCH`` tiles per call
    whatever ``batch_size`` says (``step``)."""

    def __init__(self, model, batch_size: int = 8, tile: int = 256, engine: str = "auto"):
        from hpc_retrain.inference import engine as E
        from hpc_retrain.inference.model import ModelError, check_io

        if isinstance(model, Predictor):
            model = model.model
        check_io(model, tile, source=getattr(model, "name", "model"))
        if model.output_shape[-1] < 2:
            raise ModelError(f"{model.name}: the model outputs {model.output_shape[-1]} channel(s); "
                             f"segmenting needs two (body, contour)")
        self.model, self.batch_size, self.tile = model, int(batch_size), int(tile)
        self.channels = int(model.output_shape[-1])
        self.requested = engine
        self.engine, self._ov = E.for_model(model, engine, self.tile)
        self._fn, self.step, self._pad = None, self.batch_size, False
        if self._ov is None:
            from hpc_retrain.inference import backend

            self._fn = backend.predict_function(model)
            # jax.jit compiles once per batch shape: a short last batch is padded to the step instead.
            self._pad = self.engine == "jax"
            if not E.gpu_visible():
                self.step = min(self.batch_size, CPU_BATCH)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        out = np.empty((n, self.tile, self.tile, 2), np.float32)
        for i in range(0, n, self.step):
            batch = np.ascontiguousarray(tiles[i:i + self.step], np.float32)
            k = len(batch)
            if self._pad and k < self.step:
                batch = np.concatenate([batch, np.zeros((self.step - k,) + batch.shape[1:], np.float32)])
            y = self._ov(batch) if self._ov is not None else self._fn(batch)
            out[i:i + k] = y[:k, ..., :2]
        return out


_PREDICTORS: dict[tuple, Predictor] = {}  # the last few (model, batch, tile, engine): traced/compiled once


def predictor_for(model, batch_size: int = 8, tile: int = 256, engine: str = "auto") -> Predictor:
    """The ``Predictor`` of ``model`` with these settings, made once (labels call this for every block)."""
    key = (id(model), int(batch_size), int(tile), engine)
    hit = _PREDICTORS.get(key)
    if hit is None or hit.model is not model:
        while len(_PREDICTORS) >= 4:
            _PREDICTORS.pop(next(iter(_PREDICTORS)))
        hit = _PREDICTORS[key] = Predictor(model, batch_size, tile, engine)
    return hit


def as_predictor(model, cfg: RunConfig) -> Predictor:
    """``model`` as a ``Predictor`` with ``cfg``'s compute settings: itself when it is one already."""
    if (isinstance(model, Predictor) and model.batch_size == cfg.compute.batch_size
            and cfg.compute.engine in (model.requested, model.engine)):
        return model
    return predictor_for(model.model if isinstance(model, Predictor) else model, cfg.compute.batch_size, cfg.tiling.size,
                         cfg.compute.engine)


# ------------------------------------------------------------------------------------------ tiles
def blend_window(size: int, margin: int) -> np.ndarray:
    """1-D weights: sin^2 ramps over the 2*margin overlap, 1 between; overlapping ramps sum to one."""
    w = np.ones(size, np.float32)
    ramp = 2 * margin
    if ramp:
        r = np.sin(np.pi / 2 * (np.arange(ramp) + 0.5) / ramp) ** 2
        w[:ramp] = r
        w[-ramp:] = r[::-1]
    return w


class ScaledResult:
    """Stitched (or blended) probabilities in the rescaled space, in memory or in a Zarr array.

    Blend keeps weighted sums and the weight sum (3 channels) and divides on reading; blocks that share
    an overlap add into it one after the other.
    """

    def __init__(self, shape: tuple[int, int], mode: str, store=None):
        self.shape, self.mode = shape, mode
        nc = 3 if mode == "blend" else 2
        if store is None:
            self.acc = np.zeros(shape + (nc,), np.float32)
        else:
            import zarr

            self.acc = zarr.create_array(store, shape=shape + (nc,), dtype=np.float32, fill_value=0,
                                         chunks=(1024, 1024, nc), compressors=None, overwrite=True)

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        a = np.asarray(self.acc[r0:r1, c0:c1])
        if self.mode != "blend":
            return a
        w = a[..., 2:3]
        return np.divide(a[..., :2], w, out=np.zeros_like(a[..., :2]), where=w > 0)


def predict_block(predict: Predictor, feats, grid: T.TileGrid, rows: tuple[int, int], cols: tuple[int, int],
                  out: ScaledResult, mode: str, index: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Predict tiles ``rows`` x ``cols`` (tile numbers) of ``grid`` over ``feats`` and add them to ``out``."""
    tiles = block_tiles(feats, grid, rows, cols, index)
    add_block(predict(tiles), grid, rows, cols, out, mode)


def block_tiles(feats, grid: T.TileGrid, rows: tuple[int, int], cols: tuple[int, int],
                index: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The model's input for tiles ``rows`` x ``cols`` (tile numbers) of ``grid`` over ``feats``, row by row."""
    s, m, size = grid.stride, grid.margin, grid.size
    (i0, i1), (j0, j1) = rows, cols
    ri, ci = index or TG.canvas_index(grid)
    # The smallest feature window behind this part of the canvas, indexed into canvas order.
    canvas = B.take(feats, ri[i0 * s:i1 * s + 2 * m], ci[j0 * s:j1 * s + 2 * m]).astype(np.float32, copy=False)
    pos = [(a * s, b * s) for a in range(i1 - i0) for b in range(j1 - j0)]
    return np.stack([canvas[r:r + size, c:c + size] for r, c in pos])


def add_block(pred: np.ndarray, grid: T.TileGrid, rows: tuple[int, int], cols: tuple[int, int],
              out: ScaledResult, mode: str) -> None:
    """The model's output ``pred`` for ``block_tiles(..., rows, cols)`` stitched (or blended) into ``out``."""
    s, m, size = grid.stride, grid.margin, grid.size
    (i0, i1), (j0, j1) = rows, cols
    pos = [(a * s, b * s) for a in range(i1 - i0) for b in range(j1 - j0)]
    h, w = grid.shape
    if mode == "stitch":
        block = np.zeros(((i1 - i0) * s, (j1 - j0) * s, 2), np.float32)
        for t, (r, c) in zip(pred, pos):
            block[r:r + s, c:c + s] = t[m:m + s, m:m + s]
        r0, c0 = i0 * s, j0 * s
        r1, c1 = min(i1 * s, h), min(j1 * s, w)
        out.acc[r0:r1, c0:c1] = block[:r1 - r0, :c1 - c0]
        return
    wy = blend_window(size, m)
    w2 = (wy[:, None] * wy[None, :])[..., None]
    acc = np.zeros(((i1 - i0 - 1) * s + size, (j1 - j0 - 1) * s + size, 3), np.float32)
    for t, (r, c) in zip(pred, pos):
        acc[r:r + size, c:c + size, :2] += t * w2
        acc[r:r + size, c:c + size, 2:] += w2
    # canvas row k of this block is image row i0*s + k - m
    r0, c0 = max(i0 * s - m, 0), max(j0 * s - m, 0)
    r1, c1 = min(i1 * s + m, h), min(j1 * s + m, w)
    part = acc[r0 - (i0 * s - m):r1 - (i0 * s - m), c0 - (j0 * s - m):c1 - (j0 * s - m)]
    if isinstance(out.acc, np.ndarray):
        out.acc[r0:r1, c0:c1] += part
    else:
        out.acc[r0:r1, c0:c1] = np.asarray(out.acc[r0:r1, c0:c1]) + part


def field_blocks(grid: T.TileGrid) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(tile rows, tile cols) of each block a whole field is predicted in: whole tile rows, at most 64 tiles
    (or one row), so a wide image's tile stack stays small."""
    r, c = grid.rows_cols
    step = max(1, 64 // max(c, 1))
    return [((i, min(i + step, r)), (0, c)) for i in range(0, r, step)]


def predict_scaled(predict: Predictor, feats: np.ndarray, cfg: RunConfig, mode: str) -> np.ndarray:
    """Probabilities (h, w, 2) of a whole feature image, in its (rescaled) space."""
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
    out = ScaledResult(grid.shape, mode)
    for rows, cols in field_blocks(grid):
        predict_block(predict, feats, grid, rows, cols, out, mode)
    return out.read(0, grid.shape[0], 0, grid.shape[1])


# ------------------------------------------------------------------------------------------ resize
def resize_to(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back to the original grid, as MISIC: ``skimage.transform.resize(yp, (H, W, C))``, order 1."""
    from skimage.transform import resize

    if tuple(prob.shape[:2]) == tuple(shape):
        return prob.astype(np.float32, copy=False)
    if prob.ndim == 2:
        return resize(prob, tuple(shape), order=1).astype(np.float32, copy=False)
    # One channel at a time: the same values bit for bit (the channel axis is not zoomed, its weights are 1
    # and 0), in ~40% of the CPU time of one 3-D zoom, which interpolates over the channel axis too.
    out = np.empty(tuple(shape) + prob.shape[2:], np.float32)
    for c in range(prob.shape[-1]):
        out[..., c] = resize(prob[..., c], tuple(shape), order=1)
    return out


def resize_window(src: ScaledResult, out_shape: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> np.ndarray:
    """Rows/cols of ``resize_to(whole, out_shape)`` computed from a window of the scaled result only."""
    return B.rescale_window(src.read, src.shape, out_shape, rows, cols, np.float32)


# ------------------------------------------------------------------------------------------ fields
def field_features(image, cfg: RunConfig, prep: ChannelPrep | None = None, source: str = "image") -> np.ndarray:
    """Whole-field features (h, w, 3) float32 in memory."""
    prep = prep or cfg.preprocess.brightfield
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    return P.features_np(image, prep, cfg.preprocess, source=source)


def predict_features(model, feats: np.ndarray, shape: tuple[int, int], cfg: RunConfig,
                     mode: str | None = None) -> np.ndarray:
    mode = _mode(mode, cfg)
    return resize_to(predict_scaled(as_predictor(model, cfg), feats, cfg, mode), shape)


def predict_field(model, image, cfg: RunConfig, mode: str | None = None, prep: ChannelPrep | None = None,
                  source: str = "image") -> np.ndarray:
    """Probabilities (H, W, 2) float32 (body, contour) at the image's own resolution.

    ``image``: a 2-D NumPy or Dask array of one field that fits in memory; ``prep``: the channel's
    preprocessing (default: brightfield). Scans of any size: :func:`segment_scan`.
    """
    feats = field_features(image, cfg, prep, source)
    return predict_features(model, feats, tuple(image.shape), cfg, mode)


def segment_field(model, image, cfg: RunConfig, mode: str | None = None, prep: ChannelPrep | None = None,
                  source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (H, W, 2) float32, instance labels (H, W) int32) of one in-memory field."""
    prob = predict_field(model, image, cfg, mode, prep, source)
    return prob, I.instances(prob, cfg)


def segment_fields(model, images, cfg: RunConfig, mode: str | None = None, prep: ChannelPrep | None = None,
                   sources=None, depth: int = 2):
    """(probabilities, labels) of each in-memory field of ``images``, in order, the model fed continuously:
    three threads joined by queues of ``depth`` items (``stages``): one computes each field's features and
    cuts its blocks of tiles, one runs the model on block after block, one stitches them and, at each
    field's last block, resizes and labels the field's instances; the caller gets each field's result while
    the model runs on the next (so its writes are off the model's path too). Results equal
    :func:`segment_field`'s bit for bit (the same blocks, in the same order)."""
    from hpc_retrain.inference.stages import staged

    predict = as_predictor(model, cfg)
    mode = _mode(mode, cfg)
    images = list(images)
    sources = list(sources) if sources is not None else [f"field {i}" for i in range(len(images))]

    def cut():  # features and tiles of each block, field after field
        for k, (image, source) in enumerate(zip(images, sources)):
            feats = field_features(image, cfg, prep, source)
            grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
            index = TG.canvas_index(grid)
            blocks = field_blocks(grid)
            for b, (rows, cols) in enumerate(blocks):
                yield k, grid, rows, cols, b + 1 == len(blocks), block_tiles(feats, grid, rows, cols, index)
            del feats

    def run_model(item):
        *head, tiles = item
        yield *head, predict(tiles)

    scaled: dict[int, ScaledResult] = {}

    def finish(item):  # stitch; at a field's last block, its probabilities and instances
        k, grid, rows, cols, last, pred = item
        out = scaled.setdefault(k, ScaledResult(grid.shape, mode))
        add_block(pred, grid, rows, cols, out, mode)
        if last:
            del scaled[k]
            prob = resize_to(out.read(0, grid.shape[0], 0, grid.shape[1]), tuple(np.shape(images[k])))
            yield prob, I.instances(prob, cfg)

    yield from staged(cut(), run_model, finish, depth=depth, name="segment")


def _mode(mode: str | None, cfg: RunConfig) -> str:
    mode = mode or cfg.infer.mode
    if mode not in MODES:
        raise InferError(f"unknown inference mode {mode!r}; use one of {MODES}")
    return mode


# ------------------------------------------------------------------------------------------ scans
def segment_scan(model, image, cfg: RunConfig, prob_out, labels_out, mode: str | None = None,
                 prep: ChannelPrep | None = None, chunk: int | None = None, tmpdir: str | Path | None = None,
                 source: str = "image", progress=None) -> int:
    """Segment a field of any size chunk by chunk into ``prob_out`` (2, H, W) and ``labels_out`` (H, W).

    ``image`` is a 2-D (Dask) array; the outputs are Zarr (or NumPy) arrays written block by block.
    Returns the number of cells. Results equal :func:`segment_field`'s where both fit.
    """
    import dask.array as da

    mode = _mode(mode, cfg)
    prep = prep or cfg.preprocess.brightfield
    chunk = int(chunk or cfg.compute.chunk)
    predict = as_predictor(model, cfg)
    if not isinstance(image, da.Array):
        image = da.from_array(image, chunks=chunk)
    H, W = image.shape
    # Features are computed per block of tiles from the pixels behind it (no whole-scan graph or copy).
    feats = TG.ScanFeatures(image, prep, cfg, source)
    grid = T.TileGrid(feats.shape, cfg.tiling.size, cfg.tiling.margin)
    # Blocks of k x k tiles cover about one chunk of the original image.
    k = max(1, math.ceil(chunk * cfg.preprocess.scale / grid.stride))
    index = TG.canvas_index(grid)
    with tempfile.TemporaryDirectory(prefix="hpc-retrain-infer-", dir=tmpdir) as tmp:
        scaled = ScaledResult(grid.shape, mode, store=f"{tmp}/scaled")
        for t in B.blocks(grid.rows_cols, k):
            predict_block(predict, feats, grid, t.rows, t.cols, scaled, mode, index)
        for b in B.blocks((H, W), chunk):
            prob_out[(slice(None),) + b.core] = np.moveaxis(resize_window(scaled, (H, W), b.rows, b.cols), -1, 0)
            if progress:
                progress()
    return I.label_scan(prob_out, labels_out, cfg, chunk)
