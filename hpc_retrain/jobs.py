"""``hpc-retrain train`` and ``hpc-retrain status``: training as a submitit job, locally or on Slurm.

The job is a :class:`TrainingJob` (a ``submitit.helpers.Checkpointable``). Everything it needs to continue
lives in the run folder (``checkpoints/``), so the requeued copy of the job is the job itself: on Slurm's
pre-timeout signal (SIGUSR2, ``signal_delay_s`` before the limit) ``train`` saves the exact state after the
step in flight, then hands the signal to submitit, which calls ``checkpoint()`` and requeues; the new attempt
resumes from that checkpoint. A plain SIGTERM (scancel, preemption) also saves before the process ends.

Executors: ``local`` (default: submitit's LocalExecutor, a detached process on this machine), ``slurm``, and
``inline`` (this very process, no submitit: for debugging; signals reach the training directly).
TensorFlow is imported only inside the job, so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from hpc_retrain.config import RunConfig, _set_dotted, _split

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUBMITIT_DIR = "submitit"
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # a workstation run has no wall-clock limit unless --time asks for one
SIGNAL_DELAY_S = 120  # time between Slurm's warning signal and the kill: one step plus a checkpoint
LOCK_FILE = ".lock"  # flock'ed by the process that trains the run, for as long as it trains
JOB_LOCK_WAIT_S = 60  # a requeued job may start while the previous attempt is still exiting
# Sections of a run's config that come from its training store (what the tiles were made with).
STORE_SECTIONS = ("preprocess", "labels", "tiling")


class RunBusy(ValueError):
    """Another process is training this run folder; the message names the folder, the pid and the host."""


class TrainFailed(ValueError):
    """A training that failed for a reason given in one line (a damaged store, a full disk...)."""


class RunFileError(ValueError):
    """A run file (status.json) that cannot be read; the message names it."""


class SlurmRequestError(ValueError):
    """A job request no node of the partition can satisfy: it would pend forever."""


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


# ------------------------------------------------------------------------------------------ the job
class TrainingJob(submitit.helpers.Checkpointable):
    """Train (or resume) ``run_dir`` from ``store``; picklable (plain data only), safe to requeue."""

    def __init__(self, config: dict[str, Any], store: str, run_dir: str):
        self.config = config
        self.store = str(store)
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        from hpc_retrain.train import TrainingInterrupted, train

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
            line = failure_line(e, Path(self.run_dir), Path(self.store))
            if line is None:
                raise
            record_failure(Path(self.run_dir), line, cfg.train.epochs)
            raise TrainFailed(line) from None

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


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "status":
        p.add_argument("run", metavar="RUN", help="run folder")
        p.add_argument("--json", action="store_true", help="print the status as JSON")
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = STATUS_EXIT_CODES
        return
    p.add_argument("--store", help="training store (from `hpc-retrain prepare`); a resumed run remembers it")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run folder for the model, history and checkpoints; an existing run resumes")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="total epochs (a resumed run continues up to this)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--init", choices=["pretrained", "reinit", "finetune-decoder"])
    g.add_argument("--base-model", metavar="PATH", help="Keras model to start from (default: MISIC's)")
    j = p.add_argument_group("job")
    j.add_argument("--executor", choices=["local", "slurm", "inline"],
                   help="local (default): a background process here; slurm: a batch job; inline: this process")
    j.add_argument("--partition")
    j.add_argument("--account")
    j.add_argument("--qos")
    j.add_argument("--time", type=int, metavar="MIN", help="wall-clock limit in minutes")
    j.add_argument("--gpus", type=int, help="GPUs per job (0 on clusters without GPUs)")
    j.add_argument("--cpus", type=int)
    j.add_argument("--mem", type=float, metavar="GB")
    j.add_argument("--container", metavar="IMAGE", help="run the job inside this Apptainer image")
    j.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the job and show its progress (default: wait for local, not for slurm)")


STATUS_EXIT_CODES = """exit status:
  0  finished, running, or pending (submitted; interrupted with its state saved, to resume)
  1  failed, or stopped (the training process died without reporting: killed, out of memory)
  2  not a training run (no config.yaml/status.json/job.json), or bad usage"""


def main(args: argparse.Namespace) -> int:
    return status_main(args) if args.command == "status" else train_main(args)


def build_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Saved run config (when resuming without --config), then --config/--set, then options."""
    from hpc_retrain.cli import config_from_args

    fields = {
        "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.learning_rate": args.lr,
        "train.init": args.init, "train.base_model": args.base_model,
        # "inline" is a way to run, not a cluster setting: the config keeps local|slurm
        "cluster.executor": None if args.executor == "inline" else args.executor,
        "cluster.partition": args.partition, "cluster.account": args.account, "cluster.qos": args.qos,
        "cluster.time_min": args.time, "cluster.gpus": args.gpus, "cluster.cpus": args.cpus,
        "cluster.mem_gb": args.mem, "cluster.container": args.container,
    }
    if args.config is None and (run_dir / "config.yaml").is_file():
        data = RunConfig.read_saved(run_dir).to_dict()
        for item in args.overrides:
            _set_dotted(data, *_split(item))
        for k, v in fields.items():
            if v is not None:
                _set_dotted(data, k, v)
        return RunConfig.from_dict(data, source=f"{run_dir / 'config.yaml'} with options")
    return config_from_args(args, **fields)


def train_main(args: argparse.Namespace) -> int:
    from hpc_retrain.cli import CliError

    run_dir = Path(args.run)
    record = read_job(run_dir)
    store = Path(args.store) if args.store else Path(record["store"]) if record.get("store") else None
    if store is None:
        raise CliError("--store is required for a new run")
    if not store.exists():
        raise CliError(f"{store}: training store not found")
    cfg = build_config(args, run_dir)
    # Every check before any file is written: a refused command leaves the run as it was.
    check_resume(cfg, run_dir)

    if args.executor == "inline":
        with run_lock(run_dir):  # the first write; a second training of this folder stops here
            cfg.save(run_dir)
            return _train_inline(cfg, store, run_dir)

    holder = training_holder(run_dir)
    if holder:
        raise RunBusy(f"{run_dir}: already training ({holder})")
    if cfg.cluster.executor == "slurm":
        check_slurm_request(cfg, args.time or cfg.cluster.time_min)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir)  # the settings a job starts with are visible before it runs

    ex = make_executor(cfg, run_dir, store, timeout_min=args.time)
    job = ex.submit(TrainingJob(cfg.to_dict(), str(store.resolve()), str(run_dir.resolve())))
    rec = {"executor": cfg.cluster.executor, "job_id": str(job.job_id), "store": str(store.resolve()),
           "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
           "submitit_folder": str(run_dir.resolve() / SUBMITIT_DIR), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(run_dir / JOB_FILE, rec)
    print(f"submitted {cfg.cluster.executor} job {job.job_id}")
    print(f"  run folder: {run_dir.resolve()}")
    print(f"  stdout:     {job.paths.stdout}")
    print(f"  stderr:     {job.paths.stderr}")
    print(f"  progress:   hpc-retrain status {run_dir}")
    wait = args.wait if args.wait is not None else cfg.cluster.executor == "local"
    if not wait:
        return 0
    return _follow(job, run_dir)


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


def check_resume(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse, with one line and before anything is written, a resume the training would refuse.

    A run that has a checkpoint continues with the settings it started with: the checkpoint's
    ``train_config`` and ``data_seed`` fix ``train._RESUME_FIXED`` and the seed, and preprocess, labels and
    tiling came from the training store (the run's config.yaml holds them).
    """
    from hpc_retrain.cli import CliError
    from hpc_retrain.train import _RESUME_FIXED, latest_checkpoint

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        return  # a new run, or one that never reached a checkpoint: any settings
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        return  # the training itself reports an unreadable checkpoint
    diffs = []
    old, now = state.get("train_config"), cfg.train.model_dump(mode="json")
    if isinstance(old, dict):
        diffs += [f"train.{k} {_show(now.get(k))} (the run has {_show(old.get(k))})"
                  for k in _RESUME_FIXED if old.get(k) != now.get(k)]
    if "data_seed" in state and state["data_seed"] != cfg.seed:
        diffs.append(f"seed {cfg.seed} (the run has {state['data_seed']})")
    if diffs:
        raise CliError(f"{run_dir}: cannot resume with other settings than the run started with: "
                       f"{'; '.join(diffs)}; leave them out to resume, or train into a new run folder")
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
        raise CliError(f"{run_dir}: cannot change {'; '.join(diffs)}: preprocess, labels and tiling come from "
                       f"the training store the run was started on; prepare a new store and train into a new "
                       f"run folder")


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _show(v) -> str:
    return "none" if v is None else json.dumps(v) if isinstance(v, (list, dict, str)) else str(v)


def _train_inline(cfg: RunConfig, store: Path, run_dir: Path) -> int:
    from hpc_retrain.train import TrainingInterrupted, train

    _write_json(run_dir / JOB_FILE, {"executor": "inline", "job_id": str(os.getpid()), "store": str(store.resolve()),
                                     "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        metrics = train(cfg, store, run_dir)
    except TrainingInterrupted as e:
        print(f"hpc-retrain train: {e}; run the same command to resume", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        line = failure_line(e, run_dir, store)
        if line is None:
            raise
        record_failure(run_dir, line, cfg.train.epochs)
        raise TrainFailed(line) from None
    print(json.dumps(metrics.get("final", {})))
    return 0


def failure_line(e: BaseException, run_dir: Path, store: Path | None = None) -> str | None:
    """One line for a failure that would otherwise be a traceback (or a traceback in status.json): a tile
    TensorFlow's input pipeline could not read, another store chunk that does not decode (the validation
    fields' probabilities), or the file system (disk full, read-only...); else None."""
    from hpc_retrain.store import ENVIRONMENT_ERRORS, environment_error
    from hpc_retrain.train import TileReader

    if type(e).__module__.startswith("tensorflow") and TileReader.failure:
        return TileReader.failure
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
    from hpc_retrain import store as st

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
    from hpc_retrain.train import STATUS_FILE, write_status

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
    from hpc_retrain.train import CKPT_DIR

    pid = os.getpid()
    for p in [*run_dir.glob(f".tmp-{pid}-*"), *run_dir.glob("*.tmp"), *(run_dir / CKPT_DIR).glob(f".tmp-*-{pid}")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _follow(job, run_dir: Path) -> int:
    """Echo train.log while the job runs, then report how it ended."""
    log_path = run_dir / "train.log"
    pos = log_path.stat().st_size if log_path.is_file() else 0
    while True:
        done = job.done()
        if log_path.is_file():
            with open(log_path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if done:
            break
        time.sleep(2)
    try:
        metrics = job.result()
    except Exception as e:  # the job's own traceback is in its stderr log
        print(f"hpc-retrain train: job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e) else e}\n"
              f"  see {job.paths.stderr}", file=sys.stderr)
        return 1
    print(json.dumps(metrics.get("final", {})))
    return 0


# ------------------------------------------------------------------------------------------ status
def read_job(run_dir: Path) -> dict:
    p = Path(run_dir) / JOB_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_status(run_dir: Path) -> dict:
    """State of a run from its own files (status.json written by the training, job.json by the launcher)
    and, for Slurm jobs that have not reported yet, the scheduler."""
    from hpc_retrain.train import STATUS_FILE, read_history

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(run_dir)
    job = read_job(run_dir)
    st_path = run_dir / STATUS_FILE
    try:
        status = json.loads(st_path.read_text()) if st_path.is_file() else {}
        if not isinstance(status, dict):
            raise ValueError(f"a JSON {type(status).__name__}, not an object")
    except ValueError as e:  # also UnicodeDecodeError: binary garbage
        raise RunFileError(f"{st_path} is corrupt: {' '.join(str(e).split())[:200]}; the training rewrites it: "
                           f"rerun the `hpc-retrain train` command of this run to resume (or delete the file)") \
            from None
    state = status.get("state", "submitted" if job else "unknown")
    if state == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        state = "stopped"  # killed without a chance to report (SIGKILL, out of memory)
    out = {"run": str(run_dir.resolve()), "state": state, "executor": job.get("executor"),
           "host": status.get("host"), "pid": status.get("pid"),
           "job_id": job.get("job_id"), "epoch": status.get("epoch"), "epochs": status.get("epochs"),
           "stdout": job.get("stdout"), "stderr": job.get("stderr"), "error": status.get("error")}
    if job.get("executor") == "slurm" and job.get("job_id") and state in ("submitted", "running", "interrupted"):
        try:
            out["scheduler_state"] = submitit.SlurmJob(folder=job["submitit_folder"], job_id=job["job_id"]).state
        except Exception as e:  # no scheduler reachable from here: the run's own files still answer
            out["scheduler_state"] = f"unknown ({type(e).__name__})"
        reason = _pending_reason(job["job_id"])
        if reason:
            out["scheduler_state"] = "PENDING"  # squeue knows now; sacct may not have the job yet
            out["scheduler_reason"] = reason
    hist = read_history(run_dir)
    out["latest"] = hist[-1] if hist else None
    return out


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


def _pending_reason(job_id: str, timeout_s: float = 10.0) -> str | None:
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


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


RUN_FILES = ("config.yaml", "status.json", JOB_FILE)


def status_main(args: argparse.Namespace) -> int:
    """Print the run's state; exit 0 (finished, running, pending), 1 (failed, stopped), 2 (not a run)."""
    from hpc_retrain.cli import CliError

    run = Path(args.run)
    if run.is_dir() and not any((run / n).is_file() for n in RUN_FILES):
        raise CliError(f"{run}: not a training run: no config.yaml/status.json; train with "
                       f"`hpc-retrain train --store STORE --run {run}`")
    try:
        s = run_status(run)
    except FileNotFoundError:
        raise CliError(f"{args.run}: no such run folder") from None
    code = 1 if s["state"] in ("failed", "stopped") else 0
    if args.json:
        print(json.dumps(s, indent=1))
        return code
    job = f" ({s['executor']} job {s['job_id']})" if s.get("job_id") else ""
    print(f"run:    {s['run']}")
    print(f"state:  {s['state']}{job}" + (f", scheduler: {s['scheduler_state']}" if "scheduler_state" in s else "")
          + (f" ({s['scheduler_reason']})" if s.get("scheduler_reason") else ""))
    if s.get("error"):
        print(f"error:  {s['error']}")
    h = s["latest"]
    if h:
        of = f"/{s['epochs']}" if s.get("epochs") else ""
        vals = " ".join(f"{k} {h[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_iou", "val_dice")
                        if h.get(k) is not None)
        print(f"epoch:  {h['epoch']}{of}  {vals}  ({h.get('time_s', 0):.1f} s)")
    else:
        print("epoch:  none finished yet")
    for k in ("stdout", "stderr"):
        if s.get(k):
            print(f"{k}: {s[k]}")
    return code


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
