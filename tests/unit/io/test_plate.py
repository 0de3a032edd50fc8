import numpy as np
import pytest
import tifffile

from hpc_retrain.config import PlateConfig
from hpc_retrain.io import ngff
from hpc_retrain.io.plate import PlateError, open_plate, parse_name


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("{well}_s{field}_{channel}.tif", "B03_s12_brightfield.tif", {"well": "B03", "field": "12", "channel": "brightfield"}),
        ("{well}_s{field}_{channel}.tif", "A1_s0_gfp_488.tif", {"well": "A1", "field": "0", "channel": "gfp_488"}),
        ("img_{field}-{channel}.tiff", "img_007-BF.tiff", {"well": "A1", "field": "007", "channel": "BF"}),
        ("{well}_s{field}_{channel}.tif", "notes.txt", None),
        ("{well}_s{field}_{channel}.tif", "A1_sX_bf.tif", None),
    ],
)
def test_parse_name(pattern, name, expected):
    assert parse_name(pattern, name) == expected


def _write_tiff_plate(root, shape=(64, 80), wells=("A1", "B2"), fields=2):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for w in wells:
        for f in range(fields):
            for c in ("brightfield", "fluorescence"):
                tifffile.imwrite(root / f"{w}_s{f}_{c}.tif", rng.integers(0, 4000, shape, dtype=np.uint16))
    return root


def test_tiff_plate_with_pattern(tmp_path):
    root = _write_tiff_plate(tmp_path / "plate")
    plate = open_plate(PlateConfig(path=root))
    assert plate.layout == "tiff"
    assert [f.key for f in plate.fields] == ["A1/0", "A1/1", "B2/0", "B2/1"]
    assert plate.channel_names == ["brightfield", "fluorescence"]
    f = plate.fields[3]
    assert f.shape == (64, 80)
    np.testing.assert_array_equal(f.channel("brightfield").compute(),
                                  tifffile.imread(root / "B2_s1_brightfield.tif"))


def test_tiff_plate_lists_fast_without_reading_pixels(tmp_path):
    import time

    root = tmp_path / "big"
    root.mkdir()
    im = np.zeros((32, 32), np.uint16)
    for f in range(600):
        tifffile.imwrite(root / f"C7_s{f}_brightfield.tif", im)
    t = time.perf_counter()
    plate = open_plate(PlateConfig(path=root))
    elapsed = time.perf_counter() - t
    assert len(plate) == 600
    # generous bound: a listing that read pixels or opened files repeatedly would take far longer
    assert elapsed < 20


def test_colicoords_layout(colicoords):
    plate = open_plate(PlateConfig(path=colicoords / "ds1"))
    assert len(plate) == 10
    assert {"brightfield", "fluorescence", "binary"} <= set(plate.channel_names)
    f = plate.fields[0]
    assert f.field == "00001" and f.shape == (512, 512)
    assert f.channel("fluorescence").dtype == np.uint16


def test_ome_zarr_plate_round_trip(tmp_path):
    root = ngff.create_plate(tmp_path / "p.zarr", ["A1", "B12"], field_count=2)
    rng = np.random.default_rng(1)
    images = {}
    for w in ("A1", "B12"):
        for i in range(2):
            im = rng.integers(0, 1000, (2, 40, 50), dtype=np.uint16)
            images[(w, str(i))] = im
            ngff.write_field(root, w, i, im, ["brightfield", "fluorescence"])
    plate = open_plate(PlateConfig(path=tmp_path / "p.zarr"))
    assert plate.layout == "ome-zarr"
    assert [f.key for f in plate.fields] == ["A1/0", "A1/1", "B12/0", "B12/1"]
    for f in plate.fields:
        np.testing.assert_array_equal(f.channel("fluorescence").compute(), images[(f.well, f.field)][1])
    meta = root.attrs["ome"]
    assert meta["version"] == "0.5" and meta["plate"]["wells"][1]["path"] == "B/12"


def test_missing_channel_names_field_and_fix(tmp_path):
    root = _write_tiff_plate(tmp_path / "plate")
    plate = open_plate(PlateConfig(path=root))
    with pytest.raises(PlateError, match=r"no channel 'phase'.*plate.brightfield"):
        plate.require("phase")


def test_pattern_matching_nothing(tmp_path):
    root = _write_tiff_plate(tmp_path / "plate")
    with pytest.raises(PlateError, match="no file matches the pattern"):
        open_plate(PlateConfig(path=root, pattern="{well}-{field}-{channel}.tif"))


def test_channels_of_different_sizes(tmp_path):
    root = _write_tiff_plate(tmp_path / "plate", wells=("A1",), fields=1)
    tifffile.imwrite(root / "A1_s0_fluorescence.tif", np.zeros((30, 30), np.uint16))
    with pytest.raises(PlateError, match="differ in size"):
        open_plate(PlateConfig(path=root))


def test_corrupt_tiff_names_the_file(tmp_path):
    root = _write_tiff_plate(tmp_path / "plate", wells=("A1",), fields=1)
    (root / "A1_s0_fluorescence.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(PlateError, match="A1_s0_fluorescence.tif: unreadable TIFF"):
        open_plate(PlateConfig(path=root))


def test_missing_plate(tmp_path):
    with pytest.raises(PlateError, match="plate not found"):
        open_plate(PlateConfig(path=tmp_path / "nope"))
