"""The synthetic plate generator: deterministic, masks that match the pixels, and plates that read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi
from skimage import measure

from hpc_retrain.config import PlateConfig
from hpc_retrain.io.plate import open_plate
from hpc_retrain.synth import plates as synth


@pytest.fixture(scope="module")
def dense() -> synth.SynthField:
    return synth.render_field(11, (512, 512), mean_width=7.0, density=0.35)


def test_same_seed_same_field_other_seed_other_field():
    a, b = synth.render_field(5, (256, 256)), synth.render_field(5, (256, 256))
    for name in ("brightfield", "fluorescence", "masks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = synth.render_field(6, (256, 256))
    assert not np.array_equal(a.masks, c.masks)
    assert not np.array_equal(a.brightfield, c.brightfield)


def test_dtypes_and_arbitrary_shapes():
    for shape in [(300, 200), (64, 700), (1, 1)]:
        f = synth.render_field(1, shape)
        assert f.brightfield.shape == f.fluorescence.shape == f.masks.shape == shape
        assert f.brightfield.dtype == np.uint16 and f.fluorescence.dtype == np.uint16
        assert f.masks.dtype == np.int32
    assert synth.render_field(1, (300, 200)).n_cells > 20


def test_ids_are_1_to_n_and_each_cell_is_one_piece(dense):
    ids = np.unique(dense.masks)
    assert dense.n_cells > 200
    np.testing.assert_array_equal(ids, np.arange(dense.n_cells + 1))
    # A cell split in two pieces would be two regions of the same id.
    for r in measure.regionprops(dense.masks):
        assert measure.label(r.image, connectivity=1).max() == 1, f"cell {r.label} is fragmented"


def test_masks_are_where_the_cells_are_rendered(dense):
    cell = dense.masks > 0
    fl = dense.fluorescence.astype(float)
    bg = np.percentile(fl[~cell], 5)
    assert np.median(fl[cell]) - bg > 3 * (np.median(fl[~cell]) - bg)
    bf = dense.brightfield.astype(float)
    assert np.median(bf[cell]) < np.median(bf[~cell]) - 1000
    # Brightfield looks like a real microscope's: a bright field near the top of the uint16 range.
    assert 50000 < np.median(bf[~cell]) < 65535
    # Cell by cell: darker than the background in brightfield, brighter in fluorescence than the
    # background away from cells (next to cells, blur spills light out of them).
    far = ~ndi.binary_dilation(cell, iterations=4)
    bf_cell = np.array([np.median(bf[dense.masks == i]) for i in range(1, 60)])
    fl_cell = np.array([np.median(fl[dense.masks == i]) for i in range(1, 60)])
    assert (bf_cell < np.median(bf[far])).all()
    assert (fl_cell > np.percentile(fl[far], 99.9)).all()


@pytest.mark.parametrize("width", [7.0, 12.0])
def test_cell_widths_follow_mean_width(width):
    f = synth.render_field(2, (512, 512), mean_width=width, density=0.25)
    props = [r for r in measure.regionprops(f.masks) if r.area > width * width]
    minor = np.median([r.axis_minor_length for r in props])
    assert abs(minor - width) < 0.25 * width, f"median minor axis {minor:.1f} for mean width {width}"
    # Rods, not blobs: lengths about 2-5 widths.
    ratio = np.median([r.axis_major_length / r.axis_minor_length for r in props])
    assert 1.8 < ratio < 5.0


def test_dense_fields_have_touching_cells_but_little_lost_to_overlap(dense):
    m = dense.masks
    pairs = set()
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1, :], m[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.update(zip(a[touch].tolist(), b[touch].tolist()))
    assert len(pairs) > 0.3 * dense.n_cells
    # Overlap resolution must not eat cells: interior cells keep most of a capsule's area.
    w = 7.0
    capsule = w * w * (3.5 - 1 + np.pi / 4)
    inner = [r.area for r in measure.regionprops(m)
             if min(r.bbox[:2]) > 0 and r.bbox[2] < m.shape[0] and r.bbox[3] < m.shape[1]]
    assert 0.75 * capsule < np.median(inner) < 1.3 * capsule


def test_sparse_fields_without_colonies_have_few_contacts():
    f = synth.render_field(3, (512, 512), density=0.05, colony_fraction=0.0)
    m = f.masks
    touch = (m[:, :-1] != m[:, 1:]) & (m[:, :-1] > 0) & (m[:, 1:] > 0)
    assert f.n_cells > 20
    assert touch.sum() < 5 * f.n_cells


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="mean_width"):
        synth.render_field(0, mean_width=0.5)
    with pytest.raises(ValueError, match="unknown parameter.*colour"):
        synth.render_field(0, colour="red")
    with pytest.raises(ValueError, match="shape"):
        synth.render_field(0, (10, 0))
    with pytest.raises(ValueError, match="format"):
        synth.write_plate("/nonexistent/x", fmt="png")


def test_field_seeds_are_stable_and_distinct():
    seeds = {synth.field_seed(0, w, f) for w in ("A1", "A2", "B1") for f in range(3)}
    assert len(seeds) == 9
    assert synth.field_seed(0, "A1", 0) == synth.field_seed(0, "a1", 0) != synth.field_seed(1, "A1", 0)


def test_tiff_plate_round_trip(tmp_path):
    out = synth.write_plate(tmp_path / "p", fmt="tiff", wells=("A1", "B2"), fields_per_well=2, shape=(96, 128),
                            seed=3)
    names = sorted(p.name for p in out.glob("*.tif"))
    assert names == sorted(f"{w}_s{f}_{c}.tif" for w in ("A1", "B2") for f in (0, 1)
                           for c in ("brightfield", "fluorescence", "masks"))
    bf = tifffile.imread(out / "B2_s1_brightfield.tif")
    masks = tifffile.imread(out / "B2_s1_masks.tif")
    assert bf.dtype == np.uint16 and bf.shape == (96, 128) and masks.dtype == np.int32
    again = synth.render_field(synth.field_seed(3, "B2", 1), (96, 128))
    np.testing.assert_array_equal(bf, again.brightfield)
    np.testing.assert_array_equal(masks, again.masks)
    assert not np.array_equal(masks, tifffile.imread(out / "A1_s1_masks.tif"))
    record = json.loads((out / "synth.json").read_text())
    assert record["seed"] == 3 and record["params"]["mean_width"] == 7.0 and len(record["fields"]) == 4

    plate = open_plate(PlateConfig(path=out))
    assert plate.layout == "tiff" and len(plate) == 4
    assert plate.channel_names == ["brightfield", "fluorescence", "masks"]
    f = next(f for f in plate.fields if f.key == "B2/1")
    np.testing.assert_array_equal(f.channel("masks").compute(), again.masks)


def test_ome_zarr_plate_round_trip(tmp_path):
    out = synth.write_plate(tmp_path / "p.zarr", fmt="ome-zarr", wells=("A1", "A2"), fields_per_well=2,
                            shape=(80, 100), seed=4, mean_width=6.0)
    root = zarr.open_group(str(out), mode="r")
    img = root["A/2/1/0"]
    truth = root["A/2/1/labels/truth/0"]
    assert img.shape == (2, 80, 100) and img.dtype == np.uint16
    assert truth.shape == (80, 100) and truth.dtype == np.int32
    ref = synth.render_field(synth.field_seed(4, "A2", 1), (80, 100), mean_width=6.0)
    np.testing.assert_array_equal(img[0], ref.brightfield)
    np.testing.assert_array_equal(img[1], ref.fluorescence)
    np.testing.assert_array_equal(truth[...], ref.masks)
    assert root.attrs["hpc_retrain_synth"]["params"]["mean_width"] == 6.0
    assert json.loads((out / "synth.json").read_text())["format"] == "ome-zarr"

    plate = open_plate(PlateConfig(path=out))
    assert plate.layout == "ome-zarr" and len(plate) == 4
    f = next(f for f in plate.fields if f.key == "A2/1")
    np.testing.assert_array_equal(f.channel("fluorescence").compute(), ref.fluorescence)


def test_write_plate_refuses_bad_parameters_before_writing(tmp_path):
    with pytest.raises(ValueError, match="density"):
        synth.write_plate(tmp_path / "p.zarr", fmt="ome-zarr", density=2.0)
    with pytest.raises(ValueError, match="duplicate wells"):
        synth.write_plate(tmp_path / "p", fmt="tiff", wells=("A1", "a1"))
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "p").exists()
