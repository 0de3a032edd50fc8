"""The segment stage: a plate and a model in, each field's instance labels and probabilities out (OME-Zarr).

Each field's result is written so that a killed run never leaves one that looks finished (the completion
marker, see ``outputs``): a rerun redoes unfinished fields without ``overwrite`` ("redoing N incomplete
field(s)") and ``evaluate`` refuses them. A rerun with the same settings keeps finished fields; with other
settings it refuses unless ``overwrite`` (or another result name).

Fields that cannot be segmented (unreadable, NaN pixels, constant such as all zeros) are skipped with one
line each, like ``prepare`` flags them; the run fails only when no field was segmented. With ``wells`` (one
well per job-array task) only the fields asked for are checked and written; the output plate of a TIFF plate
holds every field (``outputs.output_plate``). Fields larger than ``compute.chunk`` go chunk by chunk
(``infer.segment_scan``), the others through the in-memory pipeline (``infer.segment_fields``).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_retrain.config import ChannelPrep, RunConfig, taken_keys
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.imaging import blocks as B
from hpc_retrain.imaging import preprocess as P
from hpc_retrain.inference import instances as I
from hpc_retrain.inference import predictor as infer
from hpc_retrain.io import ngff, runfolder
from hpc_retrain.segment import outputs as O

log = logging.getLogger(__name__)

BATCH_FIELDS = 16  # in-memory fields checked and pipelined this many at a time
# What a trained run's model needs from the run's config (see with_run_settings).
RUN_SETTINGS = ("preprocess", "tiling", "infer.body_threshold", "infer.marker_threshold", "infer.contour_threshold")


class SegmentError(HpcRetrainError, ValueError):
    """A segment request that cannot run as asked; the message names the plate or output and what to do."""


@dataclass
class Segmented:
    """What a segment run did: cells of each field segmented, fields skipped (and why), fields kept."""

    path: Path
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """No field segmented: every one asked for was skipped."""
        return bool(self.skipped) and not self.counts and not self.kept

    def text(self) -> str:
        note = f"; skipped {len(self.skipped)} field(s): {', '.join(self.skipped)}" if self.skipped else ""
        return (f"segmented {len(self.counts)} field(s), {sum(self.counts.values())} cells -> {self.path} "
                f"(labels/{self.name}, {O.PROB_GROUP}/{self.name}){note}")


def with_run_settings(cfg: RunConfig, run_dir: Path, overrides: Iterable[str] = ()) -> RunConfig:
    """``cfg`` with what a trained run's model needs: the preprocessing and tiling its tiles were made with
    and the post-processing thresholds calibrated on its validation fields. Fields given in ``overrides``
    (``--set`` items) win; a config file does not (a shared run.yaml would otherwise silently undo the
    calibration)."""
    overrides = list(overrides)
    used = taken_keys(RUN_SETTINGS, overrides)
    cfg = RunConfig.layered(saved=run_dir, file=cfg, saved_keys=RUN_SETTINGS, explicit=overrides)
    log.info("using %s of %s: mean width %s px, body > %s, markers > %s, contour < %s", ", ".join(used),
             run_dir / runfolder.CONFIG_FILE, cfg.preprocess.mean_width, cfg.infer.body_threshold,
             cfg.infer.marker_threshold, cfg.infer.contour_threshold)
    return cfg


def settle(cfg: RunConfig, plate, source_channel: str, overrides: Iterable[str] = ()) -> RunConfig:
    """The stage's configuration, settled once before any work: a trained run's settings (see
    :func:`with_run_settings`) and ``preprocess.mean_width: auto`` measured on this plate."""
    from hpc_retrain.prepare.width import resolve_mean_width

    model_dir = runfolder.run_of(cfg.infer.model)  # a run folder, or the run of a checkpoint folder
    if model_dir is not None:
        cfg = with_run_settings(cfg, model_dir, overrides)
    return resolve_mean_width(cfg, plate, source_channel)  # "auto": measured on this plate, recorded


def open_plate(cfg: RunConfig):
    from hpc_retrain.io import plate as PL

    if cfg.plate.path is None:
        raise SegmentError("no plate: pass --plate PATH (or set plate.path)")
    return PL.open_plate(cfg.plate)


def plate_wells(cfg: RunConfig) -> list[str]:
    """The wells of ``cfg.plate``, in plate order."""
    return list(dict.fromkeys(f.well for f in open_plate(cfg).fields))


def segment(cfg: RunConfig, out: str | Path | None = None, channel: str = "brightfield",
            wells: list[str] | None = None, tiff: str | Path | bool | None = None, overwrite: bool = False,
            overrides: Iterable[str] = ()) -> Segmented:
    """Segment ``channel`` of ``cfg.plate`` with ``cfg.infer.model`` into results named ``cfg.infer.name``.

    ``out``: the OME-Zarr plate to write (default: an OME-Zarr input plate itself; ``<folder>.ome.zarr``
    beside a TIFF plate); ``wells``: only these; ``tiff``: also TIFFs, into this folder (True or "":
    ``<plate>_<name>_tiff`` beside the plate); ``overwrite``: replace results of the same name;
    ``overrides``: settings the caller set explicitly (``--set`` items), kept over a trained run's.
    """
    from hpc_retrain import __version__
    from hpc_retrain.inference import model as M

    plate = open_plate(cfg)
    source_channel = getattr(cfg.plate, channel)
    plate.require(source_channel)
    fields = plate.fields
    if wells is not None:
        unknown = sorted(set(wells) - {f.well for f in fields})
        if unknown:
            raise SegmentError(f"{plate.path}: no well(s) {unknown}; `--list-wells` shows the plate's wells")
        fields = [f for f in fields if f.well in wells]
    given = bool(out)
    target, in_place = _check_output(plate, out)
    tiff_folder(plate, tiff, cfg.infer.name, check=True)  # the TIFF folder's own problems name it, not --out

    cfg = settle(cfg, plate, source_channel, overrides)
    prep = getattr(cfg.preprocess, channel)
    # A run still training (or preempted) gives its best, else latest, checkpoint; a line says which.
    model, source = M.load_with_source(cfg.infer.model, cfg.tiling.size)
    predict = infer.Predictor(model, cfg.compute.batch_size, cfg.tiling.size, cfg.compute.engine)
    provenance = {"version": __version__, "model": str(source.path), "model_sha256": source.sha256,
                  "mode": cfg.infer.mode, "channel": source_channel, "engine": predict.engine,
                  "backend": _keras_backend(),
                  "config": cfg.to_dict()}
    if source.is_checkpoint:  # the folder (best, above all) changes as training goes on: say what it held
        provenance["model_checkpoint"] = dict(source.checkpoint, weights="variables.npz")
    run = _Run(cfg, source_channel, prep, predict, provenance, overwrite)
    try:
        return run(plate, fields, None if in_place else target, tiff)
    except OSError as e:
        problem = O.fs_problem(e, target, given)
        if problem is None:
            raise
        raise SegmentError(problem) from None


def tiff_folder(plate, tiff, name: str, check: bool = False) -> Path | None:
    """The folder of ``--tiff`` (None: no TIFFs), created; with ``check``, refused (one line naming it) when it
    is a file or cannot be written, before any work."""
    if tiff is None or tiff is False:
        return None
    folder = Path(tiff) if tiff not in (True, "") else plate.path.parent / f"{plate.path.name}_{name}_tiff"
    if check:
        if folder.exists() and not folder.is_dir():
            raise SegmentError(f"{folder}: is a file, not a folder for the TIFFs; choose another --tiff DIR")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SegmentError(f"{folder}: cannot create the TIFF folder ({e.strerror or e}); choose another "
                               f"--tiff DIR") from None
        err = O.probe_writable(folder)
        if err is not None:
            raise SegmentError(f"{folder}: cannot write the TIFFs there ({err.strerror or err}); choose another "
                               f"--tiff DIR, or fix its permissions or free space")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_output(plate, out: str | Path | None) -> tuple[Path, bool]:
    """(the plate results go into, whether that is the input plate itself); refuses a read-only or full
    output with one line before any work, and removes temporary folders of killed segments beside it."""
    given = bool(out)
    out = Path(out) if out else None
    if out is not None and out.exists() and plate.layout == "ome-zarr" and out.resolve() == plate.path.resolve():
        out = None
    in_place = out is None and plate.layout == "ome-zarr"
    target = plate.path if in_place else (out or O.default_output(plate.path))
    probe = target if target.exists() else target.parent
    if probe.is_dir() and (err := O.probe_writable(probe)) is not None and O.fs_problem(err, target, given):
        raise SegmentError(O.fs_problem(err, plate.path if in_place else probe, given))
    # Temporary data of segments killed before they could clean up (their pid in the folder name).
    removed, unknown = O.remove_stale_temp(target.parent)
    if removed:
        print(f"removed {len(removed)} stale temporary folder(s) of killed segment runs: "
              f"{', '.join(p.name for p in removed)}")
    if unknown:  # a job array's tasks on other nodes write theirs beside ours: one line, not one each
        log.info("left %d temporary folder(s) of segments on other hosts (or of older versions) alone, e.g. %s; "
                 "remove those of segments no longer running", len(unknown), unknown[0])
    return target, in_place


def _bad_field(f, channel: str, prep: ChannelPrep) -> str | None:
    """Why field ``f`` cannot be segmented (unreadable, NaN pixels, constant...), or None; reads it."""
    from hpc_retrain.io.plate import PlateError

    source = f"{f.source} ({channel})"
    try:
        im = np.asarray(f.channel(channel))
    except PlateError as e:
        return str(e)
    except Exception as e:  # a damaged chunk or file
        return f"{source}: pixels unreadable ({type(e).__name__}: {e})"
    try:
        P.check_image(im, source)
        P.intensity_range(im, prep.percentiles, source)
    except P.ImageError as e:
        return str(e)
    return None


class _Run:
    """One segment of some fields of a plate: which to do, then each written with its completion marker."""

    def __init__(self, cfg: RunConfig, channel: str, prep: ChannelPrep, predict, provenance: dict,
                 overwrite: bool):
        self.cfg, self.channel, self.prep, self.predict = cfg, channel, prep, predict
        self.provenance, self.overwrite = provenance, overwrite
        self.name = cfg.infer.name
        self.settings = O.result_settings(provenance)
        self.tiff_dir: Path | None = None
        self.bar: _progress | None = None
        self.result: Segmented | None = None

    def __call__(self, plate, fields, out: Path | None, tiff) -> Segmented:
        out_path, groups = O.output_plate(plate, out, fields, self.cfg.compute.chunk)
        todo, kept = self._plan(out_path, fields, groups)
        self.tiff_dir = tiff_folder(plate, tiff, self.name)
        self.result = Segmented(out_path, self.name, kept=kept)
        chunk = self.cfg.compute.chunk
        small = [(f, g) for f, g in todo if max(f.shape) <= chunk]
        large = [(f, g) for f, g in todo if B.is_large(tuple(f.shape), chunk)]
        with _progress(len(todo), "segment") as self.bar:
            self._small(small)
            self._large(large, out_path.parent)
        return self.result

    def _plan(self, out_path: Path, fields, groups) -> tuple[list, list[str]]:
        """(fields to do with their groups, fields kept). Only the fields asked for count: finished ones made
        with these settings are kept, finished ones made otherwise refuse the run (before any write) unless
        overwriting, unfinished ones are redone."""
        name = self.name
        todo, kept, clash, redo = [], [], [], []
        for f, grp in zip(fields, groups):
            O.check_inside(out_path, grp.path, name)
            foreign = O.foreign_result(grp, name)
            if foreign:
                raise SegmentError(f"{out_path}/{grp.path}/{foreign} was not written by hpc-retrain (hand-made masks, "
                                   f"or another tool's): it is never replaced, --overwrite or not; choose another "
                                   f"--name for the results")
            state = O.result_state(grp, name)
            if state == "complete" and not self.overwrite:
                diff = O.settings_differ(grp["labels"][name].attrs.get(ngff.PROVENANCE), self.settings)
                if diff:
                    clash.append((f"{out_path}/{grp.path}/labels/{name}", diff))
                else:
                    kept.append(f.key)
                continue
            if state == "incomplete":
                redo.append(f.key)
            todo.append((f, grp))
        if clash:
            where, diff = clash[0]
            more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
            raise SegmentError(f"{where} already holds results{more} made with other settings "
                               f"({'; '.join(diff[:3])}); pass --overwrite to replace them or --name to write "
                               f"beside them")
        if kept:
            print(f"{len(kept)} field(s) already segmented with these settings, kept (--overwrite redoes them)")
        if redo:
            print(f"redoing {len(redo)} incomplete field(s) (a segment stopped before finishing them): "
                  f"{', '.join(redo[:10])}{' ...' if len(redo) > 10 else ''}")
        return todo, kept

    def _small(self, todo) -> None:
        """Fields that fit in memory: the pipelined path, a batch at a time, each field checked first (a
        constant, NaN or unreadable field is skipped, not fatal)."""
        for b in range(0, len(todo), BATCH_FIELDS):
            batch = []
            for f, grp in todo[b:b + BATCH_FIELDS]:
                reason = _bad_field(f, self.channel, self.prep)
                if reason:
                    self._skip(f, reason)
                else:
                    batch.append((f, grp))
            images = (f.channel(self.channel) for f, _ in batch)
            results = infer.segment_fields(self.predict, images, self.cfg, prep=self.prep,
                                           sources=[f.source for f, _ in batch])
            for (f, grp), (prob, labels) in zip(batch, results):
                prob_arr, lab_arr = self._begin(f, grp)
                prob_arr[...] = np.moveaxis(prob, -1, 0)
                lab_arr[...] = labels
                self._finish(f, grp, np.moveaxis(prob, -1, 0), labels, int(labels.max()))

    def _large(self, todo, parent: Path) -> None:
        """Larger fields chunk by chunk, their temporary data in one folder beside the output."""
        from hpc_retrain.io.plate import PlateError

        if not todo:
            return
        tmp = O.temp_folder(parent)
        try:
            for f, grp in todo:
                prob_arr, lab_arr = self._begin(f, grp)
                try:
                    n = infer.segment_scan(self.predict, f.channel(self.channel), self.cfg, prob_arr, lab_arr,
                                           prep=self.prep, tmpdir=tmp, source=f"{f.source} ({self.channel})")
                except (P.ImageError, PlateError) as e:
                    O.remove_result(grp, self.name)
                    self._skip(f, str(e))
                    continue
                self._finish(f, grp, None, None, n)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _skip(self, f, reason: str) -> None:
        self.result.skipped[f.key] = reason
        self.bar.write(f"hpc-retrain segment: skipped field {f.key}: {reason}")
        self.bar(f"{f.key}: skipped")

    def _begin(self, f, grp):
        shape, chunk = tuple(f.shape), self.cfg.compute.chunk
        O.begin_result(grp, self.name)  # marked unfinished before any array changes
        return (O.write_probabilities(grp, self.name, shape, chunk, True),
                ngff.create_label(grp, self.name, shape, I.LABEL_DTYPE, chunk=chunk, overwrite=True))

    def _finish(self, f, grp, prob, labels, n: int) -> None:
        name = self.name
        if self.tiff_dir is not None:
            import tifffile

            lab = labels if labels is not None else np.asarray(grp["labels"][name]["0"][...])
            p = prob if prob is not None else np.asarray(grp[O.PROB_GROUP][name]["0"][...])
            tifffile.imwrite(self.tiff_dir / f"{f.well}_s{f.field}_{name}.tif", lab, compression="zlib")
            tifffile.imwrite(self.tiff_dir / f"{f.well}_s{f.field}_{name}_prob.tif", p, compression="zlib")
        O.finish_result(grp, name, self.provenance, n)  # the completion marker: the field's last write
        self.result.counts[f.key] = n
        self.bar(f"{f.key}: {n} cells")


class _progress:
    """A tqdm bar on stderr when it is a terminal; an INFO log line per field otherwise (a Slurm log file
    gets plain lines, not carriage-return redraws)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="field", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def write(self, line: str) -> None:
        """A line on stderr of its own, the bar redrawn below it."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def __call__(self, msg: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
            self.bar.update()
        else:
            log.info("%s %d/%d %s", self.desc, self.n, self.total, msg)


def _keras_backend() -> str:
    from hpc_retrain.inference import backend

    return backend.current()
