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

from hpc_retrain import preprocess as P
from hpc_retrain import tiling as T
from hpc_retrain.config import RunConfig

# QC limits. A field beyond them is FLAGGED (kept out of training) with the reason in the QC table.
MIN_POSITIVE_BODY = 1e-4  # below: "no cells" (MISIC found next to nothing)
MAX_POSITIVE_BODY = 0.9  # above: "saturated" (the whole field reads as cell body)
# Out of focus / low contrast: MISIC is confident on in-focus cells, so most candidate body pixels score
# >= 0.75. The uncertain share (pixels in 0.25..0.75 among all above 0.25) is 0.25-0.36 on ColiCoords
# (mean width 12-16) and 0.28-0.32 on sharp synthetic fields, 0.40-0.42 with a PSF of 3 px, 0.46-0.52
# with 4-6 px (cells 7 px wide), and also rises when the mean width is badly off.
MAX_UNCERTAIN_SHARE = 0.45

_MODELS: dict[str, Any] = {}


def get_model(path=None, threads: int | None = None):
    """The labelling model, loaded once per process (Dask process workers each load their own)."""
    key = str(path or "pretrained")
    if key not in _MODELS:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if threads:
            import tensorflow as tf

            # Several worker processes on one machine: split the cores instead of oversubscribing them.
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TF already initialised in this process; keep its settings
                pass
        from hpc_retrain import model as M

        _MODELS[key] = M.load(path)
    return _MODELS[key]


def predict_tiles(model, tiles: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Model outputs (N, S, S, C) float32; ``predict_on_batch`` avoids ``predict``'s per-call pipeline set-up."""
    out = []
    for i in range(0, len(tiles), batch_size):
        out.append(np.asarray(model.predict_on_batch(np.ascontiguousarray(tiles[i:i + batch_size], np.float32))))
    if not out:
        raise ValueError("no tiles to predict")
    return np.concatenate(out).astype(np.float32, copy=False)


def binarize(prob: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """(..., 2) probabilities -> (..., 2) uint8: body >= body_threshold, contour > contour_threshold."""
    lab = np.empty(prob.shape, np.uint8)
    lab[..., 0] = prob[..., 0] >= cfg.labels.body_threshold
    lab[..., 1] = prob[..., 1] > cfg.labels.contour_threshold
    return lab


def field_probabilities(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image"
                        ) -> tuple[np.ndarray, T.TileGrid]:
    """Stitched MISIC probabilities (H', W', 2) float32 at the rescaled resolution, and their tile grid."""
    feats = P.features_np(fluo, cfg.preprocess.fluorescence, cfg.preprocess, source)
    tiles, grid = T.extract_tiles(feats, cfg.tiling.size, cfg.tiling.margin)
    del feats
    prob = T.stitch_tiles(predict_tiles(model, tiles, cfg.infer.batch_size), grid)
    return np.ascontiguousarray(prob[..., :2], np.float32), grid


def label_field(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (H', W', 2) float32, labels (H', W', 2) uint8) of one in-memory fluorescence image."""
    prob, _ = field_probabilities(fluo, model, cfg, source)
    return prob, binarize(prob, cfg)


def label_tiles(fluo: np.ndarray, model, cfg: RunConfig, source: str = "image"
                ) -> tuple[np.ndarray, np.ndarray, T.TileGrid, dict[str, float]]:
    """What the store holds for one field: probability tiles (N, S, S, 2) float32, label tiles uint8,
    the grid (identical to the target tiles' grid) and the field's QC statistics."""
    prob, grid = field_probabilities(fluo, model, cfg, source)
    ptiles, _ = T.extract_tiles(prob, cfg.tiling.size, cfg.tiling.margin)
    ltiles = binarize(ptiles, cfg)
    return ptiles, ltiles, grid, label_stats(prob, binarize(prob, cfg), ltiles)


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
               cells=float(sum(p["cells"] for p in parts)))
    return out


def label_stats(prob: np.ndarray, labels: np.ndarray, label_tiles: np.ndarray | None = None) -> dict[str, float]:
    """QC of one field: body-probability histogram in quarters (fractions of pixels), positive fraction per
    channel and the number of connected body regions.

    Positive fractions are taken over ``label_tiles`` when given: those are the pixels training sees, so
    the store's ``positive_fraction`` (a tile-weighted mean of these) is exact.
    """
    return stats_from_parts([stats_parts(prob, labels, label_tiles)])


def qc_flags(stats: dict[str, float]) -> list[str]:
    """Reasons to keep a field out of training; empty when it looks usable."""
    reasons = []
    if stats["cells"] == 0 or stats["positive_body"] < MIN_POSITIVE_BODY:
        reasons.append(f"no cells (body fraction {stats['positive_body']:.2g}, {int(stats['cells'])} regions)")
    elif stats["positive_body"] > MAX_POSITIVE_BODY:
        reasons.append(f"saturated (body fraction {stats['positive_body']:.2f})")
    else:
        above = stats["body_q2"] + stats["body_q3"] + stats["body_q4"]
        uncertain = (stats["body_q2"] + stats["body_q3"]) / above if above > 0 else 1.0
        if uncertain > MAX_UNCERTAIN_SHARE:
            reasons.append(f"out of focus, low contrast or wrong mean width ({uncertain:.0%} of candidate cell pixels "
                           f"uncertain)")
    return reasons


# ------------------------------------------------------------------------------------------- writing
def write_label_tiles(fluo, model, cfg: RunConfig, prob_arr, label_arr, first_tile: int, source: str = "image"
                      ) -> tuple[T.TileGrid, dict[str, float]]:
    """Compute and write one field's probability and label tiles; returns the grid and the field's QC.

    A large scan goes block by block in two passes: MISIC on each block's tiles gives the stitched
    probability map, kept in a scratch Zarr array (under $TMPDIR, deleted after the field) so no
    prediction is ever recomputed; then label tiles are cut from that map with the margins taken from
    neighbouring blocks, exactly as ``label_tiles`` does for a whole image. Both passes go strip by strip (see
    ``targets.run_blocks``). (Cells crossing a block edge
    are counted once per block they touch: the cell count of a large scan is approximate.)
    """
    from hpc_retrain import targets as TG

    if not TG.is_large(tuple(fluo.shape), cfg):
        ptiles, ltiles, grid, stats = label_tiles(np.asarray(fluo), model, cfg, source)
        prob_arr[first_tile: first_tile + len(ptiles)] = ptiles
        label_arr[first_tile: first_tile + len(ltiles)] = ltiles
        return grid, stats

    import tempfile

    import dask.array as da
    import zarr

    feats = TG.lazy_features(fluo, cfg.preprocess.fluorescence, cfg, source)
    grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
    s, m, S = grid.stride, grid.margin, grid.size
    k, strip = TG.block_tiles(cfg), TG.strip_blocks(cfg)
    h, w = grid.shape
    with tempfile.TemporaryDirectory(prefix="hpc-retrain-prob-") as scratch:
        stitched = zarr.create_array(f"{scratch}/p.zarr", shape=grid.padded_shape + (2,), dtype="float32",
                                     chunks=(k * s, k * s, 2), fill_value=0)

        def predict_block(win: np.ndarray, b: TG.Block) -> None:
            y = predict_tiles(model, TG.cut(win, grid, b), cfg.infer.batch_size)[..., :2]
            stitched[b.r0 * s: b.r1 * s, b.c0 * s: b.c1 * s] = T.stitch_tiles(
                y, T.TileGrid(((b.r1 - b.r0) * s, (b.c1 - b.c0) * s), S, m))

        TG.run_blocks(TG.lazy_canvas(feats, grid), grid, k, predict_block, strip)
        prob = da.from_zarr(stitched)[:h, :w]

        def write(win: np.ndarray, b: TG.Block) -> dict[str, Any]:
            ptiles = TG.cut(win, grid, b)
            ltiles = binarize(ptiles, cfg)
            TG.write_block(prob_arr, first_tile, grid, b, ptiles)
            TG.write_block(label_arr, first_tile, grid, b, ltiles)
            # the block's own part of the field (no margins, no padding) for the histogram and cell count
            centre = win[m: m + min(b.r1 * s, h) - b.r0 * s, m: m + min(b.c1 * s, w) - b.c0 * s]
            return stats_parts(centre, binarize(centre, cfg), ltiles)

        parts = TG.run_blocks(TG.lazy_canvas(prob, grid), grid, k, write, strip)
    return grid, stats_from_parts(parts)
