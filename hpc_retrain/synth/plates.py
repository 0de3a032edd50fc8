"""Synthetic paired transmitted-light (brightfield or phase contrast) / fluorescence fields of rod-shaped
bacteria with exact instance masks.

Used for tests, benchmarks and demos where real plates are absent: every field is a deterministic
function of its seed, and its ``masks`` are the very pixels the two channels were rendered from, so they
are a complete ground truth (unlike the partial masks of real data sets).

Cells are spherocylinders (capsules) lying in a monolayer: no two overlap, so every cell's mask is its
whole capsule. Most sit in microcolonies grown by division (:mod:`hpc_retrain.synth.placement`), packed side
by side and end to end, so touching cells are common; in brightfield a dark envelope line parts them, in
phase contrast (``modality="phase"``) cells are dark with a bright halo and bright lines between them.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi
from skimage import measure
from skimage.segmentation import relabel_sequential

from hpc_retrain.config import CHANNELS
from hpc_retrain.synth import placement as SP
from hpc_retrain.synth.params import U16, SynthError, SynthField, SynthParams

# 2: monolayers (cells grown into colonies and never overlapping), envelopes, the phase-contrast modality
GENERATOR_VERSION = 2


# ------------------------------------------------------------------------------------------ geometry
def _cell_widths(rng: np.random.Generator, p: SynthParams, n: int) -> np.ndarray:
    rel = np.clip(rng.normal(1.0, p.width_spread, n), 0.85, 1.15)
    return p.mean_width * rel


def _cell_lengths(rng: np.random.Generator, p: SynthParams, widths: np.ndarray) -> np.ndarray:
    return widths * rng.uniform(*p.length_range, widths.shape[0])


def _singles(rng: np.random.Generator, p: SynthParams, n: int, shape: tuple[int, int], pad: float) -> np.ndarray:
    widths = _cell_widths(rng, p, n)
    return np.column_stack([
        rng.uniform(-pad, shape[0] + pad, n),
        rng.uniform(-pad, shape[1] + pad, n),
        rng.uniform(0, np.pi, n),
        _cell_lengths(rng, p, widths),
        widths,
    ])


def _mean_cell_area(p: SynthParams) -> float:
    w = p.mean_width
    return w * w * (np.mean(p.length_range) - 1 + np.pi / 4)


def _layout(rng: np.random.Generator, p: SynthParams, shape: tuple[int, int]) -> np.ndarray:
    """Cells (cy, cx, angle, length, width) of a field, none overlapping another: microcolonies grown by
    division and relaxation (:mod:`hpc_retrain.synth.placement`), then single cells where there is room,
    until they cover ``density`` of the field."""
    pad = p.mean_width * p.length_range[1] / 2
    n_cells = p.density * (shape[0] + pad) * (shape[1] + pad) / _mean_cell_area(p)
    n_col_cells = n_cells * p.colony_fraction
    n_colonies = int(rng.poisson(n_col_cells / p.colony_size)) if n_col_cells > 0 else 0
    rods = SP.Rods(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    if n_colonies:
        centres = np.column_stack([rng.uniform(-pad, shape[1] + pad, n_colonies),
                                   rng.uniform(-pad, shape[0] + pad, n_colonies)])  # (x, y)
        sizes = np.maximum(1, rng.poisson(p.colony_size, n_colonies))
        rods = SP.grow_colonies(rng, centres, sizes, lambda k: _cell_widths(rng, p, k), p.length_range,
                                p.angle_jitter_deg)
    # Area in the field so far, counting a cell whose centre lies in the field as wholly inside (cells
    # across the edge balance those outside it that reach in).
    inside = (rods.xy[:, 0] >= 0) & (rods.xy[:, 0] < shape[1]) & (rods.xy[:, 1] >= 0) & (rods.xy[:, 1] < shape[0])
    have = float((rods.width ** 2 * (rods.length / rods.width - 1 + np.pi / 4))[inside].sum())
    need = p.density * shape[0] * shape[1] - have
    # Singles are over-drawn (those landing on cells are refused); drawing stops once they cover ``need``.
    n_single = int(rng.poisson(3.0 * max(need, 0.0) / _mean_cell_area(p) + 2.0 * n_cells * (1 - p.colony_fraction)))
    s = _singles(rng, p, n_single, shape, pad)
    cand = SP.Rods(s[:, [1, 0]], s[:, 2], s[:, 3], s[:, 4])
    w = cand.width
    areas = w * w * (cand.length / w - 1 + np.pi / 4)
    areas = areas * ((s[:, 0] >= 0) & (s[:, 0] < shape[0]) & (s[:, 1] >= 0) & (s[:, 1] < shape[1]))
    rods = SP.add_singles(rods, cand, areas, need)
    return SP.as_cells(SP.without_overlaps(rods))


def _place(cells: np.ndarray, shape: tuple[int, int], p: SynthParams
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise capsules (which do not overlap) into an instance image.

    Returns the labels (cell i of ``cells`` is label i + 1), each cell pixel's radial position in its cell
    (0 on the axis, 1 on the surface) and, for every pixel within a band around the cells, the signed
    distance to the nearest cell surface (px, negative inside; +inf farther out): the envelopes are drawn
    from it, across the boundary between touching cells too."""
    H, W = shape
    labels = np.zeros(shape, np.int32)
    sdf = np.full(shape, np.inf, np.float32)
    rho = np.ones(shape, np.float32)
    band = 3.0 * _envelope_sigma(p)
    for k, (cy, cx, ang, length, width) in enumerate(cells):
        r = width / 2
        half = max(length / 2 - r, 0.0)
        dy, dx = np.sin(ang) * half, np.cos(ang) * half
        ext = r + band
        y0, y1 = int(np.floor(cy - abs(dy) - ext)), int(np.ceil(cy + abs(dy) + ext)) + 1
        x0, x1 = int(np.floor(cx - abs(dx) - ext)), int(np.ceil(cx + abs(dx) + ext)) + 1
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        # Distance to the axis segment: project onto it, clamp to its ends.
        ux, uy = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        t = np.clip(xx * ux + yy * uy, -half, half)
        d = np.hypot(xx - t * ux, yy - t * uy)
        s = d - np.float32(r)
        sl = (slice(y0, y1), slice(x0, x1))
        nearer = s < sdf[sl]
        sdf[sl][nearer] = s[nearer]
        # Capsules are apart (placement.GAP), so no pixel lies inside two: the owner is unique.
        inside = s <= 0
        labels[sl][inside] = k + 1
        rho[sl][inside] = d[inside] / np.float32(r)
    return labels, rho, sdf


def _tidy(labels: np.ndarray, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop slivers at the image edge (and any stray fragment a cell's raster might have there), then
    number cells 1..n; also returns, for each new label 1..n, its label before."""
    # skimage's label splits on value changes too, so each component lies inside one cell.
    comp = measure.label(labels, background=0, connectivity=1)
    sizes = np.bincount(comp.ravel())
    owner = np.zeros(sizes.size, np.int64)
    owner[comp.ravel()] = labels.ravel()
    ids = np.arange(1, sizes.size)
    # For each cell keep only its largest component.
    order = ids[np.lexsort((-sizes[ids], owner[ids]))]
    _, first = np.unique(owner[order], return_index=True)
    keep = np.zeros(sizes.size, bool)
    best = order[first]
    keep[best[sizes[best] >= min_area]] = True
    out = np.where(keep[comp], labels, 0)
    new, _, inverse = relabel_sequential(out)
    return new.astype(np.int32), np.asarray(inverse[np.arange(1, int(new.max()) + 1)], np.int64)


# ----------------------------------------------------------------------------------------- rendering
def _illumination(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative field: a tilted plane plus a broad off-centre vignette, mean 1."""
    H, W = shape
    y = (np.arange(H, dtype=np.float32)[:, None] - H / 2) / max(H, W)
    x = (np.arange(W, dtype=np.float32)[None, :] - W / 2) / max(H, W)
    a = rng.uniform(0, 2 * np.pi)
    plane = np.float32(np.cos(a)) * x + np.float32(np.sin(a)) * y  # spans about -0.5..0.5
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    vignette = -((y - np.float32(cy)) ** 2 + (x - np.float32(cx)) ** 2)
    field = 0.6 * plane + 0.4 * vignette
    field -= field.mean()
    return (1 + amplitude * field / max(float(np.ptp(field)), 1e-6)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-s.d. Gaussian random field of correlation length ``sigma`` (computed on a coarse grid)."""
    step = max(1, int(sigma // 2))
    small = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2)).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma / step)
    small /= max(float(small.std()), 1e-6)
    big = ndi.zoom(small, step, order=1, grid_mode=False) if step > 1 else small
    return big[: shape[0], : shape[1]]


def _camera(rng: np.random.Generator, expected: np.ndarray, gain: float, read_noise: float,
            offset: float = 0.0) -> np.ndarray:
    """Photon shot noise at ``gain`` counts per photon, read noise and an electronic offset, as uint16."""
    lam = np.maximum(expected, 0) / np.float32(gain)
    if lam.min() > 1000:
        # Bright images (brightfield): the normal limit of Poisson is exact to well below a count, and fast.
        photons = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    else:
        photons = rng.poisson(lam).astype(np.float32)
    img = photons * np.float32(gain) + np.float32(offset)
    img += np.float32(read_noise) * rng.standard_normal(lam.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, U16).astype(np.uint16)


def _envelope_sigma(p: SynthParams) -> float:
    return max(0.5, p.bf_envelope_sigma * p.mean_width)


def _brightfield(rng: np.random.Generator, labels: np.ndarray, rho: np.ndarray, sdf: np.ndarray,
                 p: SynthParams) -> np.ndarray:
    n = int(labels.max())
    contrast = np.concatenate([[0.0], p.bf_contrast * np.clip(rng.normal(1, p.bf_contrast_spread, n), 0.6, 1.4)])
    cell = labels > 0
    # The cytoplasm is evenly dark, a little more towards the rim; the envelope is a darker line on the
    # surface, drawn from the distance to the nearest surface, so two touching cells are parted by a dark
    # line lighter cytoplasm on either side of it (as colonies look in brightfield).
    shade = np.where(cell, 0.6 + 0.15 * rho * rho, 0).astype(np.float32)
    dark = contrast[labels].astype(np.float32) * shade
    env = np.exp(-0.5 * (sdf / np.float32(_envelope_sigma(p))) ** 2)
    dark += np.float32(p.bf_envelope * p.bf_contrast) * env
    # A thin bright halo hugs the outside of cells (defocus ring).
    near = ndi.gaussian_filter(cell.astype(np.float32), 0.3 * p.mean_width)
    halo = np.where(cell, 0, np.minimum(2 * near, 1)) * np.float32(p.bf_halo * p.bf_contrast)
    img = np.float32(p.bf_background) - dark + halo
    return _transmitted(rng, img, labels.shape, p)


def _phase(rng: np.random.Generator, labels: np.ndarray, rho: np.ndarray, p: SynthParams) -> np.ndarray:
    """Positive phase contrast: cells dark in proportion to their thickness, and the bright halo the phase
    ring makes. The image is the background less a high-pass of the phase map (the phase less a broad blur
    of it), so light is taken from a cell and spread around it: bright halos outside cells, bright lines
    where two cells touch (the phase map is thin there), and the shade-off that lightens the middle of
    a large colony."""
    n = int(labels.max())
    depth = np.concatenate([[0.0], p.ph_depth * np.clip(rng.normal(1, p.ph_depth_spread, n), 0.6, 1.4)])
    cell = labels > 0
    phi = np.where(cell, depth[labels] * np.sqrt(np.clip(1 - rho * rho, 0, 1)), 0).astype(np.float32)
    spread = ndi.gaussian_filter(phi, p.ph_halo_sigma * p.mean_width)
    img = np.float32(p.ph_background) * (1 - phi + np.float32(p.ph_halo) * spread)
    return _transmitted(rng, img, labels.shape, p)


def _transmitted(rng: np.random.Generator, img: np.ndarray, shape: tuple[int, int], p: SynthParams) -> np.ndarray:
    """The optics and camera a transmitted-light image goes through: blur, uneven illumination, condenser
    texture, noise."""
    img = ndi.gaussian_filter(img, p.psf)
    texture = 1 + np.float32(p.bf_mottle) * _smooth_noise(rng, shape, 3 * p.mean_width)
    img *= _illumination(rng, shape, p.bf_gradient) * texture
    return _camera(rng, img, p.bf_gain, p.bf_read_noise)


def _fluorescence(rng: np.random.Generator, labels: np.ndarray, rho: np.ndarray, p: SynthParams) -> np.ndarray:
    n = int(labels.max())
    bright = np.concatenate([[0.0], p.fl_brightness * rng.lognormal(0, p.fl_brightness_spread, n)])
    cell = labels > 0
    # Signal follows the projected thickness of a cylinder, plus out-of-focus light filling the edges.
    thickness = np.where(cell, 0.3 + 0.7 * np.sqrt(np.clip(1 - rho * rho, 0, 1)), 0).astype(np.float32)
    img = bright[labels].astype(np.float32) * thickness
    n_debris = int(rng.poisson(p.debris_per_mpx * labels.size / 1e6))
    if n_debris:
        ys = rng.integers(0, labels.shape[0], n_debris)
        xs = rng.integers(0, labels.shape[1], n_debris)
        keep = ~cell[ys, xs]
        amp = p.fl_brightness * rng.uniform(0.05, 0.3, n_debris) * (1 + 2 * p.fl_psf) ** 2
        np.add.at(img, (ys[keep], xs[keep]), amp[keep].astype(np.float32))
    img = ndi.gaussian_filter(img, p.fl_psf)
    img += np.float32(p.fl_background)
    img *= _illumination(rng, labels.shape, p.fl_gradient)
    return _camera(rng, img, p.fl_gain, p.fl_read_noise, p.fl_offset)


def render_field(seed: int, shape: Sequence[int] = (512, 512), mean_width: float = 7.0, density: float = 0.3,
                 **params: Any) -> SynthField:
    """Render one field; the same seed, shape and parameters always give identical arrays.

    ``params`` are further :class:`SynthParams` fields (e.g. ``colony_fraction=0``, ``psf_sigma=1.5``).
    """
    p, shape = _checked(shape, mean_width, density, params)
    rng = np.random.default_rng(seed)
    cells = _layout(rng, p, shape)
    labels, rho, sdf = _place(cells, shape, p)
    labels, before = _tidy(labels, min_area=0.5 * p.mean_width ** 2)
    transmitted = _phase(rng, labels, rho, p) if p.modality == "phase" else _brightfield(rng, labels, rho, sdf, p)
    fl = _fluorescence(rng, labels, rho, p)
    return SynthField(transmitted, fl, labels, int(seed), _params_dict(p), cells=cells[before - 1])


def _checked(shape: Sequence[int], mean_width: float, density: float, params: dict[str, Any]
             ) -> tuple[SynthParams, tuple[int, int]]:
    if len(shape) != 2 or min(int(s) for s in shape) < 1:
        raise SynthError(f"synthetic field: shape must be two positive sizes (Y, X), got {tuple(shape)}")
    unknown = set(params) - set(SynthParams.__dataclass_fields__)
    if unknown:
        raise SynthError(f"synthetic field: unknown parameter(s) {sorted(unknown)}; "
                         f"known: {sorted(SynthParams.__dataclass_fields__)}")
    p = SynthParams(mean_width=float(mean_width), density=float(density), **params)
    p.check()
    return p, (int(shape[0]), int(shape[1]))


def _params_dict(p: SynthParams) -> dict[str, Any]:
    d = asdict(p)
    d["length_range"] = list(p.length_range)
    d["psf_sigma"], d["fl_psf_sigma"] = p.psf, p.fl_psf
    return d


# ------------------------------------------------------------------------------------------- plates
def field_seed(seed: int, well: str, field: int) -> int:
    """Seed of one field: stable across runs and Python versions (no built-in ``hash``)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(well.upper().encode()), int(field)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def check_wells(wells: Sequence[str], path: str | Path = "synthetic plate") -> None:
    """Refuse well names that are not a row letter and a column number, and two names of one well (A1, A01)."""
    from hpc_retrain.io.ngff import split_well

    seen: dict[tuple[str, str], str] = {}
    for w in wells:
        try:
            rc = split_well(w)
        except ValueError as e:
            raise SynthError(f"{path}: {e}") from None
        if rc in seen:
            raise SynthError(f"{path}: duplicate wells: {seen[rc]!r} and {w!r} are the same well ({rc[0]}{rc[1]}); "
                             f"give each well once")
        seen[rc] = w


def own_plate_problem(path: str | Path) -> str | None:
    """None when folder ``path`` is a plate ``write_plate`` wrote (its ``synth.json``, and nothing at its top
    level that the plate does not consist of), else why not: what ``synth --overwrite`` may replace."""
    path = Path(path)
    try:
        record = json.loads((path / "synth.json").read_text())
        fmt, fields = record["format"], record["fields"]
        if record.get("generator") != "hpc_retrain.synth.plates":
            raise ValueError
    except FileNotFoundError:
        return "it holds no synth.json"
    except (OSError, ValueError, KeyError, TypeError):
        return "its synth.json was not written by synth"
    expected = {"synth.json"}
    try:
        if fmt == "tiff":
            expected |= {f"{f['well']}_s{f['field']}_{ch}.tif" for f in fields for ch in (*CHANNELS, "masks")}
        else:
            from hpc_retrain.io.ngff import split_well

            expected |= {"zarr.json"} | {split_well(f["well"])[0] for f in fields}
    except (KeyError, TypeError, ValueError):
        return "its synth.json was not written by synth"
    other = sorted(set(os.listdir(path)) - expected)
    if other:
        return f"it holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, which synth does not write"
    return None


def write_plate(path: str | Path, *, fmt: Literal["ome-zarr", "tiff"] = "ome-zarr",
                wells: Sequence[str] = ("A1", "A2"), fields_per_well: int = 2,
                shape: Sequence[int] = (512, 512), seed: int = 0, mean_width: float = 7.0,
                density: float = 0.3, name: str = "synthetic", **params: Any) -> Path:
    """Write a synthetic plate with true masks; fields are numbered from 0 in both formats.

    ``tiff``: ``{well}_s{field}_{channel}.tif`` for brightfield, fluorescence and masks in folder ``path``.
    ``ome-zarr``: an HCS plate with channels brightfield, fluorescence and the label image ``truth``.
    Either way ``synth.json`` in ``path`` records the generator, its parameters and every field's seed.
    """
    path = Path(path)
    wells = list(wells)
    if fmt not in ("ome-zarr", "tiff"):
        raise SynthError(f"{path}: unknown plate format {fmt!r}; use 'ome-zarr' or 'tiff'")
    if not wells or fields_per_well < 1:
        raise SynthError(f"{path}: a plate needs at least one well and one field per well")
    check_wells(wells, path)
    # Refuse bad parameters before anything is written.
    p, shape = _checked(shape, mean_width, density, params)

    record: dict[str, Any] = {"generator": "hpc_retrain.synth.plates", "version": GENERATOR_VERSION, "seed": int(seed),
                              "shape": list(shape), "format": fmt, "params": _params_dict(p), "fields": []}
    plate = None
    if fmt == "tiff":
        import tifffile

        path.mkdir(parents=True, exist_ok=True)
    else:
        from hpc_retrain.io import ngff

        plate = ngff.create_plate(path, wells, fields_per_well, name=name)
    for well in wells:
        for f in range(fields_per_well):
            fs = field_seed(seed, well, f)
            sf = render_field(fs, shape, mean_width=mean_width, density=density, **params)
            record["fields"].append({"well": well, "field": f, "seed": fs, "cells": sf.n_cells})
            if fmt == "tiff":
                for ch, arr in (*sf.channels().items(), ("masks", sf.masks)):
                    tifffile.imwrite(path / f"{well}_s{f}_{ch}.tif", arr, compression="zlib")
            else:
                img = np.stack([sf.brightfield, sf.fluorescence])
                grp = ngff.write_field(plate, well, f, img, list(sf.channels()))
                ngff.write_labels(grp, "truth", sf.masks)
    if plate is not None:
        plate.attrs["hpc_retrain_synth"] = {k: v for k, v in record.items() if k != "fields"}
    (path / "synth.json").write_text(json.dumps(record, indent=1))
    return path
