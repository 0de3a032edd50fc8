"""Real Slurm jobs through submitit: a single job and a two-task array, on whatever cluster ``sinfo`` sees.

Locally that is the one-node cluster of slurm/local-cluster/start.sh (with slurmdbd, so sacct works). The
jobs run this repository's Python (sys.executable); the node shares this machine's file system.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")


def _load_helper():
    # tests/ is not a package and not on sys.path; load the helper by file so no conftest is needed.
    if "slurm_cluster" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "slurm_cluster.py"
        spec = importlib.util.spec_from_file_location("slurm_cluster", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["slurm_cluster"] = module
        spec.loader.exec_module(module)
    return sys.modules["slurm_cluster"]


slurm_cluster = _load_helper()
SKIP_REASON = slurm_cluster.slurm_available()

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
    pytest.mark.timeout(90),
]

JOB_WAIT_S = 60


def _executor(folder: Path):
    ex = submitit.SlurmExecutor(folder=folder)
    # One core and no GPU, so the array's two tasks fit side by side on a two-core node.
    ex.update_parameters(partition="debug", time=5, cpus_per_task=1, ntasks_per_node=1, signal_delay_s=30)
    return ex


def test_submitit_job_returns_value_computed_on_the_node(tmp_path):
    # Local functions are pickled by value, so the job needs no importable test module.
    def work(n):
        import os
        import socket

        return {"job_id": os.environ["SLURM_JOB_ID"], "host": socket.gethostname(), "sum": sum(range(n))}

    job = _executor(tmp_path).submit(work, 1000)
    try:
        slurm_cluster.wait_for([job], JOB_WAIT_S)
        out = job.result()
    finally:
        if not job.done():
            job.cancel(check=False)
    assert out["sum"] == 499500
    # The job id Slurm gave the job inside equals the one sbatch returned outside: it really ran under Slurm.
    assert out["job_id"] == str(job.job_id)
    if slurm_cluster.accounting_enabled():
        # sacct's view: what submitit relies on to notice jobs that die without writing a result. The
        # result file appears before the job ends and slurmctld reports to slurmdbd asynchronously.
        deadline = time.monotonic() + 30
        while (state := job.watcher.get_state(job.job_id, mode="force")) != "COMPLETED":
            assert time.monotonic() < deadline, f"sacct still says {state} for job {job.job_id} after 30 s"
            time.sleep(0.5)


def test_submitit_job_array_runs_each_item(tmp_path):
    def square(x):
        import os

        return x * x, os.environ["SLURM_ARRAY_JOB_ID"], os.environ["SLURM_ARRAY_TASK_ID"]

    ex = _executor(tmp_path)
    ex.update_parameters(array_parallelism=2)
    jobs = ex.map_array(square, [3, 4])
    try:
        slurm_cluster.wait_for(jobs, JOB_WAIT_S)
        results = [job.result() for job in jobs]
    finally:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
    assert [r[0] for r in results] == [9, 16]
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    assert {r[1] for r in results} == {array_id}
    assert [r[2] for r in results] == ["0", "1"]
