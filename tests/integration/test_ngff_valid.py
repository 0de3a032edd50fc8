"""Every OME-Zarr group hpc_retrain writes (plate, wells, field images, label images, probabilities) validates
with the NGFF validator ome-zarr-models, warnings included, and results keep their image's pixel size."""

import contextlib
import io
import warnings

import numpy as np
import zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels
from ome_zarr_models.v05.well import Well

from hpc_retrain import commands
from hpc_retrain.io import ngff
from hpc_retrain.synth import plates as synth

commands.build_parser()  # import every stage module before TensorFlow (see test_infer.py)


def run_cli(*argv) -> int:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = commands.main([str(a) for a in argv])
    assert code == 0, err.getvalue()
    return code


def validate_plate(path) -> zarr.Group:
    """Validate the plate and, one by one, each well, field image, label image and probabilities image, any
    warning of the validator (e.g. a plate without a version) an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _validate_plate(path)


def _validate_plate(path) -> zarr.Group:
    root = zarr.open_group(str(path), mode="r")
    HCS.from_zarr(root)
    fields = ngff.plate_fields(root)
    assert fields
    for well in {g.rsplit("/", 1)[0] for _, _, g in fields}:
        Well.from_zarr(root[well])
    for _, _, gpath in fields:
        fld = root[gpath]
        Image.from_zarr(fld)
        labels = fld["labels"]
        Labels.from_zarr(labels)
        for name in labels.attrs["ome"]["labels"]:
            ImageLabel.from_zarr(labels[name])
        probs = fld["probabilities"]
        assert probs.attrs["images"] == ["misic"]  # how the probabilities are found from the image
        for name in probs.attrs["images"]:
            Image.from_zarr(probs[name])
    return root


def grid(group) -> tuple[list, list, list]:
    """(axis names, units, level-0 transforms) of a group's first multiscale, and its array's dimension_names."""
    ms = group.attrs["ome"]["multiscales"][0]
    assert list(group["0"].metadata.dimension_names) == [a["name"] for a in ms["axes"]]
    return ([a["name"] for a in ms["axes"]], [a.get("unit") for a in ms["axes"]],
            ms["datasets"][0]["coordinateTransformations"])


def test_segmented_plate_validates_and_results_keep_the_pixel_size(tmp_path):
    plate = synth.write_plate(tmp_path / "plate.ome.zarr", wells=["A1", "B3"], fields_per_well=1,
                              shape=(128, 144), seed=2)
    # B3's image at 0.065 µm per pixel, offset on the stage; its truth labels written again on that grid
    root = zarr.open_group(str(plate), mode="r+")
    img = root["B/3/0/0"][...]
    truth = root["B/3/0/labels/truth/0"][...]
    fld = ngff.write_field(root, "B3", 0, img, ngff.channel_names(root["B/3/0"]),
                           grid=ngff.pixel_grid((0.065, 0.065), "micrometer", translation=(6.5, 13.0)))
    ngff.write_labels(fld, "truth", truth)

    run_cli("segment", "--plate", plate, "--batch-size", "4")
    root = validate_plate(plate)

    um = ["micrometer", "micrometer"]
    expect_yx = [{"type": "scale", "scale": [0.065, 0.065]}, {"type": "translation", "translation": [6.5, 13.0]}]
    expect_cyx = [{"type": "scale", "scale": [1.0, 0.065, 0.065]},
                  {"type": "translation", "translation": [0.0, 6.5, 13.0]}]
    assert grid(root["B/3/0"]) == (["c", "y", "x"], [None] + um, expect_cyx)
    for name in ("misic", "truth"):
        assert grid(root[f"B/3/0/labels/{name}"]) == (["y", "x"], um, expect_yx)
    assert grid(root["B/3/0/probabilities/misic"]) == (["c", "y", "x"], [None] + um, expect_cyx)
    # a plate without pixel sizes: pixels, scale 1
    assert grid(root["A/1/0/labels/misic"]) == (["y", "x"], [None, None], [{"type": "scale", "scale": [1.0, 1.0]}])
    assert grid(root["A/1/0/probabilities/misic"])[2] == [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
    assert root.attrs["ome"]["plate"]["version"] == "0.5"


def test_tiff_plate_segmented_into_a_new_ome_zarr_plate_validates(tmp_path):
    tiffs = synth.write_plate(tmp_path / "tiffs", fmt="tiff", wells=["A1", "C2"], fields_per_well=1,
                              shape=(96, 112), seed=5)
    run_cli("segment", "--plate", tiffs)
    root = validate_plate(tmp_path / "tiffs.ome.zarr")
    assert np.asarray(root["C/2/0/labels/misic/0"][...]).shape == (96, 112)
