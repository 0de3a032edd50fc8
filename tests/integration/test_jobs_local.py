"""Training as a submitit job on this machine: the CLI path, and a preempted job that requeues itself.

Real submitit LocalExecutor processes, real TensorFlow on CPU, a tiny store (8 one-tile fields).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("jobs") / "store.zarr", n_fields=8)


@pytest.fixture
def quiet_env(monkeypatch):
    # The job processes inherit this environment (submitit's local controller copies os.environ).
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return dict(os.environ)


def _cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_retrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_local_job_batch_8(store, tmp_path, quiet_env):
    run = tmp_path / "run"
    out = _cli("train", "--store", str(store), "--run", str(run), "--epochs", "2", "--batch-size", "8",
               "--set", "train.steps_per_epoch=1", "--gpus", "0", "--cpus", "2", env=quiet_env)
    assert out.returncode == 0, out.stderr[-3000:]
    job = json.loads((run / "job.json").read_text())
    assert f"submitted local job {job['job_id']}" in out.stdout
    assert job["stdout"] in out.stdout and str(run.resolve()) in out.stdout
    assert "epoch 2/2 loss" in out.stdout  # progress was followed while waiting
    for name in ("model.keras", "model.h5", "history.csv", "history.json", "training_curves.png",
                 "config.yaml", "train.log", "metrics.json"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # epoch 0: the starting model, validated
    assert hist[-1]["tiles_per_s"] > 0 and 0 <= hist[-1]["val_iou"] <= 1
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "val_loss", "accuracy", "val_iou", "val_dice", "time_s"} <= set(header)
    job_log = Path(job["stderr"]).read_text()
    assert Path(job["stdout"]).is_file() and "epoch 1/2" in job_log
    # TensorFlow's import lines; not the GPU probe's cuInit error, which TF_CPP_MIN_LOG_LEVEL=2 (quiet_env) lets through
    assert not re.search(r"absl::InitializeLog|cudart_stub|cpu_feature_guard", job_log), job_log

    st = _cli("status", str(run), env=quiet_env, timeout=60)
    assert st.returncode == 0, st.stderr
    assert f"state:  finished (local job {job['job_id']})" in st.stdout
    assert "epoch:  2/2" in st.stdout and "val_dice" in st.stdout
    bad = _cli("status", str(tmp_path / "nope"), env=quiet_env, timeout=60)
    assert bad.returncode == 2 and "no such run folder" in bad.stderr


def test_preempted_job_checkpoints_requeues_and_finishes(store, tmp_path, quiet_env):
    """SIGUSR2 (Slurm's pre-timeout signal) mid-epoch: train saves, submitit checkpoint() requeues the
    pickled job, and the new attempt resumes from the saved step to the end."""
    from hpc_retrain.config import RunConfig
    from hpc_retrain.training import jobs

    run = tmp_path / "run"
    cfg = RunConfig().updated(train__epochs=2, train__batch_size=2, train__steps_per_epoch=3, cluster__gpus=0)
    ex = jobs.make_executor(cfg, run, store)
    job = ex.submit(jobs.TrainingJob(cfg.to_dict(), str(store), str(run)))
    log = run / "train.log"
    deadline = time.monotonic() + 240
    while not (log.is_file() and "epoch 2/2 step 1/3" in log.read_text()):
        assert not job.done(), job.stderr()
        assert time.monotonic() < deadline, "epoch 2 never started"
        time.sleep(0.05)
    pid = json.loads((run / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGUSR2)
    metrics = job.result()  # waits through the requeue

    assert metrics["epochs"] == 2
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    text = log.read_text()
    assert "SIGUSR2: saved epoch 2 at step" in text and "resuming from ckpt-e00001-s" in text
    assert "Requeued job" in job.stderr() or "Requeued job" in (job.stdout() or "")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
