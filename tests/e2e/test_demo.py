"""The demo as a user runs it (a real subprocess), shrunk to 16 training batches so it fits in CI, stopped
mid-training and continued, and its win over pretrained MISIC against the true masks (issue 27: the guard of the
demo's margin, with the defaults)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import zarr
from procs import interrupt_when, log_has

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_into_one_folder_and_wins_with_the_defaults(tmp_path):
    out = tmp_path / "demo"
    # 3 training fields of 384 px (18 tiles for training, 9 for validation), 2 x 8 batches: measured 0.342 ->
    # 0.504 against the true masks (the full demo: benchmarks/RESULTS.md, 6c)
    argv = [sys.executable, "-m", "hpc_retrain", "demo", "--out", str(out), "--epochs", "2", "--steps", "8",
            "--size", "384", "--fields", "1"]
    # Stopped mid-training as a user stops it (SIGTERM; Ctrl-C takes the same path): the training stops with the
    # demo (it trains inline, no job left running) and saves a checkpoint ...
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = interrupt_when(log_has(out / "run" / "train.log", "epoch 2/2 step 1/8"), proc, signal.SIGTERM,
                         timeout=900, what="the demo's second epoch", wait_s=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped during 'train' (SIGTERM); run the same demo command to continue" in err, err[-3000:]
    status = json.loads((out / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM", status
    # ... and the same command continues from it.
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from ckpt-e00001-s" in (out / "run" / "train.log").read_text()
    # every stage left its output, and the config each ran with
    assert (out / "config.yaml").is_file()
    store = zarr.open_group(str(out / "train.zarr"), mode="r")
    assert store["field_done"][:].all() and store["targets"].shape[1:] == (256, 256, 3)
    assert (out / "run" / "model.keras").is_file() and (out / "run" / "config.yaml").is_file()
    test_plate = zarr.open_group(str(out / "test_plate.zarr"), mode="r")
    for name in ("pretrained", "retrained", "truth"):
        assert test_plate["C/1/0/labels/" + name + "/0"][:].max() > 0
    summary = json.loads((out / "summary.json").read_text())
    f1 = {name: next(r["f1"] for r in summary["scores"][name] if r["threshold"] == 0.5)
          for name in ("pretrained", "retrained")}
    # The tool's defaults, no recipe of the demo's own: the store's dense colonies chose theirs (training.recipe)
    recipe = summary["recipe"]
    assert recipe["regime"] == "dense" and recipe["body_fraction"] >= 0.1 and recipe["given"] == []
    assert json.loads((out / "run" / "metrics.json").read_text())["recipe"] == recipe
    # The guard of the demo's win: a margin over pretrained MISIC against the true masks (neither model made them)
    assert f1["retrained"] >= f1["pretrained"] + 0.1, f1
    # The exported model is the best epoch on the validation fields, the starting model included (F1s within
    # one validation cell count as equal, history.replaces_best), and the thresholds calibrated there never
    # score below MISIC's on those fields.
    v = json.loads((out / "run" / "metrics.json").read_text())["validation"]
    assert v["exported_model_f1"] >= v["starting_model_f1"] - 1 / v["validation_cells"]
    assert v["calibrated_f1"] >= v["exported_model_f1"]
    text = (out / "summary.txt").read_text()
    assert "retraining wins" in text and "chosen from the store" in text

    # a finished demo is not silently overwritten
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
