"""The library's entry points, one per stage, each taking a :class:`~hpc_retrain.config.RunConfig`.

    from hpc_retrain import RunConfig, evaluate, prepare, segment, train

    cfg = RunConfig.load("run.yaml").updated(plate__path="plate.zarr")
    store = prepare(cfg, "plate.train.zarr").path
    train(cfg, store, "runs/r1", executor="inline")
    segment(cfg.updated(infer__model="runs/r1", infer__name="r1"))
    print(evaluate(cfg.updated(infer__name="r1"), "plate.zarr", "truth")["table"])

``hpc-retrain`` (``hpc_retrain.commands``) is a few lines of option parsing around each. Nothing heavy is
imported until a function runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from hpc_retrain.config import RunConfig
    from hpc_retrain.preparation import Summary
    from hpc_retrain.segmentation import Segmented


def prepare(cfg: RunConfig, out: str | Path | None = None, stages: Iterable[str] = ("labels", "targets"),
            overwrite: bool = False, progress: bool = True) -> Summary:
    """Fill the training store ``out`` (default: ``./<plate name>.train.zarr``) with ``stages`` of every field
    of ``cfg.plate``; a rerun resumes. The summary's ``text()`` lists flagged fields; its QC table is beside."""
    from hpc_retrain import backend as B
    from hpc_retrain import preparation as PR

    B.apply(cfg.compute.backend)
    if cfg.plate.path is None:
        raise PR.PrepareError("no plate: give --plate PATH or set plate.path in the config")
    cfg = cfg.updated(plate__path=Path(cfg.plate.path).resolve())
    return PR.run(cfg, out or PR.default_store(cfg.plate.path), tuple(stages), overwrite=overwrite,
                  progress=progress)


def train(cfg: RunConfig, store: str | Path | None, run_dir: str | Path, executor: str | None = None,
          wait: bool = True, time_min: int | None = None) -> Any:
    """Train (or resume) ``run_dir`` on ``store`` (None: the store a resumed run was started on).

    ``executor``: "inline" trains in this process and returns the metrics; otherwise the job goes to
    ``cfg.cluster.executor`` (local or slurm, ``time_min`` its limit) and, with ``wait``, its metrics are
    returned when it ends, else the submitted ``submitit.Job``. A resume with settings the run cannot change
    is refused before anything is written."""
    from hpc_retrain import jobs

    run_dir = Path(run_dir)
    store = jobs.resolve_store(run_dir, store)
    jobs.check_resume(cfg, run_dir)
    if executor == "inline":
        return jobs.train_inline(cfg, store, run_dir)
    if executor is not None and executor != cfg.cluster.executor:
        cfg = cfg.updated(cluster__executor=executor)
    job = jobs.submit(cfg, store, run_dir, time_min=time_min)
    return jobs.follow(job, run_dir) if wait else job


def segment(cfg: RunConfig, out: str | Path | None = None, **options: Any) -> Segmented:
    """Segment ``cfg.plate`` with ``cfg.infer.model`` into OME-Zarr results named ``cfg.infer.name`` (see
    :func:`hpc_retrain.segmentation.segment` for ``channel``, ``wells``, ``tiff``, ``overwrite``)."""
    from hpc_retrain import backend as B
    from hpc_retrain.segmentation import segment as run

    B.apply(cfg.compute.backend)
    return run(cfg, out, **options)


def evaluate(cfg: RunConfig, pred: str | Path, ref: str, ref_plate: str | Path | None = None,
             out: str | Path | None = None, overlays: int = 3, channel: str | None = None) -> dict:
    """Score the results ``cfg.infer.name`` of plate ``pred`` against the reference masks ``ref`` (a label
    image of that plate, or a channel of ``ref_plate``); with ``out``, the scores and pictures go there."""
    from hpc_retrain.evaluation import evaluate_plate

    return evaluate_plate(pred, cfg.infer.name, ref, ref_plate, out, overlays, channel or cfg.plate.brightfield,
                          plate_cfg=cfg.plate)
