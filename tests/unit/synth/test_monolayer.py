"""Synthetic colonies are monolayers: no two cells overlap, masks are whole cells, dense colonies touch side by
side and end to end, and the transmitted light shows it (envelope lines in brightfield, halos in phase)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from hpc_retrain.config import PlateConfig
from hpc_retrain.io.plate import open_plate
from hpc_retrain.synth import placement as SP
from hpc_retrain.synth import plates as synth

W = 7.0


@pytest.fixture(scope="module")
def dense() -> synth.SynthField:
    return synth.render_field(21, (512, 512), mean_width=W, density=0.25)


@pytest.fixture(scope="module")
def dense_phase() -> synth.SynthField:
    return synth.render_field(21, (512, 512), mean_width=W, density=0.25, modality="phase")


def capsule_distance(shape, cy, cx, ang, length, width) -> np.ndarray:
    """Each pixel centre's distance to the capsule's axis segment: written here, not taken from synth, so
    the tests check synth's drawing."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    yy, xx = yy - cy, xx - cx
    u = np.array([np.cos(ang), np.sin(ang)])
    half = max(length / 2 - width / 2, 0.0)
    t = np.clip(xx * u[0] + yy * u[1], -half, half)
    return np.hypot(xx - t * u[0], yy - t * u[1])


def capsule(shape, cy, cx, ang, length, width) -> np.ndarray:
    """Pixels whose centres lie in the capsule."""
    return capsule_distance(shape, cy, cx, ang, length, width) <= width / 2


def touching_pairs(m: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1, :], m[1:, :])):
        t = (a != b) & (a > 0) & (b > 0)
        pairs.update(zip(np.minimum(a[t], b[t]).tolist(), np.maximum(a[t], b[t]).tolist()))
    return pairs


def min_gap(cells: np.ndarray) -> float:
    """The smallest surface-to-surface distance over every pair of capsules (negative: they overlap)."""
    n = len(cells)
    i, j = np.triu_indices(n, 1)
    xy, ang, length, width = cells[:, [1, 0]], cells[:, 2], cells[:, 3], cells[:, 4]
    u = np.column_stack([np.cos(ang), np.sin(ang)])
    h = np.maximum(length / 2 - width / 2, 0)
    d = SP.closest_points(xy[i], u[i], h[i], xy[j], u[j], h[j])[2]
    return float((d - (width[i] + width[j]) / 2).min())


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("density", [0.25, 0.35])
def test_no_two_cells_overlap_anywhere(density):
    f = synth.render_field(5, (384, 384), mean_width=W, density=density)
    assert f.cells is not None and len(f.cells) == f.n_cells > 100
    # As shapes: every pair of capsules keeps apart (the closest two just touch).
    assert min_gap(f.cells) >= 0
    # As pixels: each cell's capsule drawn on its own claims no pixel another capsule claims.
    claims = np.zeros(f.masks.shape, np.int32)
    for c in f.cells:
        claims += capsule(f.masks.shape, *c)
    assert claims.max() == 1


def test_masks_are_whole_cells(dense):
    """Truth is complete: every cell's mask is exactly its capsule (where it lies in the field), never a
    fragment left by a neighbour drawn over it."""
    m = dense.masks
    for k in range(1, dense.n_cells + 1):
        c = dense.cells[k - 1]
        differ = (m == k) != capsule(m.shape, *c)
        # (a pixel centre on the surface itself may fall either way in float32)
        on_surface = np.abs(capsule_distance(m.shape, *c) - c[4] / 2) < 1e-3
        assert not (differ & ~on_surface).any(), f"cell {k}: {int(differ.sum())} pixels differ from its capsule"


def test_dense_colonies_pack_side_by_side_and_end_to_end(dense):
    pairs = touching_pairs(dense.masks)
    assert len(pairs) > 0.5 * dense.n_cells
    side = end = 0
    for a, b in pairs:
        ca, cb = dense.cells[a - 1], dense.cells[b - 1]
        dang = abs((ca[2] - cb[2] + np.pi / 2) % np.pi - np.pi / 2)
        if dang > np.deg2rad(20):
            continue
        u = np.array([np.sin(ca[2]), np.cos(ca[2])])  # axis of a in (y, x)
        off = cb[:2] - ca[:2]
        along, across = abs(off @ u), abs(off[0] * u[1] - off[1] * u[0])
        # End to end: the axes nearly in line, the centres apart by about the two half lengths.
        end += across < 0.5 * W and along > 0.8 * (ca[3] + cb[3]) / 2
        # Side by side: the axes a width apart, overlapping along their length.
        side += 0.8 * W < across < 1.3 * W and along < 0.5 * (ca[3] + cb[3]) / 2
    assert side > 0.2 * len(pairs), (side, end, len(pairs))
    assert end > 0.03 * len(pairs), (side, end, len(pairs))


def test_cells_cover_the_density_asked_for():
    for density in (0.1, 0.25, 0.3):
        f = synth.render_field(8, (384, 384), mean_width=W, density=density)
        assert abs((f.masks > 0).mean() - density) < 0.2 * density


def pile(seed: int, n: int = 40) -> SP.Rods:
    rng = np.random.default_rng(seed)
    return SP.Rods(rng.normal(50, 5, (n, 2)), rng.uniform(0, np.pi, n), rng.uniform(2 * W, 5 * W, n), np.full(n, W))


def test_a_pile_of_crossing_rods_relaxes_into_a_monolayer():
    cells = SP.as_cells(SP.without_overlaps(pile(0)))
    assert len(cells) >= 30
    assert min_gap(cells) >= 0


def test_rods_that_cannot_be_parted_are_dropped(monkeypatch):
    """The guarantee does not rest on the relaxation converging: with no sweeps at all, overlapping rods
    are removed until none overlap."""
    monkeypatch.setattr(SP, "SETTLE_ITERS", 0)
    cells = SP.as_cells(SP.without_overlaps(pile(1)))
    assert 1 <= len(cells) < 40
    assert min_gap(cells) >= 0


# ------------------------------------------------------------------------------------------ the seed
def test_the_same_seed_gives_the_same_plate(tmp_path):
    kw = dict(fmt="tiff", wells=("A1", "B2"), fields_per_well=2, shape=(160, 192), density=0.25)
    a = synth.write_plate(tmp_path / "a", seed=7, **kw)
    b = synth.write_plate(tmp_path / "b", seed=7, **kw)
    c = synth.write_plate(tmp_path / "c", seed=8, **kw)
    names = sorted(p.name for p in a.glob("*.tif"))
    assert len(names) == 12
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names if "masks" in n)
    p1 = synth.render_field(3, (256, 256), modality="phase")
    p2 = synth.render_field(3, (256, 256), modality="phase")
    np.testing.assert_array_equal(p1.brightfield, p2.brightfield)
    np.testing.assert_array_equal(p1.masks, p2.masks)


# ------------------------------------------------------------------------------------------ how they look
def contact_and_axis(f: synth.SynthField) -> tuple[np.ndarray, np.ndarray]:
    """Cell pixels next to another cell (the envelope between touching cells), and pixels on cell axes
    (deep inside) of the same cells."""
    m = f.masks
    contact = np.zeros(m.shape, bool)
    for a, b, sl_a, sl_b in ((m[:, :-1], m[:, 1:], np.s_[:, :-1], np.s_[:, 1:]),
                             (m[:-1, :], m[1:, :], np.s_[:-1, :], np.s_[1:, :])):
        t = (a != b) & (a > 0) & (b > 0)
        contact[sl_a] |= t
        contact[sl_b] |= t
    touching = np.isin(m, np.unique(m[contact]))
    depth = ndi.distance_transform_edt(m > 0)
    axis = touching & (depth >= 0.4 * W) & ~ndi.binary_dilation(contact, iterations=2)
    return contact, axis


def test_brightfield_parts_touching_cells_with_a_dark_envelope(dense):
    contact, axis = contact_and_axis(dense)
    bf = dense.brightfield.astype(float)
    assert contact.sum() > 2000 and axis.sum() > 2000
    # Where two cells touch is darker than the middle of either (the contrast is ~4000 counts, the noise
    # per pixel ~250): the line a model can learn to split them along.
    assert np.median(bf[contact]) < np.median(bf[axis]) - 600
    # ... and both are cell, well below the background.
    assert np.median(bf[axis]) < np.median(bf[dense.masks == 0]) - 1500


def test_phase_contrast_has_dark_cells_and_a_bright_halo():
    f = synth.render_field(4, (512, 512), mean_width=W, density=0.05, colony_fraction=0.0, modality="phase")
    assert f.modality == "phase" and list(f.channels()) == ["phase", "fluorescence"]
    img, cell = f.brightfield.astype(float), f.masks > 0
    dist = ndi.distance_transform_edt(~cell)
    far = np.median(img[dist > 3 * W])
    ring = np.median(img[(dist > 0) & (dist <= 3)])
    core = np.median(img[ndi.distance_transform_edt(cell) >= 0.4 * W])
    # The halo: just outside the cells brighter than the background far from them, by > 6 %.
    assert ring > 1.06 * far, (ring, far)
    # The cells: dark, well below the background along their axes.
    assert core < 0.75 * far, (core, far)
    # The profile outwards from a cell: dark inside, peaks in the halo within a cell width, then back down.
    prof = [np.median(img[(dist > r - 1) & (dist <= r)]) for r in range(1, 12)]
    peak = int(np.argmax(prof))
    assert peak < W and prof[peak] > prof[-1] + 0.05 * far, prof


def test_phase_contact_lines_are_bright_and_brightfield_has_no_such_halo(dense, dense_phase):
    np.testing.assert_array_equal(dense.masks, dense_phase.masks)  # one layout, two modalities
    contact, axis = contact_and_axis(dense_phase)
    ph = dense_phase.brightfield.astype(float)
    assert np.median(ph[contact]) > np.median(ph[axis]) + 0.1 * np.median(ph[dense_phase.masks == 0])
    # Just outside the cells (1-3 px), relative to how dark the cells are: phase's halo is half as bright as
    # the cells are dark; brightfield's faint defocus ring is eaten by the envelope's blur.
    for f, lo, hi in ((dense, -0.15, 0.15), (dense_phase, 0.3, 1.0)):
        img, cell = f.brightfield.astype(float), f.masks > 0
        dist = ndi.distance_transform_edt(~cell)
        far = np.median(img[dist > 3 * W])
        core = np.median(img[ndi.distance_transform_edt(cell) >= 0.4 * W])
        ring = np.median(img[(dist > 1) & (dist <= 3)])
        assert lo < (ring - far) / (far - core) < hi, (f.modality, ring, far, core)


def test_bad_modality_is_named():
    with pytest.raises(ValueError, match="modality"):
        synth.render_field(0, (64, 64), modality="darkfield")


# ------------------------------------------------------------------------------------------ plates
def test_a_phase_plate_names_its_channel_phase_and_reads_back_as_phase(tmp_path):
    out = synth.write_plate(tmp_path / "p.zarr", wells=("A1",), fields_per_well=1, shape=(96, 96), seed=2,
                            modality="phase")
    plate = open_plate(PlateConfig(path=out, phase="phase"))
    assert sorted(plate.channel_names) == ["fluorescence", "phase"]
    ref = synth.render_field(synth.field_seed(2, "A1", 0), (96, 96), modality="phase")
    np.testing.assert_array_equal(plate.fields[0].channel("phase").compute(), ref.brightfield)
