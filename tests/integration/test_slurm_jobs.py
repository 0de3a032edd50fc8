"""The cluster path for real: training jobs, preemption, job arrays, Dask on Slurm and the sbatch templates.

They run against whatever Slurm ``sinfo`` reaches: in CI, the one-node cluster that
``slurm/local-cluster/start.sh`` starts on loopback (with slurmdbd accounting, so submitit's ``sacct`` polls
answer promptly). The node has no GPU, so every request asks for none (``--gpus 0``, ``sbatch --gres=none``).
Waits are bounded; on a timeout the jobs are cancelled and their logs shown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from slurm_cluster import slurm_available

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT_S = 420


@pytest.fixture(scope="module", autouse=True)
def _needs_slurm():
    reason = slurm_available()
    if reason:
        pytest.skip(reason)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "hpc_retrain", *argv], capture_output=True, text=True, env=_env(),
                       timeout=TIMEOUT_S)
    if check and p.returncode:
        raise AssertionError(f"hpc-retrain {' '.join(argv)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slurm") / "plate.zarr"
    cli("synth", "--out", str(path), "--wells", "A1,A2", "--fields", "1", "--size", "256", "--seed", "3")
    return path


@pytest.fixture(scope="module")
def store(plate) -> Path:
    path = plate.parent / "local.train.zarr"
    cli("prepare", "--plate", str(plate), "--out", str(path))
    return path


def _wait(pred, what: str, timeout: float = TIMEOUT_S, job_ids=()):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pred():
            return
        time.sleep(1)
    for j in job_ids:
        subprocess.run(["scancel", str(j)], check=False)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _history_epochs(run: Path) -> list[int]:
    import csv

    p = run / "history.csv"
    if not p.is_file():
        return []
    with open(p) as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "GONE"


SLURM_TRAIN = ("--executor", "slurm", "--partition", "debug", "--gpus", "0", "--cpus", "2", "--mem", "6")


def test_training_job_on_slurm_completes(store, tmp_path):
    run = tmp_path / "run"
    p = cli("train", "--store", str(store), "--run", str(run), *SLURM_TRAIN, "--epochs", "2",
            "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=2", "--wait")
    assert "submitted slurm job" in p.stdout
    assert (run / "model.keras").is_file() and (run / "model.h5").is_file()
    assert _history_epochs(run) == [0, 1, 2]
    s = cli("status", str(run)).stdout
    assert "finished" in s and "epoch:  2" in s


def test_requeued_job_resumes_and_runs_every_epoch_once(store, tmp_path):
    run = tmp_path / "run"
    epochs = 4
    p = cli("train", "--store", str(store), "--run", str(run), *SLURM_TRAIN, "--epochs", str(epochs),
            "--set", "train.steps_per_epoch=3", "--set", "train.batch_size=2", "--no-wait")
    job_id = p.stdout.split("submitted slurm job")[1].split()[0]
    _wait(lambda: len(_history_epochs(run)) >= 2, "the first epoch", job_ids=[job_id])
    # Preemption as a cluster does it: the job is killed and put back in the queue under the same id.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Slurm holds a requeued job ~2 min before it is eligible again (BeginTime); the test does not need to
    # wait that out. Released sooner, after the old run's cleanup: at once, slurmd refuses the launch
    # ("already killed") and the job fails.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+10"], capture_output=True)
    _wait(lambda: _job_state(job_id) in ("COMPLETED", "GONE", "FAILED", "CANCELLED"),
          "the requeued job to finish", job_ids=[job_id])
    assert _job_state(job_id) in ("COMPLETED", "GONE"), (run / "submitit").glob("*")
    assert _history_epochs(run) == list(range(0, epochs + 1))
    restarts = subprocess.run(["sacct", "-j", job_id, "-n", "-X", "-D", "-o", "State"], capture_output=True,
                              text=True).stdout.split()
    assert len(restarts) >= 2, f"sacct shows no requeue for job {job_id}: {restarts}"
    assert (run / "model.keras").is_file()


def test_job_array_of_learning_rates(store, tmp_path):

    from hpc_retrain.config import RunConfig
    from hpc_retrain.training.jobs import TrainingJob, make_executor

    base = RunConfig.load(None, ["cluster.executor=slurm", "cluster.partition=debug", "cluster.gpus=0",
                                 "cluster.cpus=1", "cluster.mem_gb=5", "train.epochs=1",
                                 "train.steps_per_epoch=1", "train.batch_size=2"])
    lrs = [1e-3, 1e-4]
    runs = [tmp_path / f"lr{lr:g}" for lr in lrs]
    ex = make_executor(base, tmp_path, store)
    jobs_ = ex.map_array(lambda j: j(), [TrainingJob(base.updated(train__learning_rate=lr).to_dict(), str(store),
                                                     str(r)) for lr, r in zip(lrs, runs)])
    assert len({j.job_id.split("_")[0] for j in jobs_}) == 1  # one array, two tasks
    _wait(lambda: all(j.done() for j in jobs_), "the array", job_ids=[j.job_id for j in jobs_])
    for j, r, lr in zip(jobs_, runs, lrs):
        j.result()
        assert RunConfig.read_saved(r).train.learning_rate == lr
        assert _history_epochs(r) == [0, 1]


def test_prepare_on_dask_jobqueue_matches_local(plate, store, tmp_path):
    jobqueue = pytest.importorskip("dask_jobqueue")
    from distributed import Client

    cluster = jobqueue.SLURMCluster(queue="debug", cores=1, processes=1, memory="4GB", walltime="00:15:00",
                                    python=sys.executable, log_directory=str(tmp_path / "dask-logs"),
                                    worker_extra_args=["--nthreads", "1"])
    try:
        cluster.scale(1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            out = tmp_path / "slurm.train.zarr"
            cli("prepare", "--plate", str(plate), "--out", str(out), "--scheduler", cluster.scheduler_address)
    finally:
        cluster.close()
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("targets", "labels", "probabilities", "tile_field", "tile_rc", "field_done"):
        np.testing.assert_allclose(np.asarray(b[name][:], float), np.asarray(a[name][:], float), atol=1e-6,
                                   err_msg=name)


def _sbatch(script: str, tmp_path: Path, **env: str) -> str:
    exports = ",".join(["ALL"] + [f"{k}={v}" for k, v in env.items()])
    p = subprocess.run(["sbatch", "--parsable", "--gres=none", "--mem=5G", "--cpus-per-task=1",
                        f"--chdir={tmp_path}", f"--export={exports}", str(ROOT / "slurm" / script)],
                       capture_output=True, text=True, env=_env(), check=True)
    return p.stdout.strip().split(";")[0]


def _wait_jobs(job_ids: list[str], tmp_path: Path) -> None:
    def finished():
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True, text=True).stdout
        return not out.strip()

    try:
        _wait(finished, f"jobs {job_ids}", job_ids=job_ids)
    finally:
        for log in tmp_path.glob("*.out"):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")


def test_sbatch_templates_prepare_train_segment(plate, tmp_path):
    store = tmp_path / "t.train.zarr"
    run = tmp_path / "run"
    j1 = _sbatch("prepare.sbatch", tmp_path, PLATE=str(plate), STORE=str(store))
    _wait_jobs([j1], tmp_path)
    assert zarr.open_group(str(store), mode="r")["field_done"][:].all()

    j2 = _sbatch("train.sbatch", tmp_path, STORE=str(store), RUN=str(run),
                 EXTRA="--epochs 1 --set train.steps_per_epoch=1 --set train.batch_size=2")
    _wait_jobs([j2], tmp_path)
    assert _history_epochs(run) == [0, 1] and (run / "model.keras").is_file()

    seg_plate = tmp_path / "seg.zarr"
    shutil.copytree(plate, seg_plate)
    wells = cli("segment", "--plate", str(seg_plate), "--list-wells").stdout.split()
    assert wells == ["A1", "A2"]
    # the templates ask for more CPUs than this 2-core node has; the tests ask for one
    p = subprocess.run(["sbatch", "--parsable", "--gres=none", "--mem=4G", "--cpus-per-task=1",
                        f"--array=0-{len(wells) - 1}",
                        f"--chdir={tmp_path}", f"--export=ALL,PLATE={seg_plate},MODEL={run}",
                        str(ROOT / "slurm" / "segment.sbatch")], capture_output=True, text=True, env=_env(),
                       check=True)
    _wait_jobs([p.stdout.strip().split(";")[0]], tmp_path)
    root = zarr.open_group(str(seg_plate), mode="r")
    for w in ("A/1", "A/2"):
        lab = root[f"{w}/0/labels/misic/0"][:]
        assert lab.dtype.kind in "iu" and lab.max() > 0, f"well {w} was not segmented"


# ---------------------------------------------------------------------- 15: a job no node can run
def _node() -> tuple[int, int]:
    """CPUs and memory (MB) of the largest node of partition debug."""
    out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%c %m"], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return max(tuple(int(x.rstrip("+")) for x in line.split()) for line in out if line.strip())


def _pending(job_id: str, timeout: float = 60) -> str:
    """squeue's reason once the job is pending with one."""
    reason = ""

    def pending():
        nonlocal reason
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout
        state, _, reason = out.strip().partition(" ")
        return state == "PENDING" and reason not in ("", "None")

    _wait(pending, f"job {job_id} pending with a reason", timeout=timeout, job_ids=[job_id])
    return reason


def test_job_no_node_can_run_is_refused_and_status_shows_why_a_job_pends(tmp_path):
    """Fault 15: with the defaults (4 CPUs, 16 GB) on this 2-CPU partition, ``train --executor slurm`` said
    "submitted" and ``status`` showed PENDING forever, never Slurm's reason (PartitionConfig). Now the request is
    checked against the partition's nodes before anything is submitted, and ``status`` shows a pending job's
    reason, with what to do when it will never start."""
    sys.path.insert(0, str(ROOT / "tests"))
    from trainstore import build_store

    cpus, mem_mb = _node()
    store = build_store(tmp_path / "store.zarr", n_fields=2)
    run = tmp_path / "run"
    queued = lambda: subprocess.run(["squeue", "-h", "-n", f"hpc-retrain-{run.name}", "-o", "%i"],  # noqa: E731
                                    capture_output=True, text=True).stdout.split()
    before = queued()
    gb = mem_mb // 1024
    cases = {  # options -> (what the largest node offers, the option to change)
        ("--cpus", str(cpus + 2), "--mem", "1"): (f"the largest node offers {cpus} CPU(s)", f"--cpus {cpus} or fewer"),
        ("--cpus", "1", "--mem", str(gb + 8)): (f"{mem_mb / 1024:.1f} GB", f"--mem {gb} or less"),
        ("--cpus", "1", "--mem", "1", "--gpus", "1"): ("0 GPU(s)", "--gpus 0 (this partition has no GPU)"),
    }
    for options, (offer, fix) in cases.items():
        gpus = () if "--gpus" in options else ("--gpus", "0")
        p = cli("train", "--store", str(store), "--run", str(run), "--executor", "slurm", "--partition", "debug",
                *gpus, *options, "--no-wait", check=False)
        assert p.returncode == 2, (p.stdout, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("hpc-retrain train:")]
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert lines[0].startswith("hpc-retrain train: partition debug cannot run this job"), lines[0]
        assert offer in lines[0] and fix in lines[0], lines[0]
        assert "submitted" not in p.stdout and not run.exists()
    # the defaults (4 CPUs, 16 GB) on a node with fewer CPUs: what the issue saw
    if cpus < 4:
        p = cli("train", "--store", str(store), "--run", str(run), "--executor", "slurm", "--gpus", "0",
                check=False)
        assert p.returncode == 2 and "--cpus" in p.stderr and not run.exists(), p.stderr
    p = cli("train", "--store", str(store), "--run", str(run), "--executor", "slurm", "--partition", "nosuch",
            "--gpus", "0", "--cpus", "1", "--mem", "1", check=False)
    assert p.returncode == 2 and "partition 'nosuch' does not exist (partitions: debug" in p.stderr, p.stderr
    assert queued() == before  # nothing was submitted

    # status: a job that waits for the node (every CPU taken by another job) says why
    blocker = subprocess.run(["sbatch", "--parsable", "--gres=none", "--mem=1G", f"--cpus-per-task={cpus}",
                              f"--chdir={tmp_path}", "--wrap", "sleep 300"], capture_output=True, text=True,
                             env=_env(), check=True).stdout.strip().split(";")[0]
    ids = [blocker]
    try:
        _wait(lambda: _job_state(blocker) == "RUNNING", "the blocking job to start", timeout=60, job_ids=ids)
        p = cli("train", "--store", str(store), "--run", str(run), "--executor", "slurm", "--partition", "debug",
                "--gpus", "0", "--cpus", "1", "--mem", "1", "--epochs", "1", "--no-wait")
        job = p.stdout.split("submitted slurm job")[1].split()[0]
        ids.append(job)
        reason = _pending(job)
        s = cli("status", str(run))
        assert s.returncode == 0, s.stderr
        assert f"scheduler: PENDING ({reason}" in s.stdout, s.stdout
        if reason == "Resources":
            assert "waiting for a node with the CPUs/memory/GPUs asked for to free up" in s.stdout

        # a run submitted before this check (by an earlier version, or sbatch by hand) that can never start
        never = subprocess.run(["sbatch", "--parsable", "--gres=none", "--mem=1G", f"--cpus-per-task={cpus + 2}",
                                f"--chdir={tmp_path}", "--wrap", "true"], capture_output=True, text=True,
                               env=_env(), check=True).stdout.strip().split(";")[0]
        ids.append(never)
        assert _pending(never) == "PartitionConfig"
        old = tmp_path / "old-run"
        old.mkdir()
        (old / "job.json").write_text(json.dumps({"executor": "slurm", "job_id": never,
                                                  "submitit_folder": str(old / "submitit")}))
        s = cli("status", str(old))
        assert s.returncode == 0, s.stderr
        assert (f"scheduler: PENDING (PartitionConfig: no node of the partition has what the job asks for; it "
                f"will never start: scancel {never} and submit again with fewer --cpus/--mem/--gpus") in s.stdout
        assert json.loads(cli("status", str(old), "--json").stdout)["scheduler_reason"].startswith("PartitionConfig")
    finally:
        subprocess.run(["scancel", *ids], check=False)
