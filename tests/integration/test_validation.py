"""Instance-level validation and what a run carries: the teacher's cells from a real store, calibrated
thresholds, the best epoch exported, early stopping, and the store's preprocessing reaching ``segment``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpc_retrain import commands
from hpc_retrain.config import RunConfig
from hpc_retrain.inference.instances import drop_specks
from hpc_retrain.prepare import pipeline as preparation
from hpc_retrain.prepare import store as st
from hpc_retrain.synth import plates as synth
from hpc_retrain.training import loop as tr
from hpc_retrain.training.history import replaces_best
from hpc_retrain.training.validation import FieldValidator

commands.build_parser()  # import every stage before TensorFlow (see test_infer.py)
CFG = RunConfig().updated(preprocess__mean_width=7)




@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    return synth.write_plate(tmp_path_factory.mktemp("val") / "plate", fmt="tiff", wells=["A1"],
                             fields_per_well=4, shape=(256, 256), seed=5)


@pytest.fixture(scope="module")
def store(plate, tmp_path_factory) -> Path:
    """A real store: labels and probabilities from pretrained MISIC on the synthetic fluorescence."""
    out = tmp_path_factory.mktemp("val") / "train.zarr"
    preparation.run(CFG.updated(plate__path=plate), out, preparation.STAGES["prepare"],
                progress=False)
    return out


def test_specks_are_objects_smaller_than_a_cell_width_square():
    lab = np.zeros((40, 40), np.int32)
    lab[0:2, 0:3] = 1  # 6 px: a speck for width 4 (under 8 px)
    lab[10:14, 10:20] = 2  # 40 px: a cell
    out = drop_specks(lab, 4.0)
    assert set(np.unique(out)) == {0, 2} and (out == 2).sum() == 40


def test_teacher_probabilities_score_full_recall_and_calibration_never_loses(store):
    root = st.open_store(store)
    v = FieldValidator(root, np.array([0, 1]), CFG)
    assert v.n_tiles == sum(e.n_tiles for e in st.entries(root)[:2]) and sum(int(t.max()) for t in v.teacher) > 5
    teacher_probs = v.stitch(np.concatenate([root["probabilities"][e.tiles] for e in v.fields]).astype(np.float32))
    s = v.score(teacher_probs)
    # The teacher's own probabilities find every teacher cell; only the specks it dropped can be extra.
    assert s.recall == 1.0 and s.f1 >= 0.9
    blank = v.score([np.zeros_like(p) for p in teacher_probs])
    assert blank.tp == 0 and blank.recall == 0.0
    th = v.calibrate(teacher_probs)
    assert th.f1 >= s.f1 and 0.2 <= th.body <= 0.8 and th.marker > th.body


def test_run_exports_best_epoch_with_calibrated_thresholds_and_the_store_preprocessing(store, plate, tmp_path):
    run = tmp_path / "run"
    cfg = CFG.updated(preprocess__mean_width=12, train__epochs=2, train__batch_size=2, train__steps_per_epoch=2, train__val_fraction=0.5,
                      train__learning_rate=1e-3)
    m = tr.train(cfg, store, run)
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2] and hist[0]["loss"] is None
    assert all(0 <= h["val_f1"] <= 1 for h in hist)
    # The exported model is the best epoch's: its weights are that checkpoint's.
    best = run / "checkpoints" / "best"
    assert json.loads((best / "state.json").read_text())["epoch"] == m["best_epoch"]
    chosen = None
    for h in hist:  # the rule replayed epoch by epoch: F1 within one validation cell counts as equal, then IoU
        if replaces_best(h, chosen, [g for g in hist if g["epoch"] <= h["epoch"]], m["validation"]["validation_cells"]):
            chosen = h
    assert m["best_epoch"] == chosen["epoch"]
    from hpc_retrain.inference import model as M

    exported = M.load(run / "model.keras")
    with np.load(best / "variables.npz") as z:
        for i, var in enumerate(exported.variables):
            if "float" in str(var.dtype):  # weights and BatchNorm statistics (not Dropout seed states)
                np.testing.assert_array_equal(np.asarray(var), z[f"m{i:04d}"])
    # Thresholds calibrated on the validation fields, and the store's mean width (7, not the 12 asked
    # for training), are the run's.
    saved = RunConfig.read_saved(run)
    assert saved.preprocess.mean_width == 7
    assert saved.infer.body_threshold == m["validation"]["body_threshold"]
    assert saved.infer.marker_threshold == m["validation"]["marker_threshold"]
    assert saved.infer.contour_threshold == m["validation"]["contour_threshold"]
    assert m["validation"]["calibrated_f1"] >= m["validation"]["exported_model_f1"]

    # segment --model RUN uses them, without being told; a --set still wins.
    out = tmp_path / "seg.ome.zarr"
    assert commands.main(["segment", "--plate", str(plate), "--model", str(run), "--out", str(out), "--name", "r",
                     "--set", "infer.marker_threshold=0.97"]) == 0
    grp = zarr.open_group(str(out), mode="r")
    used = grp["A/1/0/labels/r"].attrs["hpc_retrain"]["config"]
    assert used["preprocess"]["mean_width"] == 7
    assert used["infer"]["body_threshold"] == saved.infer.body_threshold
    assert used["infer"]["marker_threshold"] == 0.97
    assert used["infer"]["contour_threshold"] == saved.infer.contour_threshold


def test_training_stops_when_validation_stops_improving(store, tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    # No epoch beats epoch 0 (the rule itself: test_train.py); a learning rate too small to change much.
    monkeypatch.setattr(tr, "replaces_best", lambda row, best, history, cells: best is None)
    # patience 2 would stop after epoch 2; train.min_epochs=3 holds it to epoch 3
    cfg = CFG.updated(train__epochs=6, train__patience=2, train__min_epochs=3, train__batch_size=2,
                      train__steps_per_epoch=1, train__learning_rate=1e-12, train__val_fraction=0.5,
                      train__calibrate=False)
    with caplog.at_level(logging.INFO, logger="hpc_retrain.training.loop"):
        m = tr.train(cfg, store, run)
    assert "stopping early" in caplog.text
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0, 1, 2, 3]
    assert m["best_epoch"] == 0 and "body_threshold" not in m["validation"]
    assert RunConfig.read_saved(run).infer.body_threshold == RunConfig().infer.body_threshold


def test_too_few_validation_cells_keep_misics_thresholds(store, tmp_path, caplog, monkeypatch):
    """Calibrating on a handful of cells fits noise: below validation.MIN_CALIBRATION_CELLS the run keeps MISIC's
    thresholds, says so, and metrics.json records it; at or above, it calibrates (the test above)."""
    from hpc_retrain.training import validation as V

    run = tmp_path / "run"
    cfg = CFG.updated(train__epochs=1, train__batch_size=2, train__steps_per_epoch=1, train__learning_rate=1e-12,
                      train__val_fraction=0.5)
    v = V.FieldValidator(zarr.open_group(str(store), mode="r"), np.array([0]), cfg)
    assert v.n_cells > 0
    monkeypatch.setattr(V, "MIN_CALIBRATION_CELLS", 10 ** 6)
    with caplog.at_level(logging.INFO, logger="hpc_retrain.training.loop"):
        m = tr.train(cfg, store, run)
    assert "post-processing not calibrated" in caplog.text
    assert m["validation"]["calibrated"] is False and m["validation"]["validation_cells"] > 0
    assert "body_threshold" not in m["validation"]
    saved = RunConfig.read_saved(run).infer
    assert (saved.body_threshold, saved.marker_threshold) == (RunConfig().infer.body_threshold,
                                                              RunConfig().infer.marker_threshold)
