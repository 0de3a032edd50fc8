"""The library's entry points, one per stage, each taking a :class:`~hpc_retrain.config.RunConfig`.

    from hpc_retrain import RunConfig, evaluate, prepare, segment, train

    cfg = RunConfig.load("run.yaml").updated(plate__path="plate.zarr")
    store = prepare(cfg, "plate.train.zarr").path
    train(cfg, store, "runs/r1", executor="inline")
    segment(cfg.updated(infer__model="runs/r1", infer__name="r1"))
    print(evaluate(cfg.updated(infer__name="r1"), "plate.zarr", "truth")["table"])

``train`` returns a handle with ``.result()`` however it runs (inline, a local or a Slurm job), as
submitit's jobs do. ``crossval``, ``status`` and ``synth`` complete the stages. ``hpc-retrain``
(``hpc_retrain.commands``) is a few lines of option parsing around these and imports nothing below them.
Nothing heavy is imported until a function runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# What each data command computes: ``labels`` and ``targets`` alone, or ``prepare`` both.
PREPARE_STAGES: dict[str, tuple[str, ...]] = {"labels": ("labels",), "targets": ("targets",),
                                              "prepare": ("labels", "targets")}

if TYPE_CHECKING:
    from hpc_retrain.config import RunConfig
    from hpc_retrain.prepare.pipeline import Summary
    from hpc_retrain.segment.pipeline import Segmented


def quiet_tensorflow_import() -> None:
    """Drop the native start-up lines TensorFlow prints at its first import in this process, whichever stage
    makes it (TensorFlow is not imported now)."""
    from hpc_retrain.inference.model import quiet_tensorflow_import as quiet

    quiet()


def apply_backend(cfg: RunConfig, announce: bool = True) -> str:
    """Choose the Keras backend ``cfg`` asks for (``compute.backend``, else KERAS_BACKEND) before keras is
    imported; its name. A conflict or a backend that is not installed is one line (``BackendError``).
    ``announce=False``: no log line yet (the stage that uses Keras logs it)."""
    from hpc_retrain.inference import backend

    return backend.apply(cfg.compute.backend, announce)


def prepare(cfg: RunConfig, out: str | Path | None = None, stages: Iterable[str] = ("labels", "targets"),
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Fill the training store ``out`` (default: ``./<plate name>.train.zarr``) with ``stages`` of every field
    of ``cfg.plate``; a rerun resumes. The summary's ``text()`` lists flagged fields; its QC table is beside."""
    from hpc_retrain.inference import backend
    from hpc_retrain.prepare import pipeline as preparation

    backend.apply(cfg.compute.backend)
    if cfg.plate.path is None:
        raise preparation.PrepareError("no plate: give --plate PATH or set plate.path in the config")
    cfg = cfg.updated(plate__path=Path(cfg.plate.path).resolve())
    return preparation.run(cfg, out or preparation.default_store(cfg.plate.path), tuple(stages), overwrite=overwrite,
                  progress=progress)


class InlineRun:
    """A training in this very process, with the handle of a submitted job: ``result()`` trains (or resumes)
    the first time it is called, as submitit's debug jobs do, and returns the metrics."""

    executor = "inline"

    def __init__(self, cfg: RunConfig, store: Path, run_dir: Path):
        import os

        self.cfg, self.store, self.run_dir = cfg, store, run_dir
        self.job_id = str(os.getpid())
        self._metrics: dict | None = None

    def done(self) -> bool:
        return self._metrics is not None

    def result(self) -> dict:
        from hpc_retrain.training import jobs

        if self._metrics is None:
            self._metrics = jobs.train_inline(self.cfg, self.store, self.run_dir)
        return self._metrics


class SubmittedRun:
    """A training submitted as a local or Slurm job (``job``: the ``submitit.Job``)."""

    def __init__(self, job: Any, run_dir: Path, executor: str):
        self.job, self.run_dir, self.executor = job, run_dir, executor
        self.job_id = str(job.job_id)
        self.paths = job.paths

    def done(self) -> bool:
        return self.job.done()

    def result(self, echo: Callable[[str], Any] | None = None) -> dict:
        """Wait for the job, handing what it appends to train.log to ``echo``; its metrics, or ``JobFailed``."""
        from hpc_retrain.training import jobs

        return jobs.follow(self.job, self.run_dir, echo=echo)


def train(cfg: RunConfig, store: str | Path | None, run_dir: str | Path, executor: str | None = None,
          time_min: int | None = None) -> InlineRun | SubmittedRun:
    """Train (or resume) ``run_dir`` on ``store`` (None: the store a resumed run was started on); a handle
    whose ``result()`` is the metrics.

    ``executor``: "inline" trains in this process when ``result()`` is called; otherwise the job goes to
    ``cfg.cluster.executor`` (local or slurm, ``time_min`` its limit) at once. A resume with settings the run
    cannot change is refused before anything is written."""
    from hpc_retrain.training import jobs

    run_dir = Path(run_dir)
    store = jobs.resolve_store(run_dir, store)
    jobs.check_resume(cfg, run_dir, store)
    jobs.check_run_folder(run_dir)
    if executor == "inline":
        return InlineRun(cfg, store, run_dir)
    if executor is not None and executor != cfg.cluster.executor:
        cfg = cfg.updated(cluster__executor=executor)
    return SubmittedRun(jobs.submit(cfg, store, run_dir, time_min=time_min), run_dir, cfg.cluster.executor)


def status(run_dir: str | Path) -> dict:
    """The state of a training run from its own files (and, for a Slurm job that has not reported, the
    scheduler); refused in one line for a folder that is not a run or does not exist."""
    from hpc_retrain.io import runfolder
    from hpc_retrain.training import runstate

    run = Path(run_dir)
    if not run.is_dir():
        raise runstate.RunFileError(f"{run}: no such run folder")
    if not runfolder.is_run(run):
        raise runstate.RunFileError(f"{run}: not a training run: no config.yaml/status.json; train with "
                                    f"`hpc-retrain train --store STORE --run {run}`")
    if not any((run / n).exists() for n in (runfolder.STATUS_FILE, runfolder.JOB_FILE)):
        raise runstate.RunFileError(f"{run}: no training was started here (a config.yaml but no "
                                    f"{runfolder.STATUS_FILE} or {runfolder.JOB_FILE}); train with "
                                    f"`hpc-retrain train --store STORE --run {run}`")
    return runstate.run_status(run)


def status_text(record: dict) -> str:
    """The lines ``hpc-retrain status`` prints for a :func:`status` record."""
    from hpc_retrain.training import runstate

    return runstate.status_text(record)


def segment(cfg: RunConfig, out: str | Path | None = None, **options: Any) -> Segmented:
    """Segment ``cfg.plate`` with ``cfg.infer.model`` into OME-Zarr results named ``cfg.infer.name`` (see
    :func:`hpc_retrain.segment.pipeline.segment` for ``channel``, ``wells``, ``tiff``, ``overwrite``)."""
    from hpc_retrain.inference import backend
    from hpc_retrain.segment.pipeline import segment as run

    backend.apply(cfg.compute.backend)
    return run(cfg, out, **options)


def evaluate(cfg: RunConfig, pred: str | Path, ref: str, ref_plate: str | Path | None = None,
             out: str | Path | None = None, overlays: int = 3, channel: str | None = None) -> dict:
    """Score the results ``cfg.infer.name`` of plate ``pred`` against the reference masks ``ref`` (a label
    image of that plate, or a channel of ``ref_plate``); with ``out``, the scores and pictures go there."""
    from hpc_retrain.evaluate.scoring import evaluate_plate

    return evaluate_plate(pred, cfg.infer.name, ref, ref_plate, out, overlays, channel or cfg.plate.brightfield,
                          plate_cfg=cfg.plate, channel_given=channel is not None)


def plate_wells(cfg: RunConfig) -> list[str]:
    """The wells of ``cfg.plate``, in plate order (one per job-array task of ``slurm/segment.sbatch``)."""
    from hpc_retrain.segment.pipeline import plate_wells as wells

    return wells(cfg)


def crossval(cfg: RunConfig, out: str | Path, folds: int = 3) -> dict:
    """Does retraining help on ``cfg.plate``? k-fold by field, pretrained and retrained scored on held-out
    fields; writes ``out/crossval.json`` and returns it (its ``table`` is the text to print)."""
    from hpc_retrain.evaluate import crossval as cv

    res = cv.run(cfg, out, folds)
    return {**res, "table": cv.table(res)}


def synth(out: str | Path, cfg: RunConfig, fmt: str = "tiff", wells: Iterable[str] = ("A1",),
          fields_per_well: int = 2, shape: tuple[int, int] = (512, 512), density: float | None = None,
          modality: str = "brightfield") -> Path:
    """Write a synthetic plate of paired brightfield/fluorescence fields with true masks to ``out``; cells are
    drawn ``cfg.preprocess.mean_width`` wide (the synthetic default while it is "auto"), seeded by ``cfg.seed``;
    ``modality``: the transmitted-light channel as brightfield or phase contrast."""
    from hpc_retrain.synth import plates

    width = plates.SynthParams.mean_width if cfg.preprocess.mean_width == "auto" else cfg.preprocess.mean_width
    kw = {} if density is None else {"density": density}
    plates.write_plate(out, fmt=fmt, wells=list(wells), fields_per_well=fields_per_well, shape=shape,
                       seed=cfg.seed, mean_width=width, modality=modality, **kw)
    return Path(out)


def synth_plate_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a plate ``synth`` wrote (which ``synth --overwrite`` may replace); None when it is."""
    from hpc_retrain.synth import plates

    return plates.own_plate_problem(Path(path))
