"""A run killed with SIGTERM in the middle of an epoch resumes to exactly the uninterrupted result.

Real processes (`python -m hpc_retrain train --executor inline`), real signals, real TensorFlow on CPU
with op determinism; a tiny store (8 one-tile fields) and 3 steps of 2 tiles per epoch keep it short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import interrupt_when, log_has

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("resume") / "store.zarr", n_fields=8)


def _cmd(store: Path, run: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "hpc_retrain", "train", "--store", str(store), "--run", str(run),
            "--executor", "inline", "--epochs", str(epochs), "--batch-size", "2",
            "--set", "train.steps_per_epoch=3", "--set", "train.deterministic=true",
            "--set", "train.keep_checkpoints=2", "--set", "seed=7"]


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _final_variables(run: Path) -> dict[str, np.ndarray]:
    ckpts = sorted(p for p in (run / "checkpoints").glob("ckpt-*"))
    with np.load(ckpts[-1] / "variables.npz") as z:
        return {k: z[k] for k in z.files}


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(store, tmp_path):
    run = tmp_path / "interrupted"
    _run(_cmd(store, run, 2))
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0, 1, 2]

    # Continue to 4 epochs and stop it once epoch 3 has made progress.
    log = run / "train.log"
    proc = subprocess.Popen(_cmd(store, run, 4), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = interrupt_when(log_has(log, "epoch 3/4 step 1/3"), proc, signal.SIGTERM, poll_s=0.05, what="epoch 3",
                         wait_s=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "run the same command to resume" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
    mid = [p.name for p in (run / "checkpoints").glob("ckpt-e00002-s*")]
    assert mid, f"no mid-epoch checkpoint: {sorted(p.name for p in (run / 'checkpoints').iterdir())}"
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0, 1, 2]

    _run(_cmd(store, run, 4))
    text = log.read_text()
    assert "resuming from ckpt-e00002-s" in text and "resuming at step" in text

    ref = tmp_path / "uninterrupted"
    _run(_cmd(store, ref, 4))

    hist, ref_hist = (json.loads((r / "history.json").read_text()) for r in (run, ref))
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4]
    for a, b in zip(hist, ref_hist):
        for k in ("loss", "accuracy", "val_loss", "val_iou", "val_dice"):
            assert a[k] == (None if b[k] is None else pytest.approx(b[k], abs=1e-6)), (a["epoch"], k)

    got, want = _final_variables(run), _final_variables(ref)
    assert got.keys() == want.keys()
    for k in want:  # weights, BatchNorm statistics, Dropout seeds, Adam moments
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    # And the training changed the model, so equality is not trivial.
    first = np.load(sorted((ref / "checkpoints").glob("ckpt-e00003"))[0] / "variables.npz")
    assert any(not np.allclose(first[k], want[k]) for k in want if k.startswith("m"))
    # The checkpoint retention: 2 most recent epoch ends plus the best, no stale interrupt checkpoint.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-2:] == ["ckpt-e00003", "ckpt-e00004"] and "best" in names and len(names) == 3
