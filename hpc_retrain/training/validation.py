"""Validation that measures what a user gets: instance F1 on the held-out fields, and thresholds fitted there.

Pixel IoU at a fixed 0.5 threshold is a poor guide for a MISIC-style model: the weighted loss shifts the
probabilities, so a model can gain pixel overlap while its cells merge or fragment under the fixed
post-processing. This module scores each validation field the way ``segment`` would, with the same
instance pipeline (``instances.instances``), against the teacher's cells:

* everything happens in the store's rescaled space (cells 10 px wide), from the stored tiles, so no image
  is read again; predicted tiles are stitched back with MISIC's crop-and-stitch;
* the teacher's cells are ``instances`` of the stored MISIC probabilities of the fluorescence (the source
  of the labels) under MISIC's own post-processing (body 0.4, markers 0.95), less the objects
  ``labels.clean`` took out of the labels (specks, blobs too dim to be cells), so a student that rightly
  ignores them is not penalised;
* :meth:`FieldValidator.calibrate` picks the body and marker thresholds that maximise F1@0.5 on these
  fields: the class weighting shifts a retrained model's probabilities, so MISIC's 0.4/0.95 need not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging import metrics
from hpc_retrain.imaging.preprocess import SCALED_WIDTH
from hpc_retrain.imaging.tiling import TileGrid, stitch_tiles
from hpc_retrain.inference import instances as I
from hpc_retrain.prepare import store as st

# Fewer teacher cells than this and calibration is noise: one cell moves F1 by more than a threshold does
# (ColiCoords, 1 validation field of ~5 cells: body 0.25 fitted there tripled the false positives on
# held-out fields). MISIC's own thresholds are kept then.
MIN_CALIBRATION_CELLS = 30
BODY_GRID = tuple(np.round(np.arange(0.2, 0.81, 0.05), 2))
MARKER_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# 1: MISIC's markers (cores in a trough of the contour map); below 1, cores where the contour is below it. On
# the demo's dense colonies the best of these on the validation fields lifted F1 against the true masks from
# 0.755 to 0.8x (benchmarks/RESULTS.md, 6c).
CONTOUR_GRID = (1.0, 0.3, 0.5, 0.7)


@dataclass(frozen=True)
class Thresholds:
    body: float
    marker: float
    f1: float
    contour: float = 1.0


class FieldValidator:
    """The validation fields of a store, with the teacher's cells, ready to score predicted tiles."""

    def __init__(self, root, fields: np.ndarray, cfg: RunConfig):
        # In the rescaled space cells are SCALED_WIDTH wide whatever the plate's mean width.
        self.cfg = cfg.updated(preprocess__mean_width=SCALED_WIDTH)
        teacher_cfg = I.misic_postprocessing(self.cfg)
        ent = st.entries(root)
        size, margin = int(root["targets"].shape[1]), cfg.tiling.margin
        self.fields = [ent[int(i)] for i in fields]
        self.grids = [TileGrid(tuple(e.scaled_shape), size, margin) for e in self.fields]
        self.teacher = []
        for e, grid in zip(self.fields, self.grids):
            prob = stitch_tiles(np.asarray(root["probabilities"][e.tiles], np.float32), grid)
            body = stitch_tiles(np.asarray(root["labels"][e.tiles]), grid)[..., 0]
            if prob.any():
                # MISIC's cells, less the objects ``labels.clean`` took out of the labels (no body label left)
                cells = I.instances(prob, teacher_cfg)
                gone = np.unique(cells[(cells > 0) & (body == 0)])
                cells[np.isin(cells, gone)] = 0
            else:  # a store without MISIC's probabilities (made by hand): the body label's regions
                cells = ndi.label(body)[0].astype(I.LABEL_DTYPE)
            self.teacher.append(I.drop_specks(cells, SCALED_WIDTH))
        # Teacher cells over all validation fields: counted once (training reads it every epoch).
        self.n_cells = sum(len(np.unique(t)) - 1 for t in self.teacher)

    @property
    def n_tiles(self) -> int:
        return sum(e.n_tiles for e in self.fields)

    def stitch(self, tile_probs: np.ndarray) -> list[np.ndarray]:
        """Per-field probabilities from the predicted validation tiles (in the store's field order)."""
        out, k = [], 0
        for e, grid in zip(self.fields, self.grids):
            out.append(stitch_tiles(np.asarray(tile_probs[k:k + e.n_tiles], np.float32), grid))
            k += e.n_tiles
        return out

    def score(self, probs: list[np.ndarray], body: float | None = None, marker: float | None = None,
              contour: float | None = None) -> metrics.Score:
        """F1@0.5 (and the rest of the counts) over all validation fields."""
        cfg, inf = self.cfg, self.cfg.infer
        if body is not None or marker is not None or contour is not None:
            cfg = cfg.updated(infer__body_threshold=body if body is not None else inf.body_threshold,
                              infer__marker_threshold=marker if marker is not None else inf.marker_threshold,
                              infer__contour_threshold=contour if contour is not None else inf.contour_threshold)
        total = metrics.Score(0.5, 0, 0, 0, 0.0)
        for prob, ref in zip(probs, self.teacher):
            total = total + metrics.match(ref, I.instances(prob, cfg), (0.5,))[0]
        return total

    def calibrate(self, probs: list[np.ndarray]) -> Thresholds:
        """The (body, marker, contour) thresholds with the best F1@0.5; ties go to the values nearest MISIC's."""
        best = None
        ref = RunConfig().infer
        for c in CONTOUR_GRID:
            for b in BODY_GRID:
                for m in MARKER_GRID:
                    if m <= b:
                        continue
                    f1 = self.score(probs, b, m, c).f1
                    key = (round(f1, 6), -abs(b - ref.body_threshold) - abs(m - ref.marker_threshold)
                           - abs(c - ref.contour_threshold))
                    if best is None or key > best[0]:
                        best = (key, Thresholds(float(b), float(m), float(f1), float(c)))
        return best[1]

