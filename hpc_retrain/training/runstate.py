"""The state of a training run, from its own files: who trains it now (its lock), what the launcher recorded
(``job.json``), what the training reports (``status.json``, the history) and, for Slurm jobs that have not
reported yet, what the scheduler says. Nothing here starts or needs TensorFlow."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.io.atomic import pid_alive
from hpc_retrain.io.runfolder import LOCK_FILE, STATUS_FILE, read_job
from hpc_retrain.training import scheduler
from hpc_retrain.training.history import read_history

log = logging.getLogger(__name__)



class RunBusy(HpcRetrainError, ValueError):
    """Another process is training this run folder; the message names the folder, the pid and the host."""


class RunFileError(HpcRetrainError, ValueError):
    """A run file (status.json) that cannot be read; the message names it."""


# ------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float = 0.0):
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` (created, with the folder, if missing).

    The first thing a training writes, held until it ends (the kernel releases it when the process dies,
    however it dies). A second training of the same folder gets :class:`RunBusy` after ``wait_s``. On a
    file system without ``flock`` (some Lustre mounts) the run goes on unlocked, with a warning.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _acquire(fd, run_dir, wait_s)
        if locked:  # who holds it, for the message of the one refused
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        try:
            yield
        finally:
            if locked:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, run_dir: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RunBusy(f"{run_dir}: already training ({_holder(run_dir)})") from None
            time.sleep(0.5)
        except OSError as e:
            log.warning("%s: cannot lock %s (%s); nothing stops a second training of this run",
                        run_dir, LOCK_FILE, e)
            return False


def _holder(run_dir: Path) -> str:
    """"pid N on HOST" of the process holding the run's lock (it writes them just after taking it)."""
    for _ in range(20):
        try:
            doc = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "null")
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("pid"):
            return f"pid {doc['pid']} on {doc.get('host', '?')}"
        time.sleep(0.1)
    return "pid unknown"


def training_holder(run_dir: Path) -> str | None:
    """"pid N on HOST" when a process trains ``run_dir`` now, else None (also when locks are unsupported)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(run_dir)
    except OSError:
        return None
    finally:
        os.close(fd)



def run_status(run_dir: Path) -> dict:
    """State of a run from its own files (status.json written by the training, job.json by the launcher)
    and, for Slurm jobs that have not reported yet, the scheduler."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(run_dir)
    job = read_job(run_dir)
    st_path = run_dir / STATUS_FILE
    if st_path.exists() and not st_path.is_file():
        raise RunFileError(f"{st_path} is not a file (a folder?); the training writes its state there: move it "
                           f"away, then rerun the `hpc-retrain train` command of this run")
    try:
        status = json.loads(st_path.read_text()) if st_path.is_file() else {}
        if not isinstance(status, dict):
            raise ValueError(f"a JSON {type(status).__name__}, not an object")
    except OSError as e:  # permission denied, I/O error: the machine's, not the file's content
        raise RunFileError(f"{st_path}: cannot read it ({e.strerror or e}); fix its permissions (or the disk) "
                           f"and ask again") from None
    except ValueError as e:  # also UnicodeDecodeError: binary garbage
        raise RunFileError(f"{st_path} is corrupt: {' '.join(str(e).split())[:200]}; the training rewrites it: "
                           f"rerun the `hpc-retrain train` command of this run to resume (or delete the file)") \
            from None
    state = status.get("state", "submitted" if job else "unknown")
    if state == "running" and status.get("host") == socket.gethostname() and not pid_alive(status.get("pid")):
        state = "stopped"  # killed without a chance to report (SIGKILL, out of memory)
    out = {"run": str(run_dir.resolve()), "state": state, "executor": job.get("executor"),
           "host": status.get("host"), "pid": status.get("pid"),
           "job_id": job.get("job_id"), "epoch": status.get("epoch"), "epochs": status.get("epochs"),
           "stdout": job.get("stdout"), "stderr": job.get("stderr"), "error": status.get("error")}
    if job.get("executor") == "slurm" and job.get("job_id") and state in ("submitted", "running", "interrupted"):
        out["scheduler_state"] = scheduler.job_state(job.get("submitit_folder"), job["job_id"])
        reason = scheduler.pending_reason(job["job_id"])
        if reason:
            out["scheduler_state"] = "PENDING"  # squeue knows now; sacct may not have the job yet
            out["scheduler_reason"] = reason
    try:
        hist = read_history(run_dir)
        if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
            raise ValueError("not a list of epochs")
    except (OSError, ValueError) as e:  # the training rewrites it at the next epoch end
        hist = []
        out["history_error"] = f"{run_dir / 'history.json'} is unreadable ({' '.join(str(e).split())[:120]})"
    out["latest"] = hist[-1] if hist else None
    return out


def _number(v, fmt: str = ".4f") -> str:
    """``v`` formatted as a number, or as it is (a history written by hand may hold anything)."""
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return repr(v)


def status_text(s: dict) -> str:
    """The lines ``hpc-retrain status`` prints for a :func:`run_status` record."""
    job = f" ({s['executor']} job {s['job_id']})" if s.get("job_id") else ""
    lines = [f"run:    {s['run']}",
             f"state:  {s['state']}{job}" + (f", scheduler: {s['scheduler_state']}" if "scheduler_state" in s else "")
             + (f" ({s['scheduler_reason']})" if s.get("scheduler_reason") else "")]
    if s.get("error"):
        lines.append(f"error:  {s['error']}")
    h = s["latest"]
    if s.get("history_error"):
        lines.append(f"epoch:  unknown: {s['history_error']}")
    elif h:
        of = f"/{s['epochs']}" if s.get("epochs") else ""
        vals = " ".join(f"{k} {_number(h[k])}" for k in ("loss", "accuracy", "val_loss", "val_iou", "val_dice")
                        if h.get(k) is not None)
        lines.append(f"epoch:  {h.get('epoch', '?')}{of}  {vals}  ({_number(h.get('time_s', 0), '.1f')} s)")
    else:
        lines.append("epoch:  none finished yet")
    lines += [f"{k}: {s[k]}" for k in ("stdout", "stderr") if s.get(k)]
    return "\n".join(lines)
