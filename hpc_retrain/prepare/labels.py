"""Training labels from fluorescence: the pretrained MISIC, tile by tile, binarized, with per-field QC.

The stored label tiles are cut from the *stitched* probability map with the same grid as the target tiles,
so a tile's margins carry the confident centre predictions of its neighbours (as MISIC's own output does),
not the edge artefacts of the tile's own prediction. TensorFlow is imported only when a model is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging import blocks as B
from hpc_retrain.imaging import preprocess as P
from hpc_retrain.imaging import tiling as T
from hpc_retrain.inference import instances as I

# QC limits. A field beyond them is FLAGGED (kept out of training) with the reason in the QC table.
MIN_POSITIVE_BODY = 1e-4  # below: "no cells" (MISIC found next to nothing)
MAX_POSITIVE_BODY = 0.9  # above: "saturated" (the whole field reads as cell body)
# Out of focus / low contrast: MISIC is confident on in-focus cells, so most candidate body pixels score
# >= 0.75. The uncertain share (pixels in 0.25..0.75 among all above 0.25) is 0.25-0.36 on ColiCoords
# (mean width 12-16) and 0.28-0.32 on sharp synthetic fields, 0.40-0.42 with a PSF of 3 px, 0.46-0.52
# with 4-6 px (cells 7 px wide), and also rises when the mean width is badly off. With the teacher over three
# widths (labels.width_factors) the ColiCoords fields reach 0.27-0.45 (colicoords_cv fold 1, 2026-12-02).
MAX_UNCERTAIN_SHARE = 0.45

_CLEAR = 3  # px (scaled) around a dropped object whose labels go too: its contour ring

_MODELS: dict[str, Any] = {}


def get_model(path=None, threads: int | None = None, engine: str | None = None):
    """The labelling model, loaded once per process (Dask process workers each load their own).

    ``threads``: TensorFlow's (and so OpenVINO's) thread limit; ``engine``: ``compute.engine`` to run it with
    in ``predict_tiles`` (None: keep the one set before, else "auto": OpenVINO on a CPU, see ``engine``)."""
    key = str(path or "pretrained")
    if key not in _MODELS:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from hpc_retrain.inference import backend
        from hpc_retrain.inference import model as M

        # A Dask worker process inherits KERAS_BACKEND from the process that applied compute.backend.
        if backend.apply() == "tensorflow":
            M.import_tensorflow()  # a Dask worker process's first import: without TF's start-up lines
        if threads:
            # Several worker processes on one machine: split the cores instead of oversubscribing them.
            backend.limit_threads(int(threads))
        _MODELS[key] = M.load(path)
    if engine is not None:
        from hpc_retrain.inference import engine as E

        E.prefer(_MODELS[key], engine)
    return _MODELS[key]


def predict_tiles(model, tiles: np.ndarray, batch_size: int = 8, engine: str | None = None) -> np.ndarray:
    """Model outputs (N, S, S, 2) float32 (body, contour), in batches of ``batch_size``: ``infer.Predictor``,
    the one predictor of labels and inference.

    ``engine``: a ``compute.engine`` value; None: the one ``get_model`` was given for this model, else "auto"
    (OpenVINO on a CPU, compiled once per model; TensorFlow as one traced function)."""
    from hpc_retrain.inference import engine as E
    from hpc_retrain.inference.predictor import predictor_for

    if len(tiles) == 0:
        raise ValueError("no tiles to predict")
    engine = E.preferred(model) if engine is None else engine
    return predictor_for(model, batch_size, int(tiles.shape[1]), engine)(tiles)


def binarize(prob: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """(..., 2) probabilities -> (..., 2) uint8: body >= body_threshold, contour > contour_threshold."""
    lab = np.empty(prob.shape, np.uint8)
    lab[..., 0] = prob[..., 0] >= cfg.labels.body_threshold
    lab[..., 1] = prob[..., 1] > cfg.labels.contour_threshold
    return lab


# ----------------------------------------------------------------------------------- teacher cells
def dim_objects(cells: np.ndarray, intensity: np.ndarray, min_snr: float, width: float) -> np.ndarray:
    """Ids of objects whose median intensity is less than ``min_snr`` robust noise s.d. above background.

    Background: the pixels more than one cell width away from every object; its median and 1.4826 * MAD
    (the s.d. of Gaussian noise, unmoved by the odd unlabelled cell). A fluorescent cell stands out of it;
    an object MISIC drew on background texture does not (ColiCoords: 0.6-4.5 s.d.; cells 5.3 and up).
    """
    n = int(cells.max())
    if n == 0:
        return np.zeros(0, np.int64)
    far = ~ndi.binary_dilation(cells > 0, iterations=max(int(round(width)), 1))
    bg = intensity[far] if far.sum() >= 100 else intensity[cells == 0]
    if bg.size == 0:
        return np.zeros(0, np.int64)
    level = float(np.median(bg))
    noise = 1.4826 * float(np.median(np.abs(bg - level)))
    if noise <= 0:
        noise = float(bg.std()) or 1.0
    ids = np.arange(1, n + 1)
    med = np.asarray(ndi.median(intensity, cells, ids), np.float64)
    present = np.bincount(cells.ravel(), minlength=n + 1)[1:] > 0
    return ids[present & ((med - level) / noise < min_snr)]


def teacher_cells(prob: np.ndarray, intensity: np.ndarray | None, cfg: RunConfig, width: float = P.SCALED_WIDTH
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(cells kept, mask of the objects dropped) from MISIC's probabilities of a fluorescence image.

    The cells are MISIC's own post-processing of ``prob`` (body ``labels.body_threshold``, markers 0.95)
    without specks and, given the image ``intensity`` on the same grid, without objects too dim to be
    fluorescent cells (``labels.min_snr``). ``width``: the cell width in this image's pixels.
    """

    icfg = I.misic_postprocessing(cfg.updated(preprocess__mean_width=width), cfg.labels.body_threshold)
    cells = I.instances(prob, icfg)
    kept = real_cells(cells, intensity, cfg, width)
    # dropped: every body-label pixel outside a kept cell (also objects too small to become instances)
    return kept, (prob[..., 0] >= cfg.labels.body_threshold) & (kept == 0)


def real_cells(cells: np.ndarray, intensity: np.ndarray | None, cfg: RunConfig, width: float) -> np.ndarray:
    """``cells`` (instances of a fluorescence image) without specks and, given the image, dim objects."""
    kept = I.drop_specks(cells, width)
    if intensity is not None and cfg.labels.min_snr is not None:
        dim = dim_objects(kept, np.asarray(intensity, np.float64), cfg.labels.min_snr, width)
        if dim.size:
            kept = np.where(np.isin(kept, dim), 0, kept).astype(cells.dtype)
    return kept


def clean(prob: np.ndarray, labels: np.ndarray, intensity: np.ndarray | None, cfg: RunConfig,
          window: bool | tuple[bool, bool, bool, bool] = False) -> tuple[np.ndarray, int]:
    """``labels`` with dropped objects (specks, dim blobs: ``teacher_cells``) and their contour rings set to
    background; and how many objects were dropped. Rings are cleared up to ``_CLEAR`` px from a dropped
    object but never within 2 px of a kept cell, so a neighbour keeps its own contour.

    ``window``: the arrays are a window of a larger scan; objects touching its edge may be cut, so they
    are kept (the large-scan path judges each object in the windows that hold it whole). True: every edge
    cuts; or which of (top, bottom, left, right) do, where the others are the image's own border, whose
    objects are judged as the whole image judges them.
    """
    kept, dropped = teacher_cells(prob, intensity, cfg)
    parts, n = ndi.label(dropped)
    cuts = (True,) * 4 if window is True else tuple(window) if window else (False,) * 4
    if any(cuts) and n:
        sides = (parts[0], parts[-1], parts[:, 0], parts[:, -1])
        edge = np.unique(np.concatenate([e for e, cut in zip(sides, cuts) if cut]))
        edge = edge[edge > 0]
        dropped &= ~np.isin(parts, edge)
        n -= len(edge)
    if not n:
        return labels, 0
    square = np.ones((3, 3), bool)  # a square reach, so the ring's corners go too
    clear = (ndi.binary_dilation(dropped, square, iterations=_CLEAR)
             & ~ndi.binary_dilation(kept > 0, square, iterations=2))
    out = labels.copy()
    out[clear] = 0
    return out, n


def scaled_intensity(fluo: np.ndarray, cfg: RunConfig, source: str = "image") -> np.ndarray:
    """The fluorescence normalized and rescaled like MISIC's input, without gamma: the linear signal whose
    noise ``dim_objects`` measures."""
    prep = cfg.preprocess.fluorescence.model_copy(update={"gamma": 1.0})
    return P.prepare_np(fluo, prep, cfg.preprocess.scale, source)


def width_configs(cfg: RunConfig) -> list[RunConfig]:
    """``cfg`` told each of the other ``labels.width_factors`` times the mean width (1.0 is ``cfg`` itself, whose
    rescaled grid the labels are on)."""
    w = cfg.preprocess.width
    return [cfg.updated(preprocess__mean_width=w * f) for f in cfg.labels.width_factors if f != 1.0]


def _stitched(fluo: np.ndarray, model, cfg: RunConfig, source: str) -> tuple[np.ndarray, T.TileGrid]:
    feats = P.features_np(fluo, cfg.preprocess.fluorescence, cfg.preprocess, source)
    tiles, grid = T.extract_tiles(feats, cfg.tiling.size, cfg.tiling.margin)
    del feats
    prob = T.stitch_tiles(predict_tiles(model, tiles, cfg.compute.batch_size), grid)
    return np.ascontiguousarray(prob[..., :2], np.float32), grid


def field_probabilities(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image"
                        ) -> tuple[np.ndarray, T.TileGrid]:
    """Stitched MISIC probabilities (H', W', 2) float32 at the rescaled resolution, and their tile grid: the
    maximum over ``labels.width_factors``, each pass resized to this grid as MISIC resizes its output. QC
    judges these, the labels' own probabilities (on ColiCoords a field MISIC is unsure of at the mean width
    alone, 51 % of its candidate pixels uncertain, is 45 % over the passes)."""
    from hpc_retrain.inference.predictor import resize_to

    prob, grid = _stitched(fluo, model, cfg, source)
    for c in width_configs(cfg):
        np.maximum(prob, resize_to(_stitched(fluo, model, c, source)[0], prob.shape[:2]), out=prob)
    return prob, grid


def teacher(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image") -> np.ndarray:
    """The teacher's cells on the fluorescence image's own pixel grid (as ``segment`` outputs cells): MISIC over
    ``labels.width_factors`` as for the labels, ``instances`` with ``cfg``'s thresholds, then ``real_cells``."""
    from hpc_retrain.inference import predictor as infer

    prep = cfg.preprocess.fluorescence
    prob = infer.predict_field(model, fluo, cfg, None, prep, source)
    for c in width_configs(cfg):
        np.maximum(prob, infer.predict_field(model, fluo, c, None, prep, source), out=prob)
    return real_cells(I.instances(prob, cfg), fluo, cfg, cfg.preprocess.width)


def label_field(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (H', W', 2) float32, labels (H', W', 2) uint8) of one in-memory fluorescence image."""
    prob, _ = field_probabilities(fluo, model, cfg, source)
    return prob, clean(prob, binarize(prob, cfg), scaled_intensity(fluo, cfg, source), cfg)[0]


def label_tiles(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image"
                ) -> tuple[np.ndarray, np.ndarray, T.TileGrid, dict[str, float]]:
    """What the store holds for one field: probability tiles (N, S, S, 2) float32, label tiles uint8,
    the grid (identical to the target tiles' grid) and the field's QC statistics."""
    prob, grid = field_probabilities(fluo, model, cfg, source)
    labels, dropped = clean(prob, binarize(prob, cfg), scaled_intensity(fluo, cfg, source), cfg)
    ptiles, _ = T.extract_tiles(prob, cfg.tiling.size, cfg.tiling.margin)
    # Label tiles are cut from the cleaned field (its tile margins reflect like the probabilities').
    ltiles, _ = T.extract_tiles(labels, cfg.tiling.size, cfg.tiling.margin)
    parts = stats_parts(prob, labels, ltiles)
    parts["dropped"] = dropped
    return ptiles, ltiles, grid, stats_from_parts([parts])


# ----------------------------------------------------------------------------------------------- QC
def stats_parts(prob: np.ndarray, labels: np.ndarray, label_tiles: np.ndarray | None = None) -> dict[str, Any]:
    """Additive pieces of the QC statistics, so a large scan can sum them over its blocks."""
    hist = np.histogram(prob[..., 0], bins=[0, 0.25, 0.5, 0.75, np.inf])[0]
    lt = labels if label_tiles is None else label_tiles
    _, cells = ndi.label(labels[..., 0])
    return {"hist": hist.astype(np.int64), "pixels": int(prob[..., 0].size),
            "positive": lt.reshape(-1, lt.shape[-1]).sum(0, dtype=np.int64),
            "tile_pixels": int(lt[..., 0].size), "cells": int(cells)}


def stats_from_parts(parts: list[dict[str, Any]]) -> dict[str, float]:
    hist = sum(p["hist"] for p in parts)
    pixels = sum(p["pixels"] for p in parts)
    pos = sum(p["positive"] for p in parts) / max(sum(p["tile_pixels"] for p in parts), 1)
    out = {f"body_q{i + 1}": float(h) / max(pixels, 1) for i, h in enumerate(hist)}
    out.update(positive_body=float(pos[0]), positive_contour=float(pos[1]),
               cells=float(sum(p["cells"] for p in parts)), dropped=float(sum(p.get("dropped", 0) for p in parts)))
    return out


def label_stats(prob: np.ndarray, labels: np.ndarray, label_tiles: np.ndarray | None = None) -> dict[str, float]:
    """QC of one field: body-probability histogram in quarters (fractions of pixels), positive fraction per
    channel and the number of connected body regions.

    Positive fractions are taken over ``label_tiles`` when given: those are the pixels training sees, so
    the store's ``positive_fraction`` (a tile-weighted mean of these) is exact.
    """
    return stats_from_parts([stats_parts(prob, labels, label_tiles)])


def uncertain_share(q2, q3, q4):
    """Of the pixels MISIC gives a body probability above 0.25, the share below 0.75 (from the QC quarters
    ``body_q2..4``; numbers or arrays, 0 where nothing is above 0.25)."""
    above = np.asarray(q2 + q3 + q4, np.float64)
    return np.where(above > 0, (q2 + q3) / np.maximum(above, 1e-12), 0.0)


def qc_flags(stats: dict[str, float]) -> list[str]:
    """Reasons to keep a field out of training; empty when it looks usable."""
    reasons = []
    above = stats["body_q2"] + stats["body_q3"] + stats["body_q4"]
    uncertain = float(uncertain_share(stats["body_q2"], stats["body_q3"], stats["body_q4"]))
    # Judged on the probabilities first: a blurred field's objects may all be cleaned out of its labels,
    # and "out of focus" tells the user more than "no cells".
    if above >= MIN_POSITIVE_BODY and stats["positive_body"] <= MAX_POSITIVE_BODY and uncertain > MAX_UNCERTAIN_SHARE:
        reasons.append(f"out of focus, low contrast or wrong mean width ({uncertain:.0%} of candidate cell pixels "
                       f"uncertain)")
    elif stats["cells"] == 0 or stats["positive_body"] < MIN_POSITIVE_BODY:
        reasons.append(f"no cells (body fraction {stats['positive_body']:.2g}, {int(stats['cells'])} regions)")
    elif stats["positive_body"] > MAX_POSITIVE_BODY:
        reasons.append(f"saturated (body fraction {stats['positive_body']:.2f})")
    return reasons


# ------------------------------------------------------------------------------------------- writing
def write_label_tiles(fluo, model, cfg: RunConfig, prob_arr, label_arr, first_tile: int, source: str = "image"
                      ) -> tuple[T.TileGrid, dict[str, float]]:
    """Compute and write one field's probability and label tiles; returns the grid and the field's QC.

    A large scan goes block by block (``blocks`` grid, one block in memory at a time) in two passes: MISIC
    on each block's tiles gives the stitched probability map, kept in a scratch Zarr array (under $TMPDIR,
    deleted after the field) so no prediction is ever recomputed; then label tiles are cut from that map with
    the margins taken from neighbouring blocks, exactly as ``label_tiles`` does for a whole image (see
    ``targets.run_blocks``). (Cells crossing a block edge
    are counted once per block they touch: the cell count of a large scan is approximate.)
    """
    from hpc_retrain.prepare import targets as TG

    if not B.is_large(tuple(fluo.shape), cfg.compute.chunk):
        ptiles, ltiles, grid, stats = label_tiles(np.asarray(fluo), model, cfg, source)
        prob_arr[first_tile: first_tile + len(ptiles)] = ptiles
        label_arr[first_tile: first_tile + len(ltiles)] = ltiles
        return grid, stats

    import tempfile

    import zarr

    feats = TG.lazy_features(fluo, cfg.preprocess.fluorescence, cfg, source)
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
    s, m, S = grid.stride, grid.margin, grid.size
    k = TG.block_tiles(cfg)
    h, w = grid.shape
    with tempfile.TemporaryDirectory(prefix="hpc-retrain-prob-") as scratch:
        # Chunks of one tile stride: block edges fall on chunk edges, and a window's read decodes small chunks
        # instead of up to four whole blocks (~50 MB at once).
        def predict(feats_c: TG.ScanFeatures, grid_c: T.TileGrid, path: str):
            out = zarr.create_array(path, shape=grid_c.padded_shape + (2,), dtype="float32", chunks=(s, s, 2),
                                    fill_value=0)

            def predict_block(win: np.ndarray, b: B.Block) -> None:
                y = predict_tiles(model, TG.cut(win, grid_c, b), cfg.compute.batch_size)[..., :2]
                (r0, r1), (c0, c1) = b.rows, b.cols
                out[r0 * s: r1 * s, c0 * s: c1 * s] = T.stitch_tiles(y, T.TileGrid(((r1 - r0) * s, (c1 - c0) * s), S, m))

            TG.run_blocks(feats_c, grid_c, k, predict_block)
            return out

        stitched = predict(feats, grid, f"{scratch}/p.zarr")
        # The other widths' passes, each on its own rescaled grid; windows of them are resized to this grid
        # (``blocks.rescale_window``: what ``resize_to`` gives for the whole map) and joined by maximum.
        others = []
        for i, c in enumerate(width_configs(cfg)):
            f_c = TG.lazy_features(fluo, cfg.preprocess.fluorescence, c, source)
            g_c = T.TileGrid(tuple(f_c.shape[:2]), S, m)
            others.append((predict(f_c, g_c, f"{scratch}/p{i}.zarr"), g_c.shape))
            del f_c
        # Each window is cleaned (``clean``) on the part of the image it shows, before the canvas reflects it:
        # ``Window`` hands ``both`` the smallest image rectangle behind a block's canvas window, and ``take``
        # reflects the result into it, as ``label_tiles`` reflects the cleaned whole image. Cleaning the
        # reflected canvas instead would judge mirrored objects: a cell cut where the reflection turns back
        # (the far side of the padding to whole strides) looks whole there, a speck at the image border
        # looks twice its size. A dropped object's fate is decided per rectangle: it holds the object whole
        # unless the object crosses one of its edges inside the image (those are kept: they may be cut).
        dropped_in: list[int] = []

        def both(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
            x = feats.prepared(r0, r1, c0, c1, gamma=1.0).astype(np.float32)
            p = np.asarray(stitched[r0:r1, c0:c1])
            for arr, shape in others:
                read = lambda a0, a1, b0, b1, arr=arr: np.asarray(arr[a0:a1, b0:b1])  # noqa: E731
                np.maximum(p, B.rescale_window(read, shape, (h, w), (r0, r1), (c0, c1), np.float32), out=p)
            lab, dropped = clean(p, binarize(p, cfg), x, cfg, window=(r0 > 0, r1 < h, c0 > 0, c1 < w))
            dropped_in.append(dropped)
            return np.concatenate([p, lab.astype(np.float32)], axis=-1)

        def write(win: np.ndarray, b: B.Block) -> dict[str, Any]:
            pwin, lwin, dropped = win[..., :2], win[..., 2:].astype(np.uint8), dropped_in.pop()
            ptiles = TG.cut(pwin, grid, b)
            ltiles = TG.cut(lwin, grid, b)
            TG.write_block(prob_arr, first_tile, grid, b, ptiles)
            TG.write_block(label_arr, first_tile, grid, b, ltiles)
            # the block's own part of the field (no margins, no padding) for the histogram and cell count
            (r0, r1), (c0, c1) = b.rows, b.cols
            rows, cols = slice(m, m + min(r1 * s, h) - r0 * s), slice(m, m + min(c1 * s, w) - c0 * s)
            parts = stats_parts(pwin[rows, cols], lwin[rows, cols], ltiles)
            parts["dropped"] = dropped
            return parts

        parts = TG.run_blocks(B.Window((h, w), both), grid, k, write)
    return grid, stats_from_parts(parts)
