"""What Slurm says about a training job: whether a partition can ever run it (``sinfo``), and why a submitted
job still pends (``squeue``). Both answer None, not an error, where the commands are missing or silent."""

from __future__ import annotations

import subprocess

from hpc_retrain.config import RunConfig
from hpc_retrain.errors import HpcRetrainError


class SlurmRequestError(HpcRetrainError, ValueError):
    """A job request no node of the partition can satisfy: it would pend forever."""


def _sinfo(timeout_s: float = 10.0) -> list[dict] | None:
    """Node groups as ``sinfo`` reports them: partition, CPUs, memory (MB), GPUs, time limit (minutes, None
    for none), default partition; None when sinfo is missing or does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        part, cpus, mem, gres, limit = parts
        try:
            rows.append({"partition": part.rstrip("*"), "default": part.endswith("*"),
                         "cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+")),
                         "gpus": _gres_gpus(gres), "time_min": _slurm_minutes(limit)})
        except ValueError:
            continue
    return rows


def _gres_gpus(gres: str) -> int:
    """GPUs per node in a ``%G`` field such as ``gpu:4``, ``gpu:a100:4(S:0-1)`` or ``(null)``."""
    n = 0
    for item in gres.split(","):
        item = item.split("(")[0]
        if item.startswith("gpu"):
            last = item.rsplit(":", 1)[-1]
            n += int(last) if last.isdigit() else 1
    return n


def _slurm_minutes(limit: str) -> int | None:
    """Minutes of a Slurm time limit (``infinite``, ``30:00``, ``2:00:00``, ``1-12:00:00``); None: no limit."""
    limit = limit.strip()
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h, m = (0, parts[0]) if len(parts) == 1 else (parts[-3] if len(parts) == 3 else 0, parts[-2])
    return int(days or 0) * 1440 + h * 60 + m


def check_slurm_request(cfg: RunConfig, time_min: int) -> None:
    """Refuse, before anything is submitted, a job no node of the partition can ever run: Slurm would
    accept it and keep it PENDING (reason PartitionConfig / PartitionTimeLimit) forever."""
    c = cfg.cluster
    rows = _sinfo()
    if not rows:
        return  # no sinfo here (submitting from a login node without it?): sbatch itself decides
    part = c.partition or next((r["partition"] for r in rows if r["default"]), None)
    nodes = [r for r in rows if r["partition"] == part]
    if not nodes:
        names = ", ".join(sorted({r["partition"] for r in rows}))
        what = f"partition {part!r} does not exist" if part else "Slurm has no default partition"
        raise SlurmRequestError(f"{what} (partitions: {names}); choose one with --partition")
    mem_mb = c.mem_gb * 1024
    fits = [r for r in nodes if r["cpus"] >= c.cpus and r["mem_mb"] >= mem_mb and r["gpus"] >= c.gpus]
    limits = [r["time_min"] for r in nodes]
    longest = None if any(t is None for t in limits) else max(limits)
    if fits and (longest is None or time_min <= longest):
        return
    ask = f"{c.cpus} CPU(s), {c.mem_gb:g} GB, {c.gpus} GPU(s), {time_min} min"
    if fits:  # only the time limit is in the way
        raise SlurmRequestError(f"partition {part} cannot run this job: it asks for {time_min} min, the "
                                f"partition's limit is {longest} min; lower --time (to at most {longest}), or "
                                f"choose another --partition")
    big = {"cpus": max(r["cpus"] for r in nodes), "mem_mb": max(r["mem_mb"] for r in nodes),
           "gpus": max(r["gpus"] for r in nodes)}
    fixes = []
    if c.cpus > big["cpus"]:
        fixes.append(f"--cpus {big['cpus']} or fewer")
    if mem_mb > big["mem_mb"]:
        gb = big["mem_mb"] // 1024 if big["mem_mb"] >= 1024 else round(big["mem_mb"] / 1024, 2)
        fixes.append(f"--mem {gb} or less")
    if c.gpus > big["gpus"]:
        fixes.append(f"--gpus {big['gpus']}" + (" (this partition has no GPU)" if not big["gpus"] else ""))
    if not fixes:  # each alone exists, never together on one node
        fixes.append("a smaller combination of --cpus, --mem and --gpus")
    offer = "; ".join(f"{r['cpus']} CPU(s), {r['mem_mb'] / 1024:.1f} GB, {r['gpus']} GPU(s)" for r in
                      sorted(nodes, key=lambda r: (r["cpus"], r["mem_mb"], r["gpus"]), reverse=True)[:3])
    raise SlurmRequestError(f"partition {part} cannot run this job: it asks for {ask}, the largest node offers "
                            f"{offer}; Slurm would keep it pending forever: use {', '.join(fixes)}, or choose "
                            f"another --partition")


# Reasons a pending job gives that it will not start by itself, and what to do.
NEVER_STARTS = {
    "PartitionConfig": "no node of the partition has what the job asks for; it will never start: scancel {id} "
                       "and submit again with fewer --cpus/--mem/--gpus or another --partition",
    "PartitionTimeLimit": "--time is over the partition's limit; it will never start: scancel {id} and submit "
                          "again with a shorter --time",
    "PartitionNodeLimit": "the partition does not allow the nodes asked for; scancel {id} and submit again",
    "PartitionDown": "the partition is down; it starts once an administrator brings it up",
    "ReqNodeNotAvail": "the nodes the job can use are down or drained",
    "InvalidAccount": "the account is not valid; scancel {id} and submit again with another --account",
    "InvalidQOS": "the QOS is not valid; scancel {id} and submit again with another --qos",
}


# ... and reasons that only mean "wait".
WAITING = {"Resources": "waiting for a node with the CPUs/memory/GPUs asked for to free up",
           "Priority": "waiting behind jobs of higher priority"}


def pending_reason(job_id: str, timeout_s: float = 10.0) -> str | None:
    """Why Slurm keeps the job pending (``squeue -o %r``), with what to do when it will not start by
    itself; None when the job is not pending (or squeue does not answer)."""
    jid = str(job_id).split("_")[0]
    try:
        out = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T|%r"], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        state, _, reason = line.strip().partition("|")
        if state == "PENDING" and reason:
            key = reason.split(",")[0].split("(")[0].strip()
            hint = NEVER_STARTS.get(key) or WAITING.get(key)
            return f"{reason}: {hint.format(id=jid)}" if hint else reason
    return None


def job_state(submitit_folder, job_id: str) -> str:
    """The job's state in Slurm's accounting (through submitit), or "unknown (...)" where no scheduler answers
    from here (the run's own files still do)."""
    import submitit

    try:
        return submitit.SlurmJob(folder=submitit_folder, job_id=job_id).state
    except Exception as e:
        return f"unknown ({type(e).__name__})"
