"""Launching a training: as a submitit job, locally or on Slurm, or in this very process.

The job is a :class:`TrainingJob` (a ``submitit.helpers.Checkpointable``). Everything it needs to continue
lives in the run folder (``checkpoints/``), so the requeued copy of the job is the job itself: on Slurm's
pre-timeout signal (SIGUSR2, ``signal_delay_s`` before the limit) ``train`` saves the exact state after the
step in flight, then hands the signal to submitit, which calls ``checkpoint()`` and requeues; the new attempt
resumes from that checkpoint. A plain SIGTERM (scancel, preemption) also saves before the process ends.

Executors: ``local`` (default: submitit's LocalExecutor, a detached process on this machine), ``slurm``, and
``inline`` (this very process, no submitit: for debugging; signals reach the training directly).
TensorFlow is imported only inside the job, so launching starts fast. The run's state: ``runstate``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from hpc_retrain.config import STORE_SECTIONS, RunConfig
from hpc_retrain.errors import HpcRetrainError, JobFailed, TrainingInterrupted
from hpc_retrain.io import atomic
from hpc_retrain.io.runfolder import CKPT_DIR, JOB_FILE, LOG_FILE, STATE_FILE, latest_checkpoint, read_job
from hpc_retrain.training import checkpoints, scheduler
from hpc_retrain.training.checkpoints import ResumeError
from hpc_retrain.training.runstate import RunBusy, run_lock, training_holder

log = logging.getLogger(__name__)

SUBMITIT_DIR = "submitit"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # a workstation run has no wall-clock limit unless --time asks for one
SIGNAL_DELAY_S = 120  # time between Slurm's warning signal and the kill: one step plus a checkpoint
JOB_LOCK_WAIT_S = 60  # a requeued job may start while the previous attempt is still exiting
# Sections of a run's config that come from its training store (what the tiles were made with).


class TrainFailed(HpcRetrainError, ValueError):
    """A training that failed for a reason given in one line (a damaged store, a full disk...)."""


# ------------------------------------------------------------------------------------------ the job
class TrainingJob(submitit.helpers.Checkpointable):
    """Train (or resume) ``run_dir`` from ``store``; picklable (plain data only), safe to requeue."""

    def __init__(self, config: dict[str, Any], store: str, run_dir: str):
        self.config = config
        self.store = str(store)
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        from hpc_retrain.inference.model import quiet_tensorflow_import
        from hpc_retrain.training.loop import train

        quiet_tensorflow_import()  # the job's log (a Slurm log) starts with the run's lines, not TensorFlow's
        if not logging.getLogger().handlers:  # in a job process: progress goes to submitit's log too
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                                datefmt="%H:%M:%S")
        cfg = RunConfig.from_dict(self.config)
        try:
            # One training per run folder: held for the whole attempt, released when the process ends.
            with run_lock(Path(self.run_dir), wait_s=JOB_LOCK_WAIT_S):
                return train(cfg, Path(self.store), Path(self.run_dir))
        except TrainingInterrupted as e:
            # train() replaced submitit's handler while it ran and has now saved; let submitit checkpoint()
            # and requeue as if the signal had reached it directly (it exits the process).
            if callable(e.previous_handler):
                e.previous_handler(e.signum, None)
            raise
        except Exception as e:
            failed = recorded_failure(e, Path(self.run_dir), Path(self.store), cfg.train.epochs)
            if failed is None:
                raise
            raise failed from None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The training state is already on disk (train() saves on the signal and at every epoch end) under
        # run_dir, which this object carries: resubmitting it unchanged resumes from the last checkpoint.
        log.info("checkpoint: requeueing training of %s", self.run_dir)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.store, self.run_dir))


# ------------------------------------------------------------------------------------------ executor
def container_python(image: str, binds: list[str]) -> str:
    """The interpreter command for jobs inside an Apptainer image (GPU driver passed through)."""
    parts = ["apptainer", "exec", "--nv"]
    for b in dict.fromkeys(binds):  # run folder and store: not every site binds them by default
        parts += ["--bind", b]
    parts += [image, "python"]
    return " ".join(shlex.quote(p) for p in parts)


def make_executor(cfg: RunConfig, run_dir: Path, store: Path, timeout_min: int | None = None):
    """A submitit AutoExecutor for ``cfg.cluster`` writing its files under ``run_dir/submitit``."""
    c = cfg.cluster
    folder = run_dir / SUBMITIT_DIR
    kind = "slurm" if c.executor == "slurm" else "local"
    kw: dict[str, Any] = {}
    if c.container:
        kw[f"{kind}_python"] = container_python(c.container, [str(run_dir.resolve()), str(store.resolve())])
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, **kw)
    params: dict[str, Any] = {"name": f"hpc-retrain-{run_dir.name}", "nodes": 1, "tasks_per_node": 1,
                              "cpus_per_task": c.cpus}
    if kind == "slurm":
        params.update(timeout_min=timeout_min or c.time_min, mem_gb=c.mem_gb, slurm_signal_delay_s=SIGNAL_DELAY_S)
        if c.gpus:  # never ask for a GPU gres on a cluster that has none
            params["gpus_per_node"] = c.gpus
        for key in ("partition", "account", "qos"):
            if getattr(c, key):
                params[f"slurm_{key}"] = getattr(c, key)
    else:
        params.update(timeout_min=timeout_min or LOCAL_TIMEOUT_MIN, gpus_per_node=_local_gpus(c.gpus))
    ex.update_parameters(**params)
    return ex


def _local_gpus(requested: int) -> int:
    # submitit's local executor sets CUDA_VISIBLE_DEVICES to that many devices; asking for more than the
    # machine has would hide nothing but must not fail.
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        have = len([ln for ln in out.stdout.splitlines() if ln.startswith("GPU")])
    except (OSError, Exception):
        have = 0
    return min(requested, have)


# ------------------------------------------------------------------------------------------ launching
def check_run_folder(run_dir: Path) -> None:
    """Refuse a run folder that is a file or cannot be written (read-only file system, permission denied, full
    disk), naming it. Nothing is created: a refusal that follows (a Slurm request no node can run) leaves no
    empty run folder behind."""
    from hpc_retrain.segment.outputs import probe_writable

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ResumeError(f"{run_dir}: is a file, not a run folder; choose another --run")
    here = run_dir
    while not here.exists():  # the folder that would hold the new run folder: writing there is what counts
        here = here.parent
    if not here.is_dir():
        raise ResumeError(f"{run_dir}: cannot create the run folder ({here} is a file); choose another --run")
    err = probe_writable(here)
    if err is not None:
        what = "write in" if here == run_dir else "create"
        raise ResumeError(f"{run_dir}: cannot {what} the run folder ({err.strerror or err}); fix the permissions "
                          f"or free space, or choose another --run")


def resolve_store(run_dir: Path, store: str | Path | None) -> Path:
    """``store``, or the one a resumed run was started on (its ``job.json``); refused when there is none."""
    record = read_job(run_dir)
    store = Path(store) if store else Path(record["store"]) if record.get("store") else None
    if store is None:
        raise ResumeError("--store is required for a new run")
    if not store.exists():
        raise ResumeError(f"{store}: training store not found")
    return store


def submit(cfg: RunConfig, store: Path, run_dir: Path, time_min: int | None = None) -> submitit.Job:
    """Submit the training of ``run_dir`` to ``cfg.cluster``'s executor; its record goes to ``job.json``.

    Refused before anything is written while the run trains, or (Slurm) when no node could run the job."""
    holder = training_holder(run_dir)
    if holder:
        raise RunBusy(f"{run_dir}: already training ({holder})")
    if cfg.cluster.executor == "slurm":
        scheduler.check_slurm_request(cfg, time_min or cfg.cluster.time_min)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir)  # the settings a job starts with are visible before it runs
    ex = make_executor(cfg, run_dir, store, timeout_min=time_min)
    job = ex.submit(TrainingJob(cfg.to_dict(), str(store.resolve()), str(run_dir.resolve())))
    atomic.write_json(run_dir / JOB_FILE, {
        "executor": cfg.cluster.executor, "job_id": str(job.job_id), "store": str(store.resolve()),
        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        "submitit_folder": str(run_dir.resolve() / SUBMITIT_DIR), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return job


def train_inline(cfg: RunConfig, store: Path, run_dir: Path) -> dict:
    """Train in this process (signals reach the training directly); the metrics ``train.train`` returns.

    A failure with a one-line cause is recorded in the run's status and raised as :class:`TrainFailed`."""
    from hpc_retrain.training.loop import train

    with run_lock(run_dir):  # the first write; a second training of this folder stops here
        cfg.save(run_dir)
        atomic.write_json(run_dir / JOB_FILE, {"executor": "inline", "job_id": str(os.getpid()),
                                               "store": str(store.resolve()),
                                               "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            return train(cfg, store, run_dir)
        except TrainingInterrupted:
            raise  # its state is saved: the same command resumes
        except Exception as e:
            failed = recorded_failure(e, run_dir, store, cfg.train.epochs)
            if failed is None:
                raise
            raise failed from None


def follow(job, run_dir: Path, echo: Callable[[str], Any] | None = None, poll_s: float = 2.0) -> dict:
    """Wait for ``job``, handing what it appends to train.log to ``echo``; its metrics, or :class:`JobFailed`."""
    log_path = run_dir / LOG_FILE
    pos = log_path.stat().st_size if log_path.is_file() else 0
    while True:
        done = job.done()
        if log_path.is_file():
            with open(log_path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk and echo is not None:
                echo(chunk)
        if done:
            break
        time.sleep(poll_s)
    try:
        return job.result()
    except Exception as e:  # the job's own traceback is in its stderr log
        raise JobFailed(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e) else e}\n"
                        f"  see {job.paths.stderr}") from None


def check_resume(cfg: RunConfig, run_dir: Path, store: Path | None = None) -> None:
    """Refuse, with one line and before anything is written, a resume the training would refuse.

    A run that has a checkpoint continues with the settings it started with: the checkpoint's
    ``train_config`` and ``data_seed`` fix ``checkpoints.RESUME_FIXED`` and the seed, and preprocess, labels and
    tiling came from the training store (the run's config.yaml holds them).
    """
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        return  # a new run, or one that never reached a checkpoint: any settings
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return  # the training itself reports an unreadable checkpoint
    checkpoints.check_resume(state, cfg, run_dir)
    if store is not None:
        _check_same_store(state, run_dir, Path(store))
    diffs = []
    try:
        saved = RunConfig.read_saved(run_dir).to_dict()
    except Exception:
        return
    want = cfg.to_dict()
    for sec in STORE_SECTIONS:
        a, b = _flat(saved.get(sec, {}), sec), _flat(want.get(sec, {}), sec)
        for k in sorted(set(a) | set(b)):
            if k == "preprocess.mean_width" and b.get(k) == "auto":
                continue  # "auto" asks for the width the store was measured with
            if a.get(k) != b.get(k):
                diffs.append(f"{k} {_show(b.get(k))} (the run has {_show(a.get(k))})")
    if diffs:
        raise ResumeError(f"{run_dir}: cannot change {'; '.join(diffs)}: preprocess, labels and tiling come from "
                       f"the training store the run was started on; prepare a new store and train into a new "
                       f"run folder")


def _check_same_store(state: dict, run_dir: Path, store: Path) -> None:
    """A run resumes on the store it started on (its fields, tiles, class weights and validation fields
    are that store's): the same folder, or the same store moved (same generation id)."""
    from hpc_retrain.prepare import store as st

    started = state.get("store") or read_job(run_dir).get("store")
    was = state.get("store_generation")
    now = st.generation(store)
    if was is not None and now == was:
        return  # the same store, wherever it is now
    same_path = started is not None and Path(started).resolve() == store.resolve()
    if same_path and (was is None or now is None):
        return  # a run or a store from before generation ids: the path is all there is to compare
    if same_path:
        raise ResumeError(f"{store}: the training store was rebuilt (`hpc-retrain prepare --overwrite`) since run "
                          f"{run_dir} started on it: its fields and tiles are not the run's; train it into a new "
                          f"run folder")
    if started is None and was is None:
        return  # nothing recorded to compare with
    raise ResumeError(f"{run_dir}: cannot resume on store {store}: the run was started on store {started}; "
                      f"leave out --store (or give that one) to resume, or train into a new run folder")


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _show(v) -> str:
    return "none" if v is None else json.dumps(v) if isinstance(v, (list, dict, str)) else str(v)


def recorded_failure(e: BaseException, run_dir: Path, store: Path, epochs) -> TrainFailed | None:
    """For a failure with a one-line cause (:func:`failure_line`): that line, recorded as the run's status,
    as a :class:`TrainFailed` to raise; None for any other failure (it keeps its traceback)."""
    line = failure_line(e, run_dir, store)
    if line is None:
        return None
    record_failure(run_dir, line, epochs)
    return TrainFailed(line)


def failure_line(e: BaseException, run_dir: Path, store: Path | None = None) -> str | None:
    """One line for a failure that would otherwise be a traceback (or a traceback in status.json): a tile
    TensorFlow's input pipeline could not read, another store chunk that does not decode (the validation
    fields' probabilities), or the file system (disk full, read-only...); else None."""
    from hpc_retrain.prepare.store import ENVIRONMENT_ERRORS, environment_error
    from hpc_retrain.training.loop import TileReader

    if TileReader.failure and (type(e).__module__.startswith("tensorflow") or str(e) == TileReader.failure):
        return TileReader.failure  # a training tile that did not decode (raised by the tile loader as it is)
    env = environment_error(e)
    if env is None:
        return _damaged_chunks(e, store) if store is not None and _raised_in_zarr(e) else None
    what, fix = ENVIRONMENT_ERRORS[env.errno]
    path = Path(env.filename) if env.filename else None
    mine = path is None or Path(run_dir).resolve() in (path.resolve(), *path.resolve().parents)
    where = f"writing {path or run_dir}" if mine else f"at {path}"
    return f"{what} {where}: {fix} there and rerun the same command to resume from the last checkpoint"


def _raised_in_zarr(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/zarr/" in name or "numcodecs" in name:
            return True
        tb = tb.tb_next
    return False


def _damaged_chunks(e: BaseException, store: Path) -> str | None:
    """"STORE: chunk file(s) ... are truncated or corrupt ..." when reading the store's tiles fails; None
    when every tile reads (then ``e`` is something else and keeps its traceback)."""
    from hpc_retrain.prepare import store as st

    try:
        root = st.open_store(store)
        bad = st.unreadable_chunks(root, store)
    except Exception:
        return None
    if not bad:
        return None
    files = ", ".join(str(f) for f, _ in bad) + (" (and maybe more)" if len(bad) >= 5 else "")
    return (f"{store}: chunk file(s) {files} are truncated or corrupt ({bad[0][1]}); delete them and rerun "
            f"`{st.prepare_command(root, store)}` (with the options the store was made with), which redoes fields "
            f"with missing chunks")


def record_failure(run_dir: Path, error: str, epochs) -> None:
    """status.json says "failed" with ``error``, also on a full disk: this process's own temporary files
    (a half-written checkpoint) are removed first, and as a last resort the file is overwritten in place,
    which needs no new space."""
    from hpc_retrain.io.runfolder import STATUS_FILE
    from hpc_retrain.training.history import write_status

    run_dir = Path(run_dir)
    _remove_own_temporaries(run_dir)
    try:
        write_status(run_dir, "failed", error=error, epochs=epochs)
        return
    except OSError:
        pass
    doc = json.dumps({"state": "failed", "pid": os.getpid(), "host": socket.gethostname(), "error": error})
    try:
        with open(run_dir / STATUS_FILE, "r+") as f:
            f.write(doc)
            f.truncate()
    except OSError as e:
        log.warning("%s: could not record the failure in %s (%s)", run_dir, STATUS_FILE, e)


def _remove_own_temporaries(run_dir: Path) -> None:
    """The temporary files and folders this process was writing in ``run_dir`` when it failed."""

    pid = os.getpid()
    for p in [*run_dir.glob(f".tmp-{pid}-*"), *run_dir.glob("*.tmp"), *(run_dir / CKPT_DIR).glob(f".tmp-*-{pid}")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()

