"""The job layer without running a job: Slurm scripts, pickling, config merging, status from files."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import cloudpickle
import pytest
import submitit

from hpc_retrain.commands import build_parser, stages
from hpc_retrain.config import RunConfig
from hpc_retrain.training import jobs, runstate


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's SlurmExecutor only checks that srun exists; nothing is submitted here."""
    if shutil.which("srun") is None:
        fake = tmp_path / "bin" / "srun"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")


def _sbatch(cfg: RunConfig, run: Path, store: Path) -> str:
    ex = jobs.make_executor(cfg, run, store)._executor
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def test_slurm_script_runs_inside_apptainer_with_requested_resources(tmp_path, srun_on_path):
    cfg = RunConfig().updated(cluster__executor="slurm", cluster__container="/images/hpc retrain.sif",
                              cluster__partition="gpu", cluster__account="lab", cluster__qos="normal",
                              cluster__time_min=90, cluster__gpus=1, cluster__cpus=6, cluster__mem_gb=24)
    text = _sbatch(cfg, tmp_path / "run", tmp_path / "store.zarr")
    cmd = [ln for ln in text.splitlines() if "submitit.core._submit" in ln][0]
    assert "apptainer exec --nv" in cmd and "'/images/hpc retrain.sif' python -u -m submitit.core._submit" in cmd
    assert f"--bind {tmp_path / 'run'}" in cmd and f"--bind {tmp_path / 'store.zarr'}" in cmd
    for flag in ("--partition=gpu", "--account=lab", "--qos=normal", "--time=90", "--gpus-per-node=1",
                 "--cpus-per-task=6", "--mem=24GB", f"--signal=USR2@{jobs.SIGNAL_DELAY_S}"):
        assert f"#SBATCH {flag}" in text, flag


def test_slurm_script_without_gpus_requests_no_gres(tmp_path, srun_on_path):
    cfg = RunConfig().updated(cluster__executor="slurm", cluster__gpus=0)
    text = _sbatch(cfg, tmp_path / "run", tmp_path / "store.zarr")
    flags = [ln.split("=")[0] for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert flags and not [f for f in flags if "gpu" in f or "gres" in f], flags
    assert not [f for f in flags if "--partition" in f]  # unset options are left to the cluster's defaults
    assert "apptainer" not in text


def test_training_job_pickles_and_requeues_itself(tmp_path):
    job = jobs.TrainingJob(RunConfig().to_dict(), str(tmp_path / "s.zarr"), str(tmp_path / "run"))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)):
        back = loads(dumps(job))
        assert back.run_dir == job.run_dir and RunConfig.from_dict(back.config) == RunConfig()
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.run_dir == job.run_dir and again.function.store == job.store


def _train_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_resumed_run_starts_from_its_saved_config(tmp_path):
    run = tmp_path / "run"
    RunConfig().updated(train__steps_per_epoch=3, train__batch_size=4, seed=5).save(run)
    cfg = stages.build_config(_train_args("--run", str(run), "--epochs", "9", "--set", "train.augment=false"), run)
    assert (cfg.train.steps_per_epoch, cfg.train.batch_size, cfg.seed) == (3, 4, 5)
    assert cfg.train.epochs == 9 and cfg.train.augment is False
    fresh = stages.build_config(_train_args("--run", str(tmp_path / "new"), "--lr", "0.01", "--executor", "inline"),
                                tmp_path / "new")
    assert fresh.train.learning_rate == 0.01 and fresh.train.steps_per_epoch is None
    assert fresh.cluster.executor == "local"


def test_status_from_run_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert runstate.run_status(run)["state"] == "unknown"
    (run / "job.json").write_text(json.dumps({"executor": "local", "job_id": "123", "stdout": "o", "stderr": "e"}))
    assert runstate.run_status(run)["state"] == "submitted"
    # A "running" record whose process is gone was killed without reporting.
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": 2 ** 22 + 7,
                                                 "host": socket.gethostname(), "epoch": 2, "epochs": 5}))
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 0.5, "val_loss": 0.6}]))
    s = runstate.run_status(run)
    assert s["state"] == "stopped" and s["latest"]["epoch"] == 1 and s["job_id"] == "123"
    with pytest.raises(FileNotFoundError):
        runstate.run_status(tmp_path / "missing")
