"""Inference with the real pretrained MISIC model: parity with the misic package, chunked scans equal to
whole fields, and the segment command writing NGFF labels, refusing to overwrite, naming bad input."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from hpc_retrain import commands
from hpc_retrain.config import RunConfig
from hpc_retrain.inference import predictor as infer
from hpc_retrain.synth import plates as synth

COLICOORDS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "colicoords"
CFG = RunConfig().updated(preprocess__mean_width=7.0)  # the synthetic cells' width

# Import every stage module now, before TensorFlow: submitit's import runs logging.config.dictConfig,
# which closes existing handlers, absl's among them, and absl's handler closes the stream it holds, which
# under pytest is the capture file (pytest then dies with "I/O operation on closed file").
commands.build_parser()




@pytest.fixture(scope="module")
def predictor():
    from hpc_retrain.inference import model as M

    return infer.Predictor(M.load(), batch_size=8)


@pytest.mark.colicoords
@pytest.mark.skipif(not (COLICOORDS / "ds2" / "brightfield").is_dir(), reason="ColiCoords data absent")
def test_stitch_mode_equals_the_misic_package_on_a_real_field(predictor):
    import misic.utils as mu
    from skimage.transform import resize

    from hpc_retrain.imaging import preprocess as P

    im = tifffile.imread(COLICOORDS / "ds2" / "brightfield" / "00066.tif")
    sh = P.features_np(im, CFG.preprocess.brightfield, CFG.preprocess)
    tiles, params = mu.extract_tiles(sh, size=256, exclude=16)
    reference = mu.stitch_tiles(predictor.model.predict(tiles, verbose=0), params)
    ours = infer.predict_scaled(predictor, sh, CFG, "stitch")
    assert ours.shape == reference.shape[:2] + (2,)
    assert np.abs(ours - reference[..., :2]).max() < 1e-4
    # and back at the original resolution, as MISIC's resize(yp, [sr, sc, -1])
    prob = infer.resize_to(ours, im.shape)
    assert prob.shape == im.shape + (2,) and prob.dtype == np.float32
    assert np.abs(prob - resize(reference[..., :2], im.shape + (2,), order=1)).max() < 1e-4


@pytest.mark.parametrize("mode", ["stitch", "blend"])
def test_scan_in_chunks_equals_the_whole_field(predictor, mode):
    f = synth.render_field(5, (300, 340))
    prob, labels = infer.segment_field(predictor, f.brightfield, CFG, mode)
    p_out = np.zeros((2,) + f.brightfield.shape, np.float32)
    l_out = np.zeros(f.brightfield.shape, np.int32)
    # chunk 256 at scale 1.43: 2 x 2 tile blocks, 2 x 2 output chunks, seams everywhere
    n = infer.segment_scan(predictor, f.brightfield, CFG, p_out, l_out, mode, chunk=256)
    assert np.abs(np.moveaxis(p_out, 0, -1) - prob).max() < 1e-5
    assert n == labels.max() > 0
    assert np.array_equal(labels > 0, l_out > 0)
    assert np.unique(np.stack([labels.ravel(), l_out.ravel()]), axis=1).shape[1] == n + 1


@pytest.mark.parametrize("mode", ["stitch", "blend"])
def test_pipelined_fields_equal_one_at_a_time(predictor, monkeypatch, mode):
    # blocks of one tile row, so a field is several blocks in flight (as a large field is)
    blocks = infer.field_blocks
    monkeypatch.setattr(infer, "field_blocks", lambda g: [((i, i + 1), c) for (r0, r1), c in blocks(g)
                                                          for i in range(r0, r1)])
    images = [synth.render_field(s, shape).brightfield for s, shape in ((8, (150, 170)), (9, (260, 200)),
                                                                        (10, (120, 300)))]
    piped = list(infer.segment_fields(predictor, images, CFG, mode, depth=1))
    assert len(piped) == 3
    for im, (prob, labels) in zip(images, piped):
        p1, l1 = infer.segment_field(predictor, im, CFG, mode)
        assert labels.max() > 0 and np.array_equal(prob, p1) and np.array_equal(labels, l1)


@pytest.mark.parametrize("engine", ["tensorflow", "openvino"])
def test_pipelined_fields_equal_one_at_a_time_on_each_engine(predictor, engine):
    from hpc_retrain.inference import engine as E

    if engine == "openvino" and E.openvino_version() is None:
        pytest.skip("OpenVINO not installed")
    p = infer.Predictor(predictor.model, 8, engine=engine)  # the model runs in the pipeline's own thread
    images = [synth.render_field(s, (140, 160)).brightfield for s in (11, 12)]
    for im, (prob, labels) in zip(images, infer.segment_fields(p, images, CFG)):
        p1, l1 = infer.segment_field(p, im, CFG)
        assert np.array_equal(prob, p1) and np.array_equal(labels, l1)


def test_blend_differs_from_stitch_only_slightly(predictor):
    f = synth.render_field(6, (200, 200))
    feats = infer.field_features(f.brightfield, CFG)
    a = infer.predict_scaled(predictor, feats, CFG, "stitch")
    b = infer.predict_scaled(predictor, feats, CFG, "blend")
    assert 0 < np.abs(a - b).max() and np.abs(a - b).mean() < 0.02


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    return synth.write_plate(tmp_path_factory.mktemp("p") / "plate.ome.zarr", wells=["B2"], fields_per_well=1,
                             shape=(200, 230), seed=4)


def run_cli(*argv) -> tuple[int, str]:
    """The command's exit status and its stderr (captured here, not with capsys: TensorFlow's loggers keep
    whatever stderr they first saw, and a capsys stream closes under them)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = commands.main([str(a) for a in argv])
    return code, err.getvalue()


def _ome(group):
    return dict(group.attrs["ome"])


def test_segment_writes_ngff_labels_and_refuses_to_overwrite(plate):
    assert run_cli("segment", "--plate", plate, "--batch-size", "4")[0] == 0
    root = zarr.open_group(str(plate), mode="r")
    fld = root["B/2/0"]
    labels = fld["labels"]
    assert _ome(labels)["version"] == "0.5" and set(_ome(labels)["labels"]) == {"truth", "misic"}
    lab = labels["misic"]
    meta = _ome(lab)
    assert meta["image-label"]["source"]["image"] == "../../"
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["y", "x"]
    arr = lab[meta["multiscales"][0]["datasets"][0]["path"]]
    assert arr.dtype.kind == "i" and arr.shape == (200, 230) and arr[...].max() > 5
    prov = lab.attrs["hpc_retrain"]
    assert prov["model"].endswith("MiSiDC04082020.h5") and len(prov["model_sha256"]) == 64
    assert prov["config"]["compute"]["batch_size"] == 4 and prov["cells"] == arr[...].max()
    prob = fld["probabilities/misic"]
    assert [a["name"] for a in _ome(prob)["multiscales"][0]["axes"]] == ["c", "y", "x"]
    p = prob["0"][...]
    assert p.shape == (2, 200, 230) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    before = arr[...].copy()

    code, err = run_cli("segment", "--plate", plate, "--mode", "blend")
    assert code == 2
    assert "already holds results" in err and "--overwrite" in err
    assert np.array_equal(zarr.open_group(str(plate), mode="r")["B/2/0/labels/misic/0"][...], before)
    assert run_cli("segment", "--plate", plate, "--mode", "blend", "--overwrite")[0] == 0
    lab = zarr.open_group(str(plate), mode="r")["B/2/0/labels/misic"]
    assert lab.attrs["hpc_retrain"]["mode"] == "blend"


def test_segment_names_a_missing_channel_and_a_model_that_does_not_fit(plate, tmp_path):
    code, err = run_cli("segment", "--plate", plate, "--set", "plate.brightfield=phase", "--name", "x")
    assert code == 2
    assert "no channel 'phase'" in err and "brightfield" in err
    import keras

    inp = keras.Input((64, 64, 1))
    bad = keras.Model(inp, keras.layers.Conv2D(2, 1)(inp))
    bad.save(tmp_path / "bad.keras")
    code, err = run_cli("segment", "--plate", plate, "--model", tmp_path / "bad.keras", "--name", "x")
    assert code == 2
    assert "bad.keras" in err and "do not fit" in err
    assert "x" not in zarr.open_group(str(plate), mode="r")["B/2/0/labels"]


def test_segment_tiff_plate_into_a_new_ome_zarr_plate(tmp_path):
    tiffs = synth.write_plate(tmp_path / "tiffs", fmt="tiff", wells=["A1"], fields_per_well=1,
                              shape=(160, 180), seed=7)
    assert run_cli("segment", "--plate", tiffs, "--tiff")[0] == 0
    out = zarr.open_group(str(tmp_path / "tiffs.ome.zarr"), mode="r")
    fld = out["A/1/0"]
    assert [c["label"] for c in _ome(fld)["omero"]["channels"]] == ["brightfield", "fluorescence", "masks"]
    assert fld["labels/misic/0"].shape == (160, 180)
    assert fld.attrs["hpc_retrain_source"]["field"] == "0"
    tif = tifffile.imread(tmp_path / "tiffs_misic_tiff" / "A1_s0_misic.tif")
    assert np.array_equal(tif, fld["labels/misic/0"][...])
    # the evaluate command pairs the new plate's fields with the TIFF plate's masks
    assert run_cli("evaluate", "--pred", tmp_path / "tiffs.ome.zarr", "--ref", "masks", "--ref-plate", tiffs,
                   "--overlays", "0")[0] == 0
