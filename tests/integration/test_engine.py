"""The inference engine (``compute.engine``): OpenVINO gives TensorFlow's probabilities (to 1e-5) and the same
binarized labels on real ColiCoords fields, so the engine ``auto`` measures faster changes no result;
``tensorflow`` forces TensorFlow; unknown values are refused."""

import logging

import numpy as np
import pytest
import tifffile

from hpc_retrain import commands
from hpc_retrain.config import ConfigError, RunConfig
from hpc_retrain.imaging import preprocess as P
from hpc_retrain.imaging import tiling as T
from hpc_retrain.inference import engine as E
from hpc_retrain.inference import engine_choice as C
from hpc_retrain.inference import predictor as infer
from hpc_retrain.prepare import labels as L

# Import every stage module before TensorFlow (see test_infer.py: submitit's logging set-up vs absl's handler).
commands.build_parser()

CFG = RunConfig().updated(preprocess__mean_width=14.0)  # ColiCoords E. coli: 12-16 px wide
TOL = 1e-5
needs_openvino = pytest.mark.skipif(E.openvino_version() is None, reason="OpenVINO not installed")


def _field(colicoords, channel):
    return tifffile.imread(colicoords / "ds1" / channel / "00001.tif")


@needs_openvino
@pytest.mark.colicoords
@pytest.mark.parametrize("channel", ["fluorescence", "brightfield"])
def test_openvino_equals_tensorflow_on_a_real_field(colicoords, pretrained_model, channel):
    im = _field(colicoords, channel)
    feats = P.features_np(im, getattr(CFG.preprocess, channel), CFG.preprocess)
    tiles, grid = T.extract_tiles(feats, CFG.tiling.size, CFG.tiling.margin)
    assert len(tiles) % 3  # batches of 3: the last one is smaller
    y = {e: L.predict_tiles(pretrained_model, tiles, 3, engine=e) for e in ("tensorflow", "openvino")}
    assert y["openvino"].dtype == np.float32 and y["openvino"].shape == y["tensorflow"].shape
    assert np.abs(y["openvino"] - y["tensorflow"]).max() < TOL
    # labels (prepare): the stitched maps binarized, identical
    prob = {e: np.ascontiguousarray(T.stitch_tiles(v, grid)[..., :2]) for e, v in y.items()}
    lab = {e: L.binarize(p, CFG) for e, p in prob.items()}
    assert lab["tensorflow"][..., 0].any() and lab["tensorflow"][..., 1].any()
    np.testing.assert_array_equal(lab["openvino"], lab["tensorflow"])
    # segment: the predictor on each engine, at the original resolution
    pred = {e: infer.Predictor(pretrained_model, 5, engine=e) for e in ("tensorflow", "openvino")}
    assert {e: p.engine for e, p in pred.items()} == {"tensorflow": "tensorflow", "openvino": "openvino"}
    seg = {e: infer.predict_field(p, im, CFG, prep=getattr(CFG.preprocess, channel)) for e, p in pred.items()}
    assert seg["openvino"].dtype == np.float32 and seg["openvino"].shape == im.shape + (2,)
    assert np.abs(seg["openvino"] - seg["tensorflow"]).max() < TOL


@needs_openvino
def test_openvino_is_compiled_once_per_model_and_takes_any_batch(pretrained_model):
    a = E.openvino_model(pretrained_model)
    assert E.openvino_model(pretrained_model) is a
    x = np.random.default_rng(0).random((3, 256, 256, 3), dtype=np.float32)
    ref = L.predict_tiles(pretrained_model, x, 2, engine="tensorflow")
    for bs in (1, 2, 3):
        got = L.predict_tiles(pretrained_model, x, bs, engine="openvino")
        assert got.shape == ref.shape and np.abs(got - ref).max() < TOL


@needs_openvino
def test_openvino_runs_upsampling_as_interpolate_and_leaves_the_model_alone(pretrained_model):
    import openvino as ov

    layers, weights = list(pretrained_model.layers), pretrained_model.get_weights()
    m = E.nearest_as_resize(pretrained_model)
    assert m is not pretrained_model and pretrained_model.layers == layers
    assert all((a == b).all() for a, b in zip(pretrained_model.get_weights(), weights))
    ops = {op.get_type_name() for op in ov.convert_model(m, input=[(-1, 256, 256, 3)]).get_ops()}
    assert "Interpolate" in ops and "Tile" not in ops  # Keras' repeat ops run as reference kernels
    x = np.random.default_rng(1).random((2, 256, 256, 3), dtype=np.float32)
    np.testing.assert_array_equal(m([x], training=False).numpy(), pretrained_model([x], training=False).numpy())


def test_engine_tensorflow_forces_tensorflow(pretrained_model, caplog, monkeypatch):
    monkeypatch.setattr(E, "_LOGGED", set())
    cfg = CFG.updated(compute__engine="tensorflow")
    with caplog.at_level(logging.INFO, logger="hpc_retrain.inference.engine"):
        p = infer.as_predictor(pretrained_model, cfg)
        assert p.engine == "tensorflow" and p._ov is None
        assert infer.as_predictor(p, cfg) is p
        infer.as_predictor(pretrained_model, cfg)
    # the choice is logged, once
    assert [r.getMessage() for r in caplog.records] == ["inference engine: tensorflow (compute.engine=tensorflow)"]
    assert E.for_model(pretrained_model, "tensorflow") == ("tensorflow", None)
    # labels: get_model's engine is what predict_tiles uses when it is given none
    monkeypatch.setattr(E, "_PREFERRED", {})
    monkeypatch.setattr(L, "_MODELS", {"pretrained": pretrained_model})
    assert L.get_model(None, engine="tensorflow") is pretrained_model
    calls = []
    monkeypatch.setattr(E, "openvino_model", lambda *a, **k: calls.append(a) or pytest.fail("OpenVINO used"))
    x = np.zeros((2, 256, 256, 3), np.float32)
    assert L.predict_tiles(pretrained_model, x, 8).shape == (2, 256, 256, 2) and not calls


@needs_openvino
def test_the_engines_are_timed_on_the_model(pretrained_model):
    t = C.time_engines(pretrained_model, 256, None, tiles=2, pairs=2, compile_openvino=E.openvino_model)
    assert t["tiles"] == 2 and all(len(t[e]) == 2 and min(t[e]) > 0 for e in ("tensorflow", "openvino"))


@needs_openvino
@pytest.mark.parametrize("faster", ["tensorflow", "openvino"])
def test_auto_runs_the_engine_measured_faster(pretrained_model, monkeypatch, tmp_path, faster):
    if E.gpu_visible():
        pytest.skip("a GPU is visible: auto runs TensorFlow")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # another machine: nothing measured or made before
    monkeypatch.setattr(E, "_RESOLVED", {})
    monkeypatch.setattr(infer, "_PREDICTORS", {})
    s = {"tensorflow": [1.0] * 3, "openvino": [1.0] * 3, "tiles": 4}
    s[faster] = [0.8] * 3
    monkeypatch.setattr(C, "time_engines", lambda *a: s)
    p = infer.as_predictor(pretrained_model, CFG)
    assert CFG.compute.engine == "auto" and p.engine == faster
    assert (p._ov is None) == (faster == "tensorflow") and C.cache_path().is_file()
    p = infer.as_predictor(pretrained_model, CFG.updated(compute__engine="openvino"))
    assert p.engine == "openvino"
    # a predictor on another engine than the config asks for is not reused
    assert infer.as_predictor(p, CFG.updated(compute__engine="tensorflow")).engine == "tensorflow"


def test_unknown_engine_is_refused():
    with pytest.raises(ConfigError, match="compute.engine"):
        RunConfig.load(overrides=["compute.engine=onnx"])
    with pytest.raises(E.EngineError, match="unknown inference engine 'onnx'"):
        E.resolve("onnx")
    assert RunConfig.load(overrides=["compute.engine=openvino"]).compute.engine == "openvino"
