"""`segment --model RUN` on a run that is not finished: its best (else latest) checkpoint, said in one line.

A real tiny run (8 one-tile fields, 2 steps of 2 tiles per epoch, CPU, no validation fields so every epoch
end is a checkpoint and the best is one of them) trained for 1 epoch and then resumed to 2; then the run is
made "unfinished" the way training leaves it (no model.keras yet, or an older one than its checkpoints) and
segmented through the CLI. The reference is the training's own resume loader (``train.load_checkpoint``)
putting the checkpoint into the run's model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpc_retrain import commands
from hpc_retrain.config import RunConfig
from hpc_retrain.inference import model as M
from hpc_retrain.inference import predictor as infer
from hpc_retrain.io import plate as PL
from hpc_retrain.synth import plates as synth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

commands.build_parser()  # import every stage module before TensorFlow (see test_infer.py)




def run_cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = commands.main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, folder with the model.keras and metrics.json of the 1-epoch run)."""
    base = tmp_path_factory.mktemp("segrun")
    store = build_store(base / "store.zarr", n_fields=8, cfg=RunConfig().updated(preprocess__mean_width=7.0))
    run, refs = base / "run", base / "refs"
    refs.mkdir()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for epochs in (1, 2):  # the second call resumes from the first's checkpoint
            code, err = run_cli("train", "--store", store, "--run", run, "--executor", "inline",
                                "--epochs", epochs, "--batch-size", 2, "--set", "train.steps_per_epoch=2",
                                "--set", "train.keep_checkpoints=2", "--set", "train.val_fraction=0",
                                "--set", "seed=7")
            assert code == 0, err[-3000:]
            shutil.copy(run / "model.keras", refs / f"e{epochs}.keras")
            shutil.copy(run / "metrics.json", refs / f"metrics-e{epochs}.json")
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"ckpt-e00001", "ckpt-e00002", "best"}
    return run, refs


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    return synth.write_plate(tmp_path_factory.mktemp("p") / "plate.ome.zarr", wells=["B2"], fields_per_well=1,
                             shape=(200, 230), seed=4)


def _expected(model, plate: Path, cfg: RunConfig) -> np.ndarray:
    """(2, H, W) probabilities of ``model`` on the plate's field, computed directly (no CLI)."""
    f = PL.open_plate(cfg.plate, plate).fields[0]
    prob, _ = infer.segment_field(infer.Predictor(model, cfg.compute.batch_size), np.asarray(f.channel("brightfield")),
                                  cfg)
    return np.moveaxis(prob, -1, 0)


def _reference(run: Path, ckpt: Path):
    """The run's model with ``ckpt``'s weights, as the training itself loads them to resume."""
    import keras

    from hpc_retrain.training import loop as tr

    cfg = RunConfig.read_saved(run)
    net, _ = tr.build_model(cfg)
    tr.load_checkpoint(ckpt, net, keras.optimizers.Adam())
    return net


def _written(plate: Path, name: str):
    fld = zarr.open_group(str(plate), mode="r")["B/2/0"]
    return fld[f"probabilities/{name}/0"][...], dict(fld[f"labels/{name}"].attrs["hpc_retrain"])


def _make_unfinished(run: Path) -> None:
    for n in ("model.keras", "model.h5", "metrics.json"):
        (run / n).unlink(missing_ok=True)


def test_segment_a_run_that_is_not_finished(trained, plate, caplog):
    run, refs = trained
    cfg = RunConfig.read_saved(run)
    best = run / "checkpoints" / "best"
    best_epoch = json.loads((best / "state.json").read_text())["epoch"]
    assert best_epoch in (1, 2)

    # Finished: model.keras, as before.
    assert M.resolve(run).path == run / "model.keras" and not M.resolve(run).is_checkpoint

    # Trained on past its exported model (a finished run resumed to more epochs, still going): checkpoints.
    shutil.copy(refs / "e1.keras", run / "model.keras")
    shutil.copy(refs / "metrics-e1.json", run / "metrics.json")
    src = M.resolve(run)
    assert src.path == best and "trained past its exported model.keras (epoch 1" in src.note

    # Not finished (no model.keras yet): the best checkpoint, and one line saying so.
    _make_unfinished(run)
    caplog.set_level(logging.INFO)
    code, err = run_cli("segment", "--plate", plate, "--model", run, "--name", "best")
    assert code == 0, err[-3000:]
    lines = [r.getMessage() for r in caplog.records if r.name == "hpc_retrain.inference.model"]
    assert lines == [f"run {run} is not finished: using checkpoint best (epoch {best_epoch} of 2)"]
    got, prov = _written(plate, "best")
    assert prov["model"] == str(best)
    assert prov["model_sha256"] == M.sha256(best / "variables.npz")
    assert prov["model_checkpoint"]["epoch"] == best_epoch and prov["model_checkpoint"]["name"] == "best"
    np.testing.assert_allclose(got, _expected(_reference(run, best), plate, cfg), rtol=0, atol=1e-5)
    # ... and the trained weights are not the pretrained ones.
    pretrained = _expected(M.load(), plate, cfg)
    assert np.abs(got - pretrained).max() > 1e-3

    # No best checkpoint yet (e.g. preempted before one was kept): the latest, named.
    shutil.rmtree(best)
    caplog.clear()
    code, err = run_cli("segment", "--plate", plate, "--model", run, "--name", "latest")
    assert code == 0, err[-3000:]
    lines = [r.getMessage() for r in caplog.records if r.name == "hpc_retrain.inference.model"]
    assert lines == [f"run {run} is not finished: using the latest checkpoint ckpt-e00002 "
                     f"(epoch 2 of 2; no best checkpoint yet)"]
    got, prov = _written(plate, "latest")
    latest = run / "checkpoints" / "ckpt-e00002"
    assert prov["model"] == str(latest) and prov["model_sha256"] == M.sha256(latest / "variables.npz")
    np.testing.assert_allclose(got, _expected(_reference(run, latest), plate, cfg), rtol=0, atol=1e-5)
    assert np.abs(got - pretrained).max() > 1e-3

    # A checkpoint folder named directly loads that checkpoint.
    first = run / "checkpoints" / "ckpt-e00001"
    m1, src = M.load_with_source(first)
    assert src.checkpoint["epoch"] == 1 and src.run == run and src.sha256 == M.sha256(first / "variables.npz")
    for a, b in zip(m1.variables, _reference(run, first).variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))


def test_checkpoints_that_do_not_fit_and_runs_with_nothing_are_refused(trained, plate, tmp_path):
    run, _ = trained
    other = tmp_path / "other"
    shutil.copytree(run, other)
    _make_unfinished(other)
    ck = M.resolve(other).path
    state = json.loads((ck / "state.json").read_text())
    state["model_variables"][0] = "(3, 3, 3, 16) float32"  # as if another base model
    (ck / "state.json").write_text(json.dumps(state))
    code, err = run_cli("segment", "--plate", plate, "--model", other, "--name", "x")
    assert code == 2
    assert err.count("\n") == 1 and f"{ck}: checkpoint weights do not fit the run's base model" in err

    shutil.rmtree(other / "checkpoints")
    code, err = run_cli("segment", "--plate", plate, "--model", other, "--name", "x")
    assert code == 2
    assert err == (f"hpc-retrain segment: {other}: no model.keras, model.h5 or checkpoints in this folder; "
                   f"train first (hpc-retrain train --run {other} --store STORE)\n")
    assert "x" not in zarr.open_group(str(plate), mode="r")["B/2/0/labels"]


def test_a_mixed_precision_checkpoint_loads_into_the_float32_model(tmp_path):
    """Under mixed_float16 the trained net's variables are the float32 model's, in the same order."""
    import keras

    from hpc_retrain.training import loop as tr
    from hpc_retrain.training import network as nw

    cfg = RunConfig()
    net = nw.with_policy(M.load(), "mixed_float16")
    rng = np.random.default_rng(0)
    for v in net.trainable_variables:
        v.assign(np.asarray(v.numpy()) + rng.normal(0, 0.01, v.shape).astype(np.float32))
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
    opt.build(net.trainable_variables)
    run = tmp_path / "mixed"
    run.mkdir()
    cfg.save(run)
    tr.save_checkpoint(run, tr.Progress(epoch=1, best_epoch=1), net, opt, keep=2, best=True)
    got, src = M.load_with_source(run)
    assert src.path == run / "checkpoints" / "best"
    assert len(got.variables) == len(net.variables)
    for a, b in zip(got.variables, net.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    assert got.layers[1].dtype_policy.name == "float32"
    x = rng.standard_normal((1, 256, 256, 3)).astype(np.float32)
    np.testing.assert_allclose(got(x).numpy(), net(x).numpy().astype(np.float32), atol=0.05)
