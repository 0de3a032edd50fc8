"""The labels, targets and prepare stages: a plate -> the Zarr training store, one Dask task per field.

Each task reads its field, computes its stage(s), writes its own tiles (one tile per chunk, so tasks never
share a chunk), its QC and its error text, and only then marks the stage done; ``field_done`` is set once
both stages are. A killed run is resumed by rerunning the same command: finished stages are skipped, a
half-written field is simply rewritten. A bad field (constant or NaN image, unreadable file, no cells...)
is FLAGGED in the QC table with the reason instead of stopping the run. A fault of the machine (disk full,
quota, read-only or unreadable file system, permission denied) is never a bad field: the run stops with one
line naming the path, the field stays not done, and rerunning the same command once it is fixed finishes it.
A rerun also redoes finished fields whose tiles lost chunk files (``store.missing_tiles``).

Next to ``store.py``'s arrays the store holds, per stage (``labels``, ``targets``), arrays of shape (F,):
``<stage>_done`` uint8, ``<stage>_error`` str (empty when fine) and ``<stage>_written`` float64 (Unix time
the stage finished, to audit resumes); ``store.array_layout`` describes them. The settings are the store's
root attribute ``config`` (``store.stored_config`` reads them); ``<store>.config.yaml`` and ``<store>.qc.csv``
beside the store summarize the run for people.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain.config import RunConfig
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st
from hpc_retrain.prepare.qc import FIELD_STAGES, Summary, finalize, qc_path, set_field_state

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, ...]] = {"labels": ("labels",), "targets": ("targets",), "prepare": FIELD_STAGES}
# Sections whose values change what is stored; a store made with other values is refused.
COMPARED = ("plate", "preprocess", "labels", "tiling")
STAGE_QC = {"labels": layout.QC_COLUMNS[:8], "targets": layout.QC_COLUMNS[8:]}


class PrepareError(HpcRetrainError, ValueError):
    """A run that cannot go on (every field flagged, a store made with other parameters...)."""


def environment_problem(e: BaseException, store_path: Path, plate_path=None) -> PrepareError | None:
    """One line for a fault of the machine behind ``e`` (disk full, quota, read-only, permission, I/O
    error), naming the path and the fix; None for anything else."""
    env = st.environment_error(e)
    if env is None:
        return None
    what, fix = st.ENVIRONMENT_ERRORS[env.errno]
    store_path = Path(store_path).resolve()
    path = Path(env.filename).resolve() if env.filename else None

    def under(folder) -> bool:
        return path is not None and folder is not None and Path(folder).resolve() in (path, *path.parents)

    if path is None or under(store_path) or under(store_path.parent) and store_path.name in path.name:
        where = f"writing {store_path}"
    elif under(plate_path):
        where = f"reading {path}"
    else:
        where = f"at {path}"
    return PrepareError(f"{what} {where}: {fix} and rerun the same command")


# What an earlier version stored as a field's error when the machine failed (the field must be redone).
_ENVIRONMENT_TEXT = re.compile(r"\[Errno (" + "|".join(str(n) for n in st.ENVIRONMENT_ERRORS) + r")\]")


# ---------------------------------------------------------------------------------------------- paths
def default_store(plate: Path) -> Path:
    name = Path(plate).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path.cwd() / f"{name}.train.zarr"


# ----------------------------------------------------------------------------------------- the run
class _FieldRef:
    """Carries a plate Field into a task as-is (Dask would otherwise unpack its lazy arrays)."""

    def __init__(self, field):
        self.field = field


def run(cfg: RunConfig, store_path: str | Path, stages: tuple[str, ...] = ("labels", "targets"),
        overwrite: bool = False, progress: bool = True) -> Summary:
    """Fill ``store_path`` with ``stages`` for every field of ``cfg.plate`` not done yet.

    A fault of the machine (see :func:`environment_problem`) stops the run with a one-line PrepareError.
    """
    store_path = Path(store_path).resolve()  # workers may run elsewhere (another cwd or host)
    try:
        return _run(cfg, store_path, stages, overwrite, progress)
    except PrepareError:
        raise
    except Exception as e:
        problem = environment_problem(e, store_path, cfg.plate.path)
        if problem is None:
            raise
        raise problem from None


def _run(cfg: RunConfig, store_path: Path, stages: tuple[str, ...], overwrite: bool, progress: bool) -> Summary:
    import dask

    from hpc_retrain.io.plate import open_plate

    if overwrite and store_path.is_dir():
        with st.replacing(store_path):  # refused now, before any work, while a training reads the store
            pass
    if cfg.cluster.scheduler_address:
        check_scheduler(cfg.cluster.scheduler_address)
    plate = open_plate(cfg.plate)
    needs = {"labels": cfg.plate.fluorescence, "targets": cfg.plate.brightfield}
    plate.require(*(needs[s] for s in stages))
    # Before planning: the plan, every stage and the saved config need the width as a number.
    cfg = resolve_width(cfg, plate, store_path, overwrite)
    entries = layout.plan_fields(plate.fields, cfg.preprocess.scale, cfg.tiling.size, cfg.tiling.margin)
    root = open_or_create(store_path, entries, cfg, overwrite)
    st.save_config(root, store_path, cfg)
    redo_damaged(root, store_path)

    done = {s: root[f"{s}_done"][:].astype(bool) for s in STAGES["prepare"]}
    # A field also needs its task when both stages are done but the run died before ``field_done``.
    need = ~np.logical_and.reduce([done[s] for s in stages]) | (
        ~root["field_done"][:].astype(bool) & done["labels"] & done["targets"])
    todo = [e for e in entries if need[e.index]]
    log.info("%s: %d fields, %d to do (%s)", store_path, len(entries), len(todo), " + ".join(stages))
    if todo:
        workers = cfg.cluster.workers
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 and not cfg.cluster.scheduler_address \
            else None
        tasks = [dask.delayed(process_field, pure=False)(_FieldRef(plate.fields[e.index]), e, str(store_path),
                                                          cfg, stages, threads) for e in todo]
        _compute(tasks, cfg, progress)
    summary = finalize(store_path, stages)
    if summary.nothing_usable:
        raise PrepareError(f"{store_path}: every field was flagged, nothing to train on:\n"
                           + "\n".join(summary.text().splitlines()[1:]))
    return summary


def resolve_width(cfg: RunConfig, plate, store_path: Path, overwrite: bool = False) -> RunConfig:
    """``cfg`` with a numeric ``preprocess.mean_width``; "auto" is measured on the plate's fluorescence.

    Resuming (or adding a stage to) a store made with "auto" reuses the width it records instead of
    measuring again: the same store must not be refused over a last-digit difference of a re-measurement.
    """
    if cfg.preprocess.mean_width != "auto":
        return cfg
    if store_path.exists() and not overwrite:
        try:
            made = st.stored_config(st.open_store(store_path))
        except st.StoreError:
            made = {}
        if made.get("plate", {}).get("path") == (str(cfg.plate.path) if cfg.plate.path else None):
            stored = made.get("preprocess", {}).get("mean_width")
            if isinstance(stored, (int, float)):
                log.info("mean width: %s px, measured when %s was made", stored, store_path)
                return cfg.updated(preprocess__mean_width=stored)
    from hpc_retrain.prepare import labels as L
    from hpc_retrain.prepare import width as W

    # The labelling model: this process's labels stage reuses it, so measuring loads nothing extra.
    return W.resolve_mean_width(cfg, plate, model=L.get_model(None))


def check_scheduler(address: str, timeout_s: float = 10.0) -> None:
    """Refuse, before any work, a Dask scheduler address nothing answers at (one line, not a traceback after
    distributed's 30 s timeout)."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise PrepareError(f"--scheduler {address}: not a scheduler address; give tcp://HOST:PORT (e.g. "
                           f"tcp://node1:8786)")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise PrepareError(f"--scheduler {address}: nothing answers there ({e.strerror or e}); start the scheduler "
                           f"(`dask scheduler`) and its workers, or leave out --scheduler to run here") from None


def _compute(tasks, cfg: RunConfig, progress: bool) -> list[Any]:
    import dask

    if cfg.cluster.scheduler_address or cfg.cluster.workers > 1:
        from distributed import Client, LocalCluster
        from distributed import progress as dprogress

        if cfg.cluster.scheduler_address:
            client, cluster = Client(cfg.cluster.scheduler_address), None
        else:
            # One thread per process: TensorFlow and the filters release the GIL only in part.
            cluster = LocalCluster(n_workers=cfg.cluster.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
        try:
            futures = client.compute(tasks)
            if progress and sys.stderr.isatty():
                dprogress(futures)
            return client.gather(futures)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    # A bar only on a terminal, and on stderr: stdout keeps the summary; a Slurm log file gets the per-field
    # log lines instead of carriage-return redraws.
    if progress and sys.stderr.isatty():
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0, dt=0.5, out=sys.stderr):
            return list(dask.compute(*tasks, scheduler="synchronous"))
    return list(dask.compute(*tasks, scheduler="synchronous"))


# ------------------------------------------------------------------------------------------- store
def open_or_create(path: Path, entries: list[layout.FieldEntry], cfg: RunConfig, overwrite: bool):
    import zarr

    config = cfg.to_dict()
    if path.exists():
        try:
            root = st.open_store(path, mode="r+")
        except st.DamagedStore as e:
            if not overwrite:
                raise
            log.warning("rebuilding (--overwrite): %s", e)
            root = None
        except st.StoreError:
            if any(path.iterdir()) if path.is_dir() else True:
                raise st.StoreError(f"{path}: exists and is not a training store; choose another --out") from None
            root = None
        if root is not None:
            diffs = _differences(st.stored_config(root), config, root.attrs.get("fields", []), entries)
            if not diffs:
                _ensure_stage_arrays(root, len(entries))
                st.describe_arrays(root)  # an older store's arrays get their attributes
                return root
            if not overwrite:
                raise st.StoreError(f"{path}: was made with other parameters ({'; '.join(diffs[:5])}); "
                                   f"rerun with --overwrite to rebuild it, or choose another --out")
            log.warning("%s: rebuilding (--overwrite): %s", path, "; ".join(diffs[:5]))
        with st.replacing(path):
            shutil.rmtree(path)
        qc_path(path).unlink(missing_ok=True)
        st.config_copy_path(path).unlink(missing_ok=True)
    root = st.create(path, entries, config, cfg.tiling.size)
    _ensure_stage_arrays(root, len(entries))
    return zarr.open_group(str(path), mode="r+")


def _differences(old: dict, new: dict, old_fields: list[dict], entries: list[layout.FieldEntry]) -> list[str]:
    diffs = []
    for sec in COMPARED:
        a, b = old.get(sec, {}), new.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{sec}.{k}: {a.get(k)!r} in the store, {b.get(k)!r} now")
    now = [(e.well, e.field, list(e.shape)) for e in entries]
    before = [(f["well"], f["field"], list(f["shape"])) for f in old_fields]
    if now != before:
        diffs.append(f"the plate's fields changed ({len(before)} in the store, {len(now)} now)")
    return diffs


def redo_damaged(root, store_path: Path) -> dict[int, dict[str, list[int]]]:
    """Mark not done the stages of fields that cannot be trained on as stored: finished tiles whose chunk
    files are missing (they would read as zeros), or a "flag" an earlier version recorded for a full disk
    or another fault of the machine. The run then redoes them. Returns the missing tiles found."""
    found: dict[int, dict[str, list[int]]] = {}
    redo: dict[int, list[str]] = {}
    for stage in STAGES["prepare"]:
        done = root[f"{stage}_done"][:].astype(bool)
        errors = [str(x) for x in root[f"{stage}_error"][:]]
        fine = [i for i in np.flatnonzero(done) if not errors[i]]
        for i, tiles in st.missing_tiles(root, fine, layout.STAGE_TILES[stage]).items():
            found.setdefault(i, {}).update(tiles)
            redo.setdefault(i, []).append(stage)
        for i in np.flatnonzero(done):
            if _ENVIRONMENT_TEXT.search(errors[i]):
                redo.setdefault(int(i), []).append(stage)
    if found:
        log.warning("%s: redoing %d finished field(s) whose tile chunks are missing (%s)", store_path, len(found),
                    st.describe_missing(root, found))
    others = sorted(set(redo) - set(found))
    if others:
        log.warning("%s: redoing %d field(s) flagged for a fault of the machine, not of the data", store_path,
                    len(others))
    for i, stages in redo.items():
        for stage in stages:
            root[f"{stage}_done"][i] = 0
            root[f"{stage}_error"][i] = ""
        root["field_done"][i] = 0
        root["field_status"][i] = layout.PENDING
    return found


def _ensure_stage_arrays(root, nf: int) -> None:
    st.ensure_stage_arrays(root, nf, STAGES["prepare"])


# ------------------------------------------------------------------------------------------ a field
def process_field(ref: _FieldRef, entry: layout.FieldEntry, store_path: str, cfg: RunConfig,
                  stages: tuple[str, ...], threads: int | None = None) -> dict[str, str]:
    """One Dask task: every requested, unfinished stage of one field, written into the store.

    A fault of the machine raises a one-line :class:`PrepareError` (the stage stays not done)."""
    try:
        return _process_field(ref, entry, store_path, cfg, stages, threads)
    except PrepareError:
        raise
    except Exception as e:
        problem = environment_problem(e, Path(store_path), cfg.plate.path)
        if problem is None:
            raise
        raise problem from None


def _process_field(ref: _FieldRef, entry: layout.FieldEntry, store_path: str, cfg: RunConfig,
                   stages: tuple[str, ...], threads: int | None = None) -> dict[str, str]:
    import dask
    import zarr

    root = zarr.open_group(store_path, mode="r+")
    i, errors = entry.index, {}
    # Whatever runs inside this task (a large scan's chunks) stays in this worker thread; all-zero tiles get
    # chunk files too (arrays opened in here keep that setting), so a missing one means damage, not zeros.
    with dask.config.set(scheduler="synchronous"), st.writing_every_chunk():
        for stage in stages:
            if root[f"{stage}_done"][i]:
                continue
            t0 = time.time()
            qc, error = _run_stage(stage, ref.field, entry, root, cfg, threads)
            cols = [layout.QC_COLUMNS.index(c) for c in STAGE_QC[stage]]
            row = root["field_qc"][i]
            row[cols] = [qc.get(c, np.nan) for c in STAGE_QC[stage]]
            root["field_qc"][i] = row
            root[f"{stage}_error"][i] = error
            root[f"{stage}_written"][i] = time.time()
            root[f"{stage}_done"][i] = 1  # last: a stage killed before this line is redone on resume
            errors[stage] = error
            log.info("%s %s: %s (%.1f s)", entry.well, entry.field, f"{stage} FLAGGED: {error}" if error
                     else f"{stage} ok", time.time() - t0)
    set_field_state(root, i)
    return errors


def _run_stage(stage: str, field, entry: layout.FieldEntry, root, cfg: RunConfig, threads) -> tuple[dict, str]:
    from hpc_retrain.imaging.preprocess import ImageError
    from hpc_retrain.io.plate import PlateError
    from hpc_retrain.prepare import labels as L
    from hpc_retrain.prepare import targets as TG

    source = f"{entry.source} ({cfg.plate.fluorescence if stage == 'labels' else cfg.plate.brightfield})"
    try:
        im = _read(field, cfg.plate.fluorescence if stage == "labels" else cfg.plate.brightfield, cfg, source)
        if stage == "labels":
            model = L.get_model(None, threads, cfg.compute.engine)
            grid, qc = L.write_label_tiles(im, model, cfg, root["probabilities"], root["labels"],
                                           entry.first_tile, source)
            reasons = L.qc_flags(qc)
        else:
            grid, qc = TG.write_target_tiles(im, cfg, root["targets"], entry.first_tile, source)
            reasons = []
    except (ImageError, PlateError, OSError) as e:
        if st.environment_error(e) is not None:
            raise  # the machine, not the field: never flagged (process_field stops the run)
        return {}, str(e)
    if len(grid) != entry.n_tiles:  # the plan and the pixels disagree: never store misaligned tiles
        return qc, f"{source}: {len(grid)} tiles computed but {entry.n_tiles} planned; image size changed?"
    return qc, "; ".join(reasons)


def _read(field, channel: str, cfg: RunConfig, source: str):
    """The channel in memory, or still lazy when it is a large scan processed chunk by chunk."""
    from hpc_retrain.imaging import blocks as B
    from hpc_retrain.io.plate import PlateError
    arr = field.channel(channel)
    if B.is_large(tuple(arr.shape), cfg.compute.chunk):
        return arr
    try:
        return np.asarray(arr.compute())
    except PlateError:
        raise
    except Exception as e:  # a damaged chunk or file: name it, flag the field
        if st.environment_error(e) is not None:
            raise  # disk, permission or I/O errors are the machine's, not the field's
        raise PlateError(f"{source}: pixels unreadable ({type(e).__name__}: {e})") from None
