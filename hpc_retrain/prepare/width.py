"""Mean cell width from the data: what ``preprocess.mean_width: auto`` resolves to.

MISIC is scale-specific: it was trained on images rescaled so that the mean cell width is 10 px, and its
users pass that width by hand (``scale = 10 / mean_width``). Here it is measured instead, by a fixed-point
iteration with the pretrained model itself: segment a few fields at the current width guess, measure the
confident, whole cells, take their interquartile mean as the next guess, and stop when it moves by less
than 5 %. The segmentation's own scale bias shrinks from round to round, because each round segments
closer to the 10 px MISIC expects. The result is rounded to 0.1 px and then used, and saved, as an
ordinary number.

The fluorescence channel is measured when the plate has one (the same cells as the brightfield, and what
the training labels come from), so one width serves both channels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from hpc_retrain.config import ChannelPrep, RunConfig
from hpc_retrain.errors import HpcRetrainError

log = logging.getLogger(__name__)

START = 10.0  # first guess (px): MISIC's own working width, i.e. the image as it is
MAX_ROUNDS = 4
TOLERANCE = 0.05  # stop when the guess moves by less than this fraction
CROP = 1024  # px per side read from each field: plenty of cells, bounded time on large scans
CONFIDENT = 0.8  # mean body probability over a cell for it to count
MIN_CELLS = 5  # fewer measured cells than this in all fields together is "no cells"
GIVE = "give the width: --mean-width PX (prepare) or --set preprocess.mean_width=PX"


class WidthError(HpcRetrainError, ValueError):
    """The width could not be measured; the message names the plate and what to do."""


# ------------------------------------------------------------------------------------- one field
def cell_widths(labels: np.ndarray, body: np.ndarray | None = None, guess: float = START,
                confident: float = CONFIDENT) -> np.ndarray:
    """Width (px) of each confident, whole cell of an instance image.

    The width of a cell is 2 * max(EDT) - 0.5, EDT being each pixel's Euclidean distance to the nearest
    pixel outside that cell. For a rod, the largest inscribed disc spans the cylinder, so this is its
    diameter: the edge-to-edge pixel count across the cell, which is what a user measures by hand with a
    line across a cell and what MISIC's "mean width" means. On the pixel grid a strip n px wide has max EDT
    (n + 1) / 2 when n is odd (a centre pixel) and n / 2 when n is even, so 2 * max(EDT) is n + 1 or n:
    -0.5 is right on average over where the grid falls (+-0.5 px per cell). Unlike the minor axis of the
    moment ellipse it does not depend on the cell's length (a rectangle's minor axis is 1.15x its width)
    and holds for bent rods.

    Left out: cells touching the image border (cut, so too narrow or too short), specks smaller than half
    a square of the current guess (a rod is at least about one width long, so a real cell covers at least
    ~0.8 w^2), and, given ``body``, cells whose mean body probability is below ``confident``.
    """
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= 0.5 * guess ** 2
    keep[border] = False
    keep[0] = False
    if body is not None:
        mean_p = ndi.sum_labels(body, labels, np.arange(n + 1)) / np.maximum(area, 1)
        keep &= mean_p >= confident
    widths = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or not keep[i]:
            continue
        # Each cell on its own (padded by one background pixel), so touching neighbours bound its EDT.
        cell = np.pad(labels[sl] == i, 1)
        widths.append(2.0 * ndi.distance_transform_edt(cell).max() - 0.5)
    return np.asarray(widths)


def whole_cells(labels: np.ndarray, prob: np.ndarray, guess: float) -> tuple[np.ndarray, np.ndarray]:
    """Instances grown over their outline, and P(cell): the extent of each cell as MISIC sees it.

    MISIC's two classes are a cell's interior (body) and its outline (contour), so an instance (body >
    0.4) stops an outline's breadth inside the cell: measured alone it is about 1.5 px narrower at 7 px
    (1.3 px at 12 px) on synthetic cells, and iterating on it drifts to a width too small by that. The
    cell is where body + contour > 0.5; each instance takes the part of it within its outline's reach
    (a third of a width: the outline is 2-3 px of MISIC's 10 px cell).
    """
    from skimage.segmentation import expand_labels

    p_cell = np.clip(prob[..., 0] + prob[..., 1], 0, 1)
    grown = expand_labels(labels, distance=max(2.0, guess / 3))
    grown[p_cell <= 0.5] = 0
    return grown, p_cell


def _crop(arr, size: int = CROP) -> np.ndarray:
    """The central ``size`` x ``size`` window of a 2-D (Dask) array, in memory."""
    h, w = arr.shape[:2]
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    win = arr[r:r + size, c:c + size]
    return np.asarray(win.compute() if hasattr(win, "compute") else win)


# ---------------------------------------------------------------------------------- the iteration
def measure_widths(images: list[np.ndarray], cfg: RunConfig, model=None, prep: ChannelPrep | None = None,
                   start: float = START, rounds: int = MAX_ROUNDS, name: str = "images") -> tuple[float, dict]:
    """(mean width in px, details) of in-memory ``images`` of one channel (default: fluorescence)."""
    from hpc_retrain.inference import predictor as infer

    if model is None:
        from hpc_retrain.prepare import labels as L

        model = L.get_model(None)
    prep = prep or cfg.preprocess.fluorescence
    predict = infer.as_predictor(model, cfg)
    history: list[dict[str, Any]] = []
    w, measured, converged = float(start), None, False
    for _ in range(rounds):
        c = cfg.updated(preprocess__mean_width=w)
        found = []
        for k, im in enumerate(images):
            prob, lab = infer.segment_field(predict, im, c, prep=prep, source=f"{name} image {k}")
            cells, p_cell = whole_cells(lab, prob, w)
            found.append(cell_widths(cells, p_cell, guess=w))
        found = np.concatenate(found) if found else np.zeros(0)
        if len(found) < MIN_CELLS:
            history.append({"width": round(w, 2), "cells": int(len(found)), "measured": None})
            measured = None
            break
        # Interquartile mean: robust to merged pairs and fragments like the median, but not stuck on the
        # few values 2 * sqrt(k) - 0.5 a pixel grid allows for one cell (5.5, 5.8, 6.0, 6.7, 7.5 ... px).
        measured = float(stats.trim_mean(found, 0.25))
        history.append({"width": round(w, 2), "cells": int(len(found)), "measured": round(measured, 2)})
        log.debug("mean width: segmented at %.2f px, %d cells, %.2f px wide", w, len(found), measured)
        converged = abs(measured - w) < TOLERANCE * w
        w = measured
        if converged:
            break
    if measured is None:
        raise WidthError(f"{name}: no cells found in {len(images)} image(s) to measure the mean cell width "
                         f"(segmented at {history[-1]['width']:.1f} px); {GIVE}")
    if not converged:  # still usable (each round is closer), but say so
        log.warning("%s: mean width still moving after %d rounds (%s); using %.1f px", name, rounds,
                    " -> ".join(f"{h['measured']}" for h in history), measured)
    width = round(measured, 1)
    details = {"width": width, "cells": history[-1]["cells"], "rounds": history, "images": len(images),
               "converged": converged}
    return width, details


def measure_mean_width(plate, cfg: RunConfig, model=None, max_fields: int = 8,
                       channel: str | None = None) -> tuple[float, dict]:
    """(mean width in px, details) of ``plate``, from up to ``max_fields`` fields spread over it.

    ``channel``: the plate channel to measure; default the fluorescence when every field has it, else the
    brightfield. Fields that cannot be read or preprocessed are skipped (``prepare`` flags them later).
    """
    from hpc_retrain.imaging.preprocess import ImageError
    from hpc_retrain.io.plate import PlateError

    fl, bf = cfg.plate.fluorescence, cfg.plate.brightfield
    if channel is None:
        channel = fl if all(fl in f.channels for f in plate.fields) else bf
    prep = cfg.preprocess.fluorescence if channel == fl else cfg.preprocess.brightfield
    # Evenly spread over the plate's field list and chosen from it alone, so every job of an array that
    # segments a part of the plate (--wells) measures the same fields and gets the same width.
    n = len(plate.fields)
    picks = sorted(set(np.linspace(0, n - 1, min(n, max_fields)).round().astype(int).tolist())) if n else []
    images, used, skipped = [], [], []
    for i in picks:
        f = plate.fields[i]
        try:
            im = _crop(f.channel(channel))
            if not np.isfinite(im).all() or im.min() == im.max():
                raise ImageError(f"{f.source}: constant or non-finite image")
        except (PlateError, ImageError, OSError) as e:
            skipped.append(f"{f.key}: {e}")
            continue
        images.append(im)
        used.append(f.key)
    if not images:
        raise WidthError(f"{plate.path}: no readable {channel} field to measure the mean cell width "
                         f"({'; '.join(skipped[:3]) or 'no fields'}); {GIVE}")
    try:
        width, details = measure_widths(images, cfg, model, prep, name=f"{plate.path} ({channel})")
    except ImageError as e:
        raise WidthError(f"{plate.path}: cannot measure the mean cell width ({e}); {GIVE}") from None
    details.update(plate=str(plate.path), channel=channel, fields=used, skipped=skipped)
    if channel != fl:
        # Pretrained MISIC segments real brightfield poorly: 11.4 and 7.2 px on ColiCoords ds1 / ds2, whose
        # fluorescence gives 19.2 and 14.5 px. Synthetic brightfield without the envelope line is fine (7.1-7.4
        # px for 7 px cells); with it (synth's default) cells look hollow to the shape index and measure
        # 4.9-8.3 px by the seed.
        log.warning("mean width measured on %s, with no fluorescence channel: less reliable on real images; "
                    "check it, or give --set preprocess.mean_width=PX", channel)
    log.info("mean width: measured %.1f px from %d fields (%s, %d cells, %d rounds)", width, len(used),
             channel, details["cells"], len(details["rounds"]))
    return width, details


def resolve_mean_width(cfg: RunConfig, plate=None, channel: str | None = None, model=None) -> RunConfig:
    """``cfg`` with ``preprocess.mean_width`` a number: as given, or measured on ``plate`` when "auto".

    ``channel``: the channel about to be segmented, measured only when the plate has no fluorescence.
    """
    if cfg.preprocess.mean_width != "auto":
        return cfg
    if plate is None:
        from hpc_retrain.io.plate import open_plate

        plate = open_plate(cfg.plate)
    fl = cfg.plate.fluorescence
    use = fl if all(fl in f.channels for f in plate.fields) else (channel or cfg.plate.brightfield)
    width, _ = measure_mean_width(plate, cfg, model, channel=use)
    return cfg.updated(preprocess__mean_width=width)
