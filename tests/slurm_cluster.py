"""Is there a Slurm cluster to run the ``slurm``-marked tests on, and helpers to wait on its jobs.

``slurm/local-cluster/start.sh`` starts a one-node cluster on this machine, with accounting (slurmdbd), so
``sacct`` answers and submitit learns a job's state as it would on a production cluster.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import time

START_HINT = "slurm/local-cluster/start.sh starts a one-node cluster on this machine"
# Node states a job can start on now; "idle*" and the like (trailing flag) mean the node is not responding.
USABLE_STATES = {"idle", "mixed"}


@functools.cache
def slurm_available(timeout_s: float = 5.0) -> str | None:
    """None when ``sinfo`` answers within ``timeout_s`` and shows an idle or mixed node, else why not."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return f"no Slurm here: sinfo is not on PATH ({START_HINT})"
    try:
        out = subprocess.run(
            [sinfo, "-h", "-o", "%T"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {timeout_s:g} s: the Slurm controller is down or unreachable ({START_HINT})"
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        return f"sinfo failed ({msg[-1] if msg else f'exit {out.returncode}'}); {START_HINT}"
    states = [s.strip() for s in out.stdout.split()]
    if not any(s in USABLE_STATES for s in states):
        return f"Slurm has no idle or mixed node (sinfo states: {', '.join(states) or 'none'})"
    return None


def accounting_enabled(timeout_s: float = 5.0) -> bool:
    """Whether the cluster stores job records, i.e. whether ``sacct`` can report a finished job's state."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() not in ("", "(null)", "accounting_storage/none")
    return False


def wait_for(jobs, timeout_s: float) -> None:
    """Wait until every submitit job is done; on timeout cancel them and fail with their logs' tails.

    ``job.result()`` alone would wait forever on a job Slurm never runs.
    """
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            tails = []
            for job in jobs:
                job.cancel(check=False)
                for path in (job.paths.stderr, job.paths.stdout):
                    text = path.read_text(errors="replace")[-2000:] if path.exists() else "(no file yet)"
                    tails.append(f"--- {path}\n{text}")
            raise AssertionError(
                f"Slurm jobs {[j.job_id for j in jobs]} not done within {timeout_s:g} s; "
                f"squeue: {squeue_states([j.job_id for j in jobs])}\n" + "\n".join(tails)
            )
        time.sleep(0.5)


def squeue_states(job_ids) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(str(j).split("_")[0] for j in job_ids)],
        capture_output=True, text=True, timeout=10, check=False,
    )
    return (out.stdout or out.stderr).strip() or "(not in the queue)"
