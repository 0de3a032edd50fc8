"""A real (tiny) training: every output written, a resume continues to more epochs, another batch size is
refused. Moved from the unit tests, which train nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from trainstore import build_store

from hpc_retrain.config import RunConfig
from hpc_retrain.training import loop as tr
from hpc_retrain.training import network as nw


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store") / "store.zarr", n_fields=8)


def test_train_batch_8_writes_all_outputs_and_resumes_to_more_epochs(small_store, tmp_path):
    """Batch 8 (the default) on CPU; a second call with more epochs continues, not restarts."""
    cfg = RunConfig().updated(train__epochs=1, train__batch_size=8, train__steps_per_epoch=1,
                              train__init="finetune-decoder", train__keep_checkpoints=1)
    run = tmp_path / "run"
    m = tr.train(cfg, small_store, run)
    for name in ("model.keras", "model.h5", "history.csv", "history.json", "training_curves.png",
                 "config.yaml", "train.log", "metrics.json"):
        assert (run / name).is_file(), name
    assert m["epochs"] == 1 and 0 <= m["final"]["val_dice"] <= 1 and m["final"]["val_loss"] > 0
    assert m["precision"] == nw.precision_policy(cfg.train.mixed_precision)  # recorded beside the model
    assert RunConfig.read_saved(run).train.batch_size == 8
    assert "epoch 1/1 loss" in (run / "train.log").read_text()

    # The encoder was frozen: its weights are the pretrained ones, the decoder's are not (the epoch's
    # checkpoint: the exported model is the best epoch by validation F1, which may be epoch 0).
    from hpc_retrain.inference import model

    pre, got = model.load(), model.load(run / "checkpoints" / "ckpt-e00001")
    n_enc = len(nw.encoder_layers(pre))
    for a, b in zip(pre.layers[:n_enc], got.layers[:n_enc]):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(pre.layers[-1].get_weights()[0], got.layers[-1].get_weights()[0])

    m2 = tr.train(cfg.updated(train__epochs=2), small_store, run)
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2] and m2["epochs"] == 2
    assert "resuming from ckpt-e00001" in (run / "train.log").read_text()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "ckpt-e00002" in names and "ckpt-e00001" not in names and "best" in names
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())
    assert best["epoch"] == m2["best_epoch"]

    with pytest.raises(tr.TrainingError, match="batch_size"):
        tr.train(cfg.updated(train__epochs=3, train__batch_size=4), small_store, run)
