"""A small, real training store for the training tests: synthetic fields -> shape-index tiles + labels.

Targets are the brightfield shape-index features MISIC sees, and labels (body, contour) come from the very
cells those images were rendered from, so a model can actually learn the mapping. Fields are small enough
that each gives exactly one 256 px tile after the 10/7 rescale, which keeps training tests cheap.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging.preprocess import features_np, rescaled_shape
from hpc_retrain.imaging.tiling import extract_tiles
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st
from hpc_retrain.synth.plates import render_field

_Field = namedtuple("_Field", "well field source shape")


def build_store(path: Path, n_fields: int = 8, field_px: int = 150, seed: int = 0,
                cfg: RunConfig | None = None) -> Path:
    cfg = cfg or RunConfig()
    if cfg.preprocess.mean_width == "auto":  # the rendered cells are 7 px wide: no need to measure them
        cfg = cfg.updated(preprocess__mean_width=7.0)
    size, margin = cfg.tiling.size, cfg.tiling.margin
    fields = [_Field(f"A{1 + i // 4}", str(i % 4), f"synthetic:{seed}:{i}", (field_px, field_px))
              for i in range(n_fields)]
    entries = layout.plan_fields(fields, cfg.preprocess.scale, size, margin)
    with st.writing_every_chunk():  # as prepare writes: every tile has its chunk file, even an all-zero one
        root = st.create(path, entries, cfg.to_dict(), size)
        _fill(root, entries, cfg, field_px, seed)
    return Path(path)


def _fill(root, entries, cfg: RunConfig, field_px: int, seed: int) -> None:
    size, margin = cfg.tiling.size, cfg.tiling.margin
    body_col, cont_col = layout.QC_COLUMNS.index("positive_body"), layout.QC_COLUMNS.index("positive_contour")
    for e in entries:
        f = render_field(seed * 1000 + e.index, (field_px, field_px))
        x = features_np(f.brightfield, cfg.preprocess.brightfield, cfg.preprocess, source=e.source)
        masks = resize(f.masks, rescaled_shape(f.masks.shape, cfg.preprocess.scale), order=0,
                       preserve_range=True, anti_aliasing=False).astype(np.int32)
        assert masks.shape == x.shape[:2]
        lab = np.stack([masks > 0, find_boundaries(masks, mode="inner")], axis=-1).astype(np.uint8)
        tx, _ = extract_tiles(x.astype(np.float32), size, margin)
        ty, _ = extract_tiles(lab, size, margin)
        root["targets"][e.tiles] = tx
        root["labels"][e.tiles] = ty
        qc = np.full(len(layout.QC_COLUMNS), np.nan, np.float32)
        qc[body_col], qc[cont_col] = lab[..., 0].mean(), lab[..., 1].mean()
        root["field_qc"][e.index] = qc
        root["field_status"][e.index] = layout.OK
        root["field_done"][e.index] = 1
