"""Tiled inference: a field or a scan of any size -> (body, contour) probabilities and instance labels.

Pipeline, the same as training's: brightfield features (``preprocess``), 256 px tiles in the rescaled space,
the model in batches, tiles put back together, probabilities resized to the original pixel grid (as MISIC
does, ``skimage.transform.resize`` order 1), then MISIC-style watershed instances (``instances``).

Two ways to put tiles back together:
- ``stitch``: MISIC's crop-and-stitch (each tile's centre, margins dropped); equals the misic package's
  own ``extract_tiles`` + ``predict`` + ``stitch_tiles`` (tested to 1e-4);
- ``blend``: the same tiles, but every pixel of each tile counts, weighted by a window that ramps as
  sin^2 over the tiles' overlap (weights of neighbouring tiles sum to one there), so no seams show.

Fields larger than ``infer.chunk`` are processed in bounded memory and give the whole-image result:
features are written once to a temporary Zarr array; tiles are predicted in blocks aligned to the tile
stride (so every tile is exactly the whole-image tiling's tile, reflect padding at the true image edges
included); the resize reads windows with the anti-aliasing and interpolation halo; instances are labelled
per window with a halo and joined across seams. Results go straight into the output Zarr arrays.

The ``segment`` command writes each field's result so that a killed run never leaves one that looks
finished. The completion marker is the label group's ``hpc_retrain`` attributes (``labels/<name>``):
set to ``{"complete": false}`` before any array of the result changes, and replaced, as the field's very last
write, by the provenance (model, its sha256, mode, channel, config), the ``cells`` count and
``"complete": true`` (the probabilities get their provenance just before). Zarr writes a group's attributes
in one atomic file replacement, so a field is either marked finished or it is not; ``ngff.is_complete``
reads the marker, a rerun redoes unfinished fields without ``--overwrite`` ("redoing N incomplete
field(s)") and ``evaluate`` refuses them. A rerun with the same settings keeps finished fields; with other
settings it refuses unless ``--overwrite`` (or another ``--name``).

Fields that cannot be segmented (unreadable, NaN pixels, constant such as all zeros) are skipped with one
line each, like ``prepare`` flags them; the run exits 0 when other fields were segmented, else 1. With
``--wells`` (one well per job-array task) only the fields asked for are checked and written, and a TIFF
plate's output OME-Zarr plate is made once, for every field, atomically (built under a temporary name,
renamed into place under a lock of its folder). Temporary folders are named
``hpc-retrain-infer-<pid>@<host>-*``; a later run removes those whose process is dead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from hpc_retrain import instances as I
from hpc_retrain import ngff
from hpc_retrain import preprocess as P
from hpc_retrain import tiling as T
from hpc_retrain.config import ChannelPrep, RunConfig

log = logging.getLogger(__name__)

MODES = ("stitch", "blend")
PROB_GROUP = "probabilities"  # <field>/probabilities/<name>: the (body, contour) maps as an NGFF image
PROB_CHANNELS = ("body", "contour")


class InferError(ValueError):
    """An inference request that cannot run as asked; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ model
class Predictor:
    """The model on its engine (``infer.engine``, see ``hpc_retrain.engine``), tiles in batches of ``batch_size``:
    OpenVINO compiled once per model (CPU), or TensorFlow as one traced function with a dynamic batch (no
    retracing and none of ``predict``'s per-call pipeline set-up). ``engine``: the one it runs on
    ("tensorflow" or "openvino"), for provenance; ``requested``: the ``infer.engine`` value asked for."""

    def __init__(self, model, batch_size: int = 8, tile: int = 256, engine: str = "auto"):
        from hpc_retrain import engine as E
        from hpc_retrain.model import ModelError, check_io

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
        self._fn = None
        if self._ov is None:
            import tensorflow as tf

            spec = tf.TensorSpec([None, tile, tile, 3], tf.float32)
            self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        out = np.empty((n, self.tile, self.tile, 2), np.float32)
        for i in range(0, n, self.batch_size):
            batch = np.ascontiguousarray(tiles[i:i + self.batch_size], np.float32)
            y = self._ov(batch) if self._ov is not None else self._fn(batch).numpy()
            out[i:i + len(batch)] = y[..., :2]
        return out


def as_predictor(model, cfg: RunConfig) -> Predictor:
    if (isinstance(model, Predictor) and model.batch_size == cfg.infer.batch_size
            and cfg.infer.engine in (model.requested, model.engine)):
        return model
    return Predictor(model, cfg.infer.batch_size, cfg.tiling.size, cfg.infer.engine)


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


def canvas_index(n: int, grid: T.TileGrid, axis: int) -> np.ndarray:
    """Feature row (or column) behind every canvas row of ``tiling.pad_for_tiles``: reflect to whole strides,
    then the margin, exactly as np.pad does it, so windows of the canvas can be read without building it."""
    idx = np.arange(n)
    idx = np.pad(idx, (0, grid.padded_shape[axis] - n), mode="reflect")
    return np.pad(idx, grid.margin, mode="reflect")


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
    s, m, size = grid.stride, grid.margin, grid.size
    (i0, i1), (j0, j1) = rows, cols
    ri, ci = index or (canvas_index(grid.shape[0], grid, 0), canvas_index(grid.shape[1], grid, 1))
    ri, ci = ri[i0 * s:i1 * s + 2 * m], ci[j0 * s:j1 * s + 2 * m]
    # Read the smallest feature window behind this part of the canvas, then index it into canvas order.
    win = np.asarray(feats[ri.min():ri.max() + 1, ci.min():ci.max() + 1], np.float32)
    canvas = win[ri - ri.min()][:, ci - ci.min()]
    pos = [(a * s, b * s) for a in range(i1 - i0) for b in range(j1 - j0)]
    tiles = np.stack([canvas[r:r + size, c:c + size] for r, c in pos])
    pred = predict(tiles)
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
    acc = np.zeros(canvas.shape[:2] + (3,), np.float32)
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


def predict_scaled(predict: Predictor, feats: np.ndarray, cfg: RunConfig, mode: str) -> np.ndarray:
    """Probabilities (h, w, 2) of a whole feature image, in its (rescaled) space."""
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
    out = ScaledResult(grid.shape, mode)
    r, c = grid.rows_cols
    # Blocks of whole tile rows keep the tile stack small for wide images.
    step = max(1, 64 // max(c, 1))
    for i in range(0, r, step):
        predict_block(predict, feats, grid, (i, min(i + step, r)), (0, c), out, mode)
    return out.read(0, grid.shape[0], 0, grid.shape[1])


# ------------------------------------------------------------------------------------------ resize
def resize_to(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Back to the original grid, as MISIC: ``skimage.transform.resize(yp, (H, W, C))``, order 1."""
    from skimage.transform import resize

    if tuple(prob.shape[:2]) == tuple(shape):
        return prob.astype(np.float32, copy=False)
    return resize(prob, tuple(shape) + prob.shape[2:], order=1).astype(np.float32, copy=False)


def resize_window(src: ScaledResult, out_shape: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> np.ndarray:
    """Rows/cols of ``resize_to(whole, out_shape)`` computed from a window of the scaled result only."""
    in_shape = src.shape
    factors = [i / o for i, o in zip(in_shape, out_shape)]
    down = any(o < i for i, o in zip(in_shape, out_shape))
    sigma = [max(0.0, (f - 1) / 2) if down else 0.0 for f in factors]
    win = []
    for (o0, o1), f, n, sg in zip((rows, cols), factors, in_shape, sigma):
        a, b = P._in_window(o0, o1, f, n)
        g = P.gaussian_radius(sg) + 1 if sg > 0 else 0
        win.append((max(a - g, 0), min(b + g, n)))
    (a0, b0), (a1, b1) = win
    x = src.read(a0, b0, a1, b1)
    res = np.empty((rows[1] - rows[0], cols[1] - cols[0], x.shape[-1]), np.float32)
    for ch in range(x.shape[-1]):
        xc = x[..., ch]
        if down:
            # skimage filters in the input's float type with 'reflect' (= ndimage 'mirror') borders
            xc = ndi.gaussian_filter(xc, sigma, mode="mirror")
        res[..., ch] = P._zoom_window(xc, rows, cols, (a0, a1), factors)
    return res


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
                   sources=None):
    """(probabilities, labels) of each in-memory field of ``images``, in order, as a pipeline: one helper
    thread prepares the next field's features and labels the previous field's instances while the model
    runs on this one (NumPy, SciPy and TensorFlow release the GIL)."""
    predict = as_predictor(model, cfg)
    mode = _mode(mode, cfg)
    images = list(images)
    sources = list(sources) if sources is not None else [f"field {i}" for i in range(len(images))]
    if not images:
        return

    def label(prob):
        return prob, I.instances(prob, cfg)

    with ThreadPoolExecutor(1) as pool:
        feats_next = pool.submit(field_features, images[0], cfg, prep, sources[0])
        labelled = None
        for i, image in enumerate(images):
            feats = feats_next.result()
            if i + 1 < len(images):
                feats_next = pool.submit(field_features, images[i + 1], cfg, prep, sources[i + 1])
            prob = resize_to(predict_scaled(predict, feats, cfg, mode), tuple(image.shape))
            del feats
            if labelled is not None:
                yield labelled.result()
            labelled = pool.submit(label, prob)
        yield labelled.result()


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
    import dask
    import dask.array as da
    import zarr

    mode = _mode(mode, cfg)
    prep = prep or cfg.preprocess.brightfield
    chunk = int(chunk or cfg.infer.chunk)
    predict = as_predictor(model, cfg)
    if not isinstance(image, da.Array):
        image = da.from_array(image, chunks=chunk)
    H, W = image.shape
    with tempfile.TemporaryDirectory(prefix="hpc-retrain-infer-", dir=tmpdir) as tmp:
        feats = P.features(image, prep, cfg.preprocess, chunk=chunk, source=source)
        h, w = feats.shape[:2]
        farr = zarr.create_array(f"{tmp}/features", shape=feats.shape, dtype=np.float32,
                                 chunks=(1024, 1024, 3), compressors=None)
        with dask.config.set(scheduler="threads"):
            da.store(feats, farr, lock=True)
        del feats
        grid = T.TileGrid((h, w), cfg.tiling.size, cfg.tiling.margin)
        # Blocks of k x k tiles cover about one chunk of the original image.
        k = max(1, math.ceil(chunk * cfg.preprocess.scale / grid.stride))
        scaled = ScaledResult((h, w), mode, store=f"{tmp}/scaled")
        index = (canvas_index(h, grid, 0), canvas_index(w, grid, 1))
        nr, nc = grid.rows_cols
        for i in range(0, nr, k):
            for j in range(0, nc, k):
                predict_block(predict, farr, grid, (i, min(i + k, nr)), (j, min(j + k, nc)), scaled, mode, index)
        for r0, r1, c0, c1 in I.blocks((H, W), chunk):
            part = resize_window(scaled, (H, W), (r0, r1), (c0, c1))
            prob_out[:, r0:r1, c0:c1] = np.moveaxis(part, -1, 0)
            if progress:
                progress()
    return I.label_scan(prob_out, labels_out, cfg, chunk)


# ------------------------------------------------------------------------------------------ output
def resolve_model(path: str | Path | None) -> Path:
    """What ``model.load`` would read for ``path`` (for provenance): a model file, or, for a run that is
    not finished, the checkpoint folder it falls back to (see ``model.resolve``)."""
    from hpc_retrain import model as M

    try:
        return M.resolve(path).path
    except M.ModelError:
        return Path(path)


def write_probabilities(field_group, name: str, shape: tuple[int, int], chunk: int, overwrite: bool, **attrs: Any):
    """Create ``<field>/probabilities/<name>``: a (c, y, x) float32 NGFF image of the (body, contour) maps on
    the field image's pixel grid (``ngff.spatial``), listed in ``<field>/probabilities``' ``images``."""
    probs = field_group.require_group(PROB_GROUP)
    grp = probs.require_group(name)
    window = {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}
    arr = ngff.create_image(grp, ngff.spatial(field_group), f"{name} probabilities", (2,) + tuple(shape),
                            np.float32, (1, min(chunk, shape[0]), min(chunk, shape[1])), overwrite=overwrite,
                            omero={"channels": [{"label": c, "window": window} for c in PROB_CHANNELS]})
    ngff.list_result(probs, name)
    if attrs:
        grp.attrs.update(attrs)
    return arr


def existing_results(field_group, name: str) -> list[str]:
    """What of result ``name`` a field holds, finished or not: ``labels/<name>``, ``probabilities/<name>``."""
    found = []
    labels = field_group.get("labels")
    if labels is not None and name in labels:
        found.append("labels/" + name)
    probs = field_group.get(PROB_GROUP)
    if probs is not None and name in probs:
        found.append(f"{PROB_GROUP}/{name}")
    return found


def result_state(field_group, name: str) -> str | None:
    """``"complete"``, ``"incomplete"`` (a segment stopped before its last write: the field is redone) or
    None (nothing of that name). The completion marker is the label group's ``hpc_retrain`` attributes
    (``ngff.is_complete``)."""
    found = existing_results(field_group, name)
    if not found:
        return None
    if "labels/" + name in found and ngff.is_complete(field_group["labels"][name]):
        return "complete"
    return "incomplete"


def _begin_result(field_group, name: str) -> None:
    """Mark ``labels/<name>`` then ``probabilities/<name>`` unfinished before any of their arrays changes (a
    new group is created with the mark in one metadata write)."""
    mark = {"complete": False}
    for parent in ("labels", PROB_GROUP):
        grp = field_group.require_group(parent)
        if name in grp:
            grp[name].attrs[ngff.PROVENANCE] = mark
        else:
            grp.create_group(name, attributes={ngff.PROVENANCE: mark})


def _finish_result(field_group, name: str, provenance: dict, cells: int) -> None:
    """Provenance of the probabilities, then of the labels with the cell count and ``complete``: the last write."""
    field_group[PROB_GROUP][name].attrs[ngff.PROVENANCE] = {**provenance, "complete": True}
    field_group["labels"][name].attrs[ngff.PROVENANCE] = {**provenance, "cells": int(cells), "complete": True}


def _remove_result(field_group, name: str) -> None:
    """Remove result ``name`` of a field (a skipped field keeps nothing of it)."""
    labels = field_group.get("labels")
    if labels is not None:
        ome = dict(labels.attrs.get("ome", {}))
        if name in ome.get("labels", []):
            ome["labels"] = [n for n in ome["labels"] if n != name]
            labels.attrs["ome"] = ome
        if name in labels:
            del labels[name]
    probs = field_group.get(PROB_GROUP)
    if probs is not None:
        if name in probs.attrs.get("images", []):  # the listing that makes it discoverable (ngff.list_result)
            probs.attrs["images"] = [n for n in probs.attrs["images"] if n != name]
        if name in probs:
            del probs[name]


# Settings that do not change a result: a rerun with other values of these still finds its fields done.
# (The engine too: OpenVINO and TensorFlow agree within 1e-5, tests/integration/test_engine.py.)
_NOT_RESULT_SETTINGS = ("infer.batch_size", "infer.chunk", "infer.model", "infer.name", "infer.engine")


def _result_settings(prov) -> dict[str, Any]:
    """What a result depends on, flattened: the model's weights, mode, channel, preprocessing, tiling and the
    post-processing thresholds."""
    out = {k: prov.get(k) for k in ("model_sha256", "channel")}  # the mode: infer.mode

    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                flat(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in _NOT_RESULT_SETTINGS:
                out[f"{prefix}{k}"] = v

    cfg = prov.get("config") or {}
    for sec in ("preprocess", "tiling", "infer"):
        flat(cfg.get(sec) or {}, f"{sec}.")
    return json.loads(json.dumps(out, default=str))


def _settings_differ(old_prov, new: dict[str, Any]) -> list[str]:
    if not isinstance(old_prov, dict) or "config" not in old_prov:
        return ["not written by hpc-retrain segment"]
    old = _result_settings(old_prov)
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------ temporary data
# Temporary folders of a segment (a large field's features and scaled probabilities; an output plate being
# built) are named hpc-retrain-infer-<pid>@<host>-<random> beside the output, so a later run can tell that
# their owner died (kill -9, out of memory, a node lost) and remove them.
TEMP_PREFIX = "hpc-retrain-infer-"
_TEMP_OWNER = re.compile(r"^hpc-retrain-infer-(\d+)@(.+)-[A-Za-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def temp_folder(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}@{_host()}-", dir=parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(parent: Path) -> tuple[list[Path], list[Path]]:
    """Remove ``hpc-retrain-infer-*`` folders in ``parent`` whose owner, a process on this host, is dead.

    Returns (removed, unknown): ``unknown`` are folders of processes on other hosts, or of versions that did
    not record their owner; those are left alone (their owner may still run)."""
    removed, unknown = [], []
    try:
        entries = sorted(p for p in Path(parent).iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_dir())
    except OSError:
        return removed, unknown
    for p in entries:
        m = _TEMP_OWNER.match(p.name)
        if not m or m.group(2) != _host():
            unknown.append(p)
            continue
        if _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        (unknown if p.exists() else removed).append(p)
    return removed, unknown


# ------------------------------------------------------------------------------------------ output plate
def default_output(plate_path: Path) -> Path:
    return Path(str(plate_path).rstrip("/") + ".ome.zarr")


def _output_plate(plate, out: Path | None, fields, chunk: int):
    """The Zarr plate results go into, and the group of each of ``fields`` in it.

    An OME-Zarr input without ``--out`` is written in place. Otherwise the output plate holds every field of
    the plate (images copied), whichever fields this run segments, so that tasks of a job array given one
    well each all find their fields in it. It is created by the first task (see :func:`_create_output`).
    """
    import zarr

    if out is None and plate.layout == "ome-zarr":
        root = zarr.open_group(str(plate.path), mode="r+")
        groups = {(w, str(i)): g for w, i, g in ngff.plate_fields(root)}
        return plate.path, [root[groups[(f.well, f.field)]] for f in fields]
    out = Path(out) if out else default_output(plate.path)
    if not out.exists():
        _create_output(plate, out, chunk)
    try:
        root = zarr.open_group(str(out), mode="r+")
        listed = {(w, i): g for w, i, g in ngff.plate_fields(root)}
    except Exception as e:
        raise InferError(f"{out}: exists and is not an OME-Zarr plate ({e}); choose another --out") from None
    position = _positions(plate.fields)
    groups = []
    for f in fields:
        gpath = listed.get(position[(f.well, f.field)])
        if gpath is None:
            raise InferError(f"{out}: exists but holds no field {f.key}; choose another --out")
        try:
            grp = root[gpath]
        except KeyError:
            raise InferError(f"{out}: lists field {gpath} but it was never written (left by a segment that "
                             f"failed while creating the plate); remove {out} and run again") from None
        src = grp.attrs.get("hpc_retrain_source")
        if isinstance(src, dict) and (src.get("well"), str(src.get("field"))) != (f.well, f.field):
            raise InferError(f"{out}: field {gpath} holds {src.get('well')}/{src.get('field')} of another plate, "
                             f"not {f.key}; choose another --out")
        groups.append(grp)
    return out, groups


def _positions(fields) -> dict[tuple[str, str], tuple[str, int]]:
    """(well, field) -> (NGFF well, field index) in the output plate: fields numbered in plate order per well."""
    count: dict[str, int] = {}
    pos = {}
    for f in fields:
        well = "".join(ngff.split_well(f.well))
        pos[(f.well, f.field)] = (well, count.get(well, 0))
        count[well] = count.get(well, 0) + 1
    return pos


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on ``folder`` (no lock file left behind); a no-op where the file system has none."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock here (some network file systems): the atomic rename alone keeps creation safe
        yield
    finally:
        os.close(fd)


def _create_output(plate, out: Path, chunk: int) -> None:
    """Build the output plate of every field of ``plate`` under a temporary name and rename it into place.

    The plate appears whole or not at all: reading every image while copying validates the inputs first (an
    unreadable file stops the run with nothing created, and the rerun starts afresh), and of tasks racing to
    create it (a job array) one renames its copy into place while the others, waiting on a lock of the
    parent folder, then find it made.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out.parent):
        if out.exists():
            return
        tmp = temp_folder(out.parent)
        try:
            log.info("copying %d field(s) of %s into %s", len(plate.fields), plate.path, out)
            _copy_plate(plate, tmp, chunk)
            try:
                os.rename(tmp, out)
            except OSError:
                if not out.exists():
                    raise  # else another task (without a lock) made it first: use its plate
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _copy_plate(plate, path: Path, chunk: int) -> None:
    import dask.array as da

    per_well: dict[str, list] = {}
    for f in plate.fields:
        per_well.setdefault(f.well, []).append(f)
    root = ngff.create_plate(path, list(per_well), max(len(v) for v in per_well.values()),
                             name=Path(plate.path).name)
    for well, fs in per_well.items():
        r, c = ngff.split_well(well)
        root[f"{r}/{c}"].attrs["ome"] = {"version": ngff.NGFF_VERSION,
                                         "well": {"images": [{"path": str(i)} for i in range(len(fs))]}}
        for i, f in enumerate(fs):
            names = sorted(f.channels)
            img = da.stack([f.channels[n] for n in names])
            if max(f.shape) <= chunk:
                img = np.asarray(img)  # read now: an unreadable file stops here, naming itself
            grp = ngff.write_field(root, well, i, img, names, chunk=chunk)
            grp.attrs["hpc_retrain_source"] = {"well": f.well, "field": f.field, "source": f.source}


# ------------------------------------------------------------------------------------------ file system faults
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fs_problem(e: OSError, where: Path, out_given: bool) -> str | None:
    """One line for a read-only or full output, or None for other errors."""
    detail = f" ({e.filename}: {e.strerror})" if e.filename else f" ({e.strerror})"
    elsewhere = "choose another --out" if out_given else "pass --out PATH to write the results elsewhere"
    if e.errno in _READ_ONLY:
        return f"{where} is read-only{detail}: {elsewhere}"
    if e.errno in _FULL:
        return (f"{where}: no space left on the device{detail}; free space there or "
                f"{'choose an --out' if out_given else 'pass --out PATH'} on another file system, then run the "
                f"same command again (finished fields are kept)")
    return None


def _probe_writable(folder: Path) -> OSError | None:
    """Create and remove a file in ``folder``: the error a write there gives, if any (root ignores permission
    bits, so asking os.access would not do)."""
    probe = folder / f".hpc-retrain-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return OSError(e.errno, e.strerror)  # without the probe's own name
    return None


def _bad_field(f, channel: str, prep: ChannelPrep) -> str | None:
    """Why field ``f`` cannot be segmented (unreadable, NaN pixels, constant...), or None; reads it."""
    from hpc_retrain.plate import PlateError

    source = f"{f.source} ({channel})"
    try:
        im = np.asarray(f.channel(channel))
    except PlateError as e:
        return str(e)
    except Exception as e:  # a damaged chunk or file
        return f"{source}: pixels unreadable ({type(e).__name__}: {e})"
    try:
        P.check_image(im, source)
        P.intensity_range(im, prep.percentiles, source)
    except P.ImageError as e:
        return str(e)
    return None


RUN_SETTINGS = ("preprocess", "tiling", "infer.body_threshold", "infer.marker_threshold")


def with_run_settings(cfg: RunConfig, run_dir: Path, overrides=()) -> RunConfig:
    """``cfg`` with what a trained run's model needs: the preprocessing and tiling its tiles were made with
    and the post-processing thresholds calibrated on its validation fields. Fields given with ``--set``
    win; a config file does not (a shared run.yaml would otherwise silently undo the calibration)."""
    run = RunConfig.read_saved(run_dir).to_dict()
    data = cfg.to_dict()
    told = [o.split("=", 1)[0].strip() for o in overrides]
    used = []
    for key in RUN_SETTINGS:
        sec, _, name = key.partition(".")
        if any(t == key or t.startswith(key + ".") or (not name and t.startswith(sec + ".")) for t in told):
            continue
        if name:
            data[sec][name] = run[sec][name]
        else:
            data[sec] = run[sec]
        used.append(key)
    cfg = RunConfig.from_dict(data, source=f"{run_dir / 'config.yaml'}")
    log.info("using %s of %s: mean width %s px, body > %s, markers > %s", ", ".join(used), run_dir / "config.yaml",
             cfg.preprocess.mean_width, cfg.infer.body_threshold, cfg.infer.marker_threshold)
    return cfg


def add_arguments(p: argparse.ArgumentParser, name: str = "segment") -> None:
    p.add_argument("--model", metavar="RUN_OR_MODEL",
                   help="a training run folder or a .keras/.h5 model (default: infer.model, else MISIC's "
                        "pretrained model)")
    p.add_argument("--plate", metavar="PATH", help="TIFF folder or OME-Zarr plate (default: plate.path)")
    p.add_argument("--out", metavar="PATH",
                   help="OME-Zarr plate to write (default: into an OME-Zarr input plate itself; "
                        "<folder>.ome.zarr next to a TIFF plate)")
    p.add_argument("--name", help="label image name under each field's labels/ (default: infer.name)")
    p.add_argument("--channel", choices=("brightfield", "fluorescence"), default="brightfield",
                   help="which plate channel to segment, with its preprocessing (default: brightfield)")
    p.add_argument("--mode", choices=MODES, help="crop-and-stitch (MISIC) or blended tiles (default: infer.mode)")
    p.add_argument("--batch-size", type=int, help="tiles per model call (default: infer.batch_size)")
    p.add_argument("--chunk", type=int, help="fields larger than this (px) are processed in chunks")
    p.add_argument("--tiff", nargs="?", const="", metavar="DIR",
                   help="also write TIFFs {well}_s{field}_{name}.tif (labels) and _prob.tif (default DIR: "
                        "<plate>_<name>_tiff next to the plate)")
    p.add_argument("--overwrite", action="store_true", help="replace results of the same name")
    p.add_argument("--wells", metavar="A1,B2", help="segment only these wells (e.g. one per Slurm array task)")
    p.add_argument("--list-wells", action="store_true", help="print the plate's wells, one a line, and exit")


def main(args: argparse.Namespace) -> int:
    from hpc_retrain import __version__
    from hpc_retrain import model as M
    from hpc_retrain import plate as PL
    from hpc_retrain.cli import CliError, config_from_args

    cfg = config_from_args(args, infer__mode=args.mode, infer__batch_size=args.batch_size,
                           infer__name=args.name, infer__chunk=args.chunk, infer__model=args.model,
                           plate__path=args.plate)
    model_dir = M.run_folder(cfg.infer.model)  # a run folder, or the run of a checkpoint folder
    if model_dir is not None:
        cfg = with_run_settings(cfg, model_dir, args.overrides)
    if cfg.plate.path is None:
        raise CliError("no plate: pass --plate PATH (or set plate.path)")
    plate = PL.open_plate(cfg.plate)
    if args.list_wells:
        print("\n".join(dict.fromkeys(f.well for f in plate.fields)))
        return 0
    channel = getattr(cfg.plate, args.channel)
    plate.require(channel)

    fields = plate.fields
    if args.wells:
        wanted = [w.strip() for w in args.wells.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {f.well for f in fields})
        if unknown:
            raise CliError(f"{plate.path}: no well(s) {unknown}; `--list-wells` shows the plate's wells")
        fields = [f for f in fields if f.well in wanted]
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and plate.layout == "ome-zarr" and out.resolve() == plate.path.resolve():
        out = None
    in_place = out is None and plate.layout == "ome-zarr"
    target = plate.path if in_place else (out or default_output(plate.path))
    # A read-only (or full) output: one line before any work.
    probe = target if target.exists() else target.parent
    if probe.is_dir() and (err := _probe_writable(probe)) is not None and _fs_problem(err, target, bool(args.out)):
        raise CliError(_fs_problem(err, plate.path if in_place else probe, bool(args.out)))
    # Temporary data of segments killed before they could clean up (their pid in the folder name).
    removed, unknown = remove_stale_temp(target.parent)
    if removed:
        print(f"removed {len(removed)} stale temporary folder(s) of killed segment runs: "
              f"{', '.join(p.name for p in removed)}")
    if unknown:  # a job array's tasks on other nodes write theirs beside ours: one line, not one each
        log.info("left %d temporary folder(s) of segments on other hosts (or of older versions) alone, e.g. %s; "
                 "remove those of segments no longer running", len(unknown), unknown[0])

    from hpc_retrain.width import resolve_mean_width  # mean_width "auto": measured on this plate, recorded

    cfg = resolve_mean_width(cfg, plate, channel)
    prep = getattr(cfg.preprocess, args.channel)
    name = cfg.infer.name
    # A run still training (or preempted) gives its best, else latest, checkpoint; a line says which.
    model, source = M.load_with_source(cfg.infer.model, cfg.tiling.size)
    predict = Predictor(model, cfg.infer.batch_size, cfg.tiling.size, cfg.infer.engine)
    provenance = {"version": __version__, "model": str(source.path), "model_sha256": source.sha256,
                  "mode": cfg.infer.mode, "channel": channel, "engine": predict.engine, "config": cfg.to_dict()}
    if source.is_checkpoint:  # the folder (best, above all) changes as training goes on: say what it held
        provenance["model_checkpoint"] = dict(source.checkpoint, weights="variables.npz")
    settings = _result_settings(provenance)
    try:
        return _segment(args, plate, fields, out, channel, prep, cfg, predict, provenance, settings, name)
    except OSError as e:
        problem = _fs_problem(e, target, bool(args.out))
        if problem is None:
            raise
        raise CliError(problem) from None


def _segment(args, plate, fields, out, channel, prep, cfg, predict, provenance, settings, name) -> int:
    from hpc_retrain.cli import CliError
    from hpc_retrain.plate import PlateError

    out_path, groups = _output_plate(plate, out, fields, cfg.infer.chunk)
    # Only the fields asked for count: finished ones made with these settings are kept, finished ones made
    # otherwise refuse the run (before any write) unless --overwrite, unfinished ones are redone.
    todo, kept, clash, redo = [], [], [], []
    for f, grp in zip(fields, groups):
        state = result_state(grp, name)
        if state == "complete" and not args.overwrite:
            diff = _settings_differ(grp["labels"][name].attrs.get(ngff.PROVENANCE), settings)
            if diff:
                clash.append((f"{out_path}/{grp.path}/labels/{name}", diff))
            else:
                kept.append(f)
            continue
        if state == "incomplete":
            redo.append(f.key)
        todo.append((f, grp))
    if clash:
        where, diff = clash[0]
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise CliError(f"{where} already holds results{more} made with other settings ({'; '.join(diff[:3])}); "
                       f"pass --overwrite to replace them or --name to write beside them")
    if kept:
        print(f"{len(kept)} field(s) already segmented with these settings, kept (--overwrite redoes them)")
    if redo:
        print(f"redoing {len(redo)} incomplete field(s) (a segment stopped before finishing them): "
              f"{', '.join(redo[:10])}{' ...' if len(redo) > 10 else ''}")
    tiff_dir = None
    if args.tiff is not None:
        tiff_dir = Path(args.tiff) if args.tiff else plate.path.parent / f"{plate.path.name}_{name}_tiff"
        tiff_dir.mkdir(parents=True, exist_ok=True)

    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}

    def skip(f, reason: str) -> None:
        skipped[f.key] = reason
        bar.write(f"hpc-retrain segment: skipped field {f.key}: {reason}")
        bar(f"{f.key}: skipped")

    def begin(f, grp):
        shape = tuple(f.shape)
        _begin_result(grp, name)  # marked unfinished before any array changes
        return (write_probabilities(grp, name, shape, cfg.infer.chunk, True),
                ngff.create_label(grp, name, shape, I.LABEL_DTYPE, chunk=cfg.infer.chunk, overwrite=True))

    def finish(f, grp, prob, labels, n) -> None:
        if tiff_dir is not None:
            import tifffile

            lab = labels if labels is not None else np.asarray(grp["labels"][name]["0"][...])
            p = prob if prob is not None else np.asarray(grp[PROB_GROUP][name]["0"][...])
            tifffile.imwrite(tiff_dir / f"{f.well}_s{f.field}_{name}.tif", lab, compression="zlib")
            tifffile.imwrite(tiff_dir / f"{f.well}_s{f.field}_{name}_prob.tif", p, compression="zlib")
        _finish_result(grp, name, provenance, n)  # the completion marker: the field's last write
        counts[f.key] = n
        bar(f"{f.key}: {n} cells")

    small = [(f, g) for f, g in todo if max(f.shape) <= cfg.infer.chunk]
    large = [(f, g) for f, g in todo if max(f.shape) > cfg.infer.chunk]
    tmp = None
    try:
        with _progress(len(todo), "segment") as bar:
            # Fields that fit in memory go through the pipelined path, a batch at a time, each field checked
            # first (a constant, NaN or unreadable field is skipped, not fatal); larger ones chunk by chunk.
            for b in range(0, len(small), 16):
                batch = []
                for f, grp in small[b:b + 16]:
                    reason = _bad_field(f, channel, prep)
                    if reason:
                        skip(f, reason)
                    else:
                        batch.append((f, grp))
                images = (f.channel(channel) for f, _ in batch)
                results = segment_fields(predict, images, cfg, prep=prep, sources=[f.source for f, _ in batch])
                for (f, grp), (prob, labels) in zip(batch, results):
                    prob_arr, lab_arr = begin(f, grp)
                    prob_arr[...] = np.moveaxis(prob, -1, 0)
                    lab_arr[...] = labels
                    finish(f, grp, np.moveaxis(prob, -1, 0), labels, int(labels.max()))
            for f, grp in large:
                if tmp is None:
                    tmp = temp_folder(out_path.parent)
                prob_arr, lab_arr = begin(f, grp)
                try:
                    n = segment_scan(predict, f.channel(channel), cfg, prob_arr, lab_arr, prep=prep, tmpdir=tmp,
                                     source=f"{f.source} ({channel})")
                except (P.ImageError, PlateError) as e:
                    _remove_result(grp, name)
                    skip(f, str(e))
                    continue
                finish(f, grp, None, None, n)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    note = f"; skipped {len(skipped)} field(s): {', '.join(skipped)}" if skipped else ""
    print(f"segmented {len(counts)} field(s), {sum(counts.values())} cells -> {out_path} "
          f"(labels/{name}, {PROB_GROUP}/{name}){note}")
    if skipped and not counts and not kept:
        print(f"hpc-retrain segment: no field was segmented: all {len(skipped)} field(s) skipped (see above)",
              file=sys.stderr)
        return 1
    return 0


class _progress:
    """A tqdm bar on stderr when it is a terminal and tqdm is installed; an INFO log line per field otherwise
    (a Slurm log file gets plain lines, not carriage-return redraws)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="field", file=sys.stderr)
        except ImportError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def write(self, line: str) -> None:
        """A line on stderr of its own, the bar redrawn below it."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def __call__(self, msg: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
            self.bar.update()
        else:
            log.info("%s %d/%d %s", self.desc, self.n, self.total, msg)
