"""Cell instances from MISIC's (body, contour) probabilities, for a field or a scan of any size.

The recipe is MISIC's ``postprocess_ws`` (misic/extras.py): the cell mask is body > 0.4 (``infer.body_threshold``), markers are the
confident body cores lying in troughs of the contour map (its shape index < -0.5), and a watershed grows
the markers over the mask, splitting touching cells along the contour channel. Two departures: the
watershed runs on the contour probability, not on the raw image's shape index, so it needs no image and
does not depend on the imaging mode (dark cells on a bright background flip the shape index's sign); mask
regions no marker reaches become cells of their own (if at least a quarter cell-width square) instead of
staying unlabelled. ``infer.contour_threshold`` below 1 takes as markers the cores where the contour
probability is below it instead of MISIC's trough test: a retrained model's body map can stay high across the
boundary between packed cells while its contour map marks it (training calibrates this choice; the demo's
colonies: F1 0.755 -> 0.901 against the true masks). (Labelling the cores after the trough test, to split more, fragmented rods: F1 at
IoU 0.5 fell from 0.86 to 0.2 on synthetic fields.)

Scans larger than one window are labelled window by window with a halo; cells crossing a window seam are
joined as the connected components of the pairs of labels the two windows give the same pixels along the
seam (``blocks.seam_pairs``, ``blocks.join``), so ids stay unique per field and no cell is cut at a seam (tested against the whole-image result).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import shape_index
from skimage.segmentation import relabel_sequential, watershed

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging import blocks as B

LABEL_DTYPE = np.int32
_TROUGH = -0.5  # shape index below this: a trough (cup/rut) of the contour map, i.e. inside a cell


def min_area(cfg: RunConfig) -> int:
    # A quarter of a cell-width square: smaller specks are noise, not cells.
    return max(int(0.25 * cfg.preprocess.width ** 2), 4)


def misic_postprocessing(cfg: RunConfig, body_threshold: float | None = None) -> RunConfig:
    """``cfg`` with MISIC's own post-processing (its body, marker and contour thresholds; ``body_threshold``
    when given): how the teacher's cells are cut (``prepare.labels``, ``training.validation``), whatever a run
    calibrated for its own model."""
    misic = RunConfig().infer
    body = misic.body_threshold if body_threshold is None else body_threshold
    return cfg.updated(infer__body_threshold=body, infer__marker_threshold=misic.marker_threshold,
                       infer__contour_threshold=misic.contour_threshold)


def instances(prob: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """Instance labels (H, W) int32, 0 = background, cells 1..n, from probabilities (H, W, >=2)."""
    body = np.asarray(prob[..., 0], np.float32)
    contour = np.asarray(prob[..., 1], np.float32)
    mask = body > cfg.infer.body_threshold
    if not mask.any():
        return np.zeros(body.shape, LABEL_DTYPE)
    if cfg.infer.contour_threshold < 1:
        # Confident cores away from the contour: touching cells whose cores join through a faint boundary
        # still get one marker each (a calibrated choice, training.validation; MISIC's markers merged them).
        markers, _ = ndi.label((body > cfg.infer.marker_threshold) & (contour < cfg.infer.contour_threshold))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            sh = shape_index(contour, 1.0)
        # MISIC's markers: connected confident cores, kept only where the contour map has a trough.
        markers, _ = ndi.label(body > cfg.infer.marker_threshold)
        markers[~(np.nan_to_num(sh, nan=1.0) < _TROUGH)] = 0
    if markers.any():
        # Marker remnants of a few pixels are noise in the contour map.
        sizes = np.bincount(markers.ravel())
        small = sizes < 3
        small[0] = False
        markers[small[markers]] = 0
    ws = watershed(contour, markers=markers, mask=mask, connectivity=1)
    # Mask regions no marker reached (cells without a confident core) are cells too, if large enough.
    rest, n_rest = ndi.label(mask & (ws == 0))
    if n_rest:
        sizes = np.bincount(rest.ravel())
        keep = sizes >= min_area(cfg)
        keep[0] = False
        ids = np.zeros(n_rest + 1, np.int64)
        ids[keep] = np.arange(1, int(keep.sum()) + 1) + int(ws.max())
        ws = np.where(rest > 0, ids[rest], ws)
    ws = _drop_small(ws, min_area(cfg))
    return relabel_sequential(ws.astype(LABEL_DTYPE))[0]


def _drop_small(labels: np.ndarray, area: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < area
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


# ------------------------------------------------------------------------------------------ scans
def halo(cfg: RunConfig) -> int:
    """Context around each window: a long cell (8 widths), so both windows see a seam cell the same way."""
    return max(48, int(round(8 * cfg.preprocess.width)))


def label_scan(prob, labels, cfg: RunConfig, chunk: int | None = None, progress=None) -> int:
    """Label a scan window by window: ``prob`` (2+, H, W) and ``labels`` (H, W) are Zarr (or NumPy) arrays.

    Returns the number of cells. Peak memory is a few copies of one (chunk + 2 halo)^2 window.
    """
    chunk = chunk or cfg.compute.chunk
    pairs, next_id = [], 1
    for b in B.blocks(tuple(labels.shape), chunk, halo(cfg)):
        wr, wc = b.window
        local = instances(np.moveaxis(np.asarray(prob[:2, wr, wc]), 0, -1), cfg)
        core = b.crop(local)
        ids = np.unique(core)
        ids = ids[ids > 0]
        lut = np.zeros(int(local.max()) + 1, np.int64)
        lut[ids] = np.arange(next_id, next_id + len(ids))
        next_id += len(ids)
        b.write(labels, lut[local].astype(LABEL_DTYPE))
        # Seams with the blocks above and to the left (already final): the line just outside this core,
        # as this window labels it (halo) and as the neighbour's core labelled it.
        (r0, r1), (c0, c1), (ir, ic) = b.rows, b.cols, b.inner
        if r0 > 0:
            pairs.append(B.seam_pairs(np.asarray(labels[r0 - 1, c0:c1]), lut[local[ir.start - 1, ic]]))
        if c0 > 0:
            pairs.append(B.seam_pairs(np.asarray(labels[r0:r1, c0 - 1]), lut[local[ir, ic.start - 1]]))
        if progress:
            progress()
    final = B.join(np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), np.int64), next_id)
    n_cells = int(final.max()) if next_id > 1 else 0
    if not np.array_equal(final, np.arange(len(final))):
        for b in B.blocks(tuple(labels.shape), chunk):
            part = np.asarray(labels[b.core])
            if part.any():
                labels[b.core] = final[part].astype(LABEL_DTYPE)
    return n_cells


SPECK_AREA = 0.5  # objects smaller than this many cell-width squares are specks


def drop_specks(labels: np.ndarray, width: float) -> np.ndarray:
    """Objects smaller than half a square of one cell width are specks, not cells.

    The smallest newborn rod (length ~2 w) covers ~1.8 w^2, and its body mask (inside MISIC's contour)
    still about w^2; fluorescent specks are round and at most about a cell width across.
    """
    sizes = np.bincount(labels.ravel())
    small = sizes < SPECK_AREA * width ** 2
    small[0] = False
    if not small.any():
        return labels
    out = labels.copy()
    out[small[labels]] = 0
    return out
