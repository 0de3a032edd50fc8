"""Does retraining help on *this* plate? k-fold cross-validation by field, with the tool's own stages.

For each fold the plate's other fields build a training store (``prepare``: labels from fluorescence,
targets from brightfield) and train a run (``train``, the configured recipe); the fold's fields, which the
model never saw, are then segmented from brightfield by the pretrained and by the retrained model, exactly
as ``segment`` does, and both are scored against the same references:

* ``teacher``: pretrained MISIC on the same fields' fluorescence, as the training labels are made
  (``labels.teacher``: over ``labels.width_factors``, less specks under half a cell-width square and blobs
  not ``labels.min_snr`` noise s.d. brighter than the background);
* the plate's reference channel (``plate.reference``, e.g. hand-made masks) when it has one: recall only,
  since such masks are often partial.

Each fold's training fields are written as a small TIFF plate (channel/NNNNN.tif) in the fold's folder for
``prepare``; the input plate is never changed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hpc_retrain.config import RunConfig
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.evaluate import scoring
from hpc_retrain.imaging import metrics

log = logging.getLogger(__name__)


def folds(n: int, k: int) -> list[np.ndarray]:
    """Field indices of each fold: interleaved, so neighbouring (often similar) fields spread over folds."""
    k = max(2, min(k, n))
    return [np.arange(i, n, k) for i in range(k)]


def _write_plate(fields, channels: list[str], out: Path) -> Path:
    import tifffile

    for i, f in enumerate(fields):
        for ch in channels:
            d = out / ch
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{i + 1:05d}.tif"
            if not path.is_file():
                tifffile.imwrite(path, np.asarray(f.channel(ch)))
    return out


class CrossvalError(HpcRetrainError, ValueError):
    """A cross-validation that cannot run as asked; the message names the plate or folder and what to do."""


PLATE_RECORD = "crossval.plate.json"  # in --out: which plate the folds there were made from


def plate_identity(plate) -> dict:
    """What makes the folds of ``out`` belong to ``plate``: its path, its fields and their sizes, and a digest
    of the first field's pixels (a plate written anew at the same path is another plate)."""
    import hashlib

    first = plate.fields[0]
    h = hashlib.sha256()
    for name in sorted(first.channels):
        h.update(name.encode())
        h.update(np.ascontiguousarray(np.asarray(first.channel(name))).tobytes())
    return {"plate": str(Path(plate.path).resolve()), "fields": [f.key for f in plate.fields],
            "shapes": [list(f.shape) for f in plate.fields], "first_field_sha256": h.hexdigest()}


def claim_out(out: Path, plate) -> None:
    """Record ``plate`` as the plate of ``out`` or refuse: the folds' stores and runs in ``out`` are resumed
    from, so those of another plate would be reported as this plate's gain."""
    from hpc_retrain.io import atomic

    record = out / PLATE_RECORD
    ident = plate_identity(plate)
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise CrossvalError(f"{record}: unreadable ({e}); choose another --out") from None
        if old != ident:
            same = old.get("plate") == ident["plate"]
            what = f"an earlier version of {ident['plate']}" if same else f"plate {old.get('plate')}"
            raise CrossvalError(f"{out}: holds the cross-validation of {what} ({len(old.get('fields') or [])} "
                                f"field(s)), not of {ident['plate']} ({len(ident['fields'])} field(s)); its "
                                f"folds would be reused: choose another --out")
        return
    earlier = sorted(p.name for p in out.glob("fold*") if p.is_dir())
    if earlier:
        raise CrossvalError(f"{out}: holds folds ({', '.join(earlier[:3])}) of a cross-validation that did not "
                            f"record its plate; they may be another plate's: choose another --out")
    atomic.write_json(record, ident)


def _scores(ref: np.ndarray, pred: np.ndarray) -> metrics.Score:
    return metrics.match(ref, pred, (0.5,))[0]


def run(cfg: RunConfig, out: str | Path, k: int = 3) -> dict:
    """Cross-validate ``cfg``'s recipe on ``cfg.plate``; writes ``out/crossval.json`` and returns it."""
    from hpc_retrain.inference import backend
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference import predictor as infer
    from hpc_retrain.io.plate import open_plate
    from hpc_retrain.prepare import labels as L
    from hpc_retrain.prepare import pipeline as preparation
    from hpc_retrain.training import loop as tr

    backend.apply(cfg.compute.backend)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plate = open_plate(cfg.plate)
    pc = cfg.plate
    plate.require(pc.brightfield, pc.fluorescence)
    if len(plate.fields) < 2:
        raise CrossvalError(f"{plate.path}: cross-validation needs at least 2 fields (each fold trains on some "
                            f"and scores the others); the plate has {len(plate.fields)}")
    claim_out(out, plate)
    if cfg.preprocess.mean_width == "auto":
        from hpc_retrain.prepare.width import resolve_mean_width

        cfg = resolve_mean_width(cfg, plate)
    width = cfg.preprocess.width
    fields = plate.fields
    pretrained = M.load(None)
    results = {"plate": str(plate.path), "mean_width": width, "folds": [], "config": cfg.to_dict()}
    totals = {name: metrics.Score(0.5, 0, 0, 0, 0.0) for name in ("pretrained", "retrained")}
    recall = {name: metrics.Score(0.5, 0, 0, 0, 0.0) for name in ("pretrained", "retrained", "teacher")}
    t_start = time.perf_counter()
    for i, test in enumerate(folds(len(fields), k)):
        fold_dir = out / f"fold{i + 1}"
        held_out = set(test.tolist())
        train_fields = [f for j, f in enumerate(fields) if j not in held_out]
        view = _write_plate(train_fields, [pc.brightfield, pc.fluorescence], fold_dir / "train_plate")
        fcfg = cfg.updated(plate__path=str(view), plate__layout="tiff")
        store = fold_dir / "train.zarr"
        preparation.run(fcfg, store, preparation.STAGES["prepare"], progress=False)
        run_dir = fold_dir / "run"
        trained = tr.train(fcfg, store, run_dir)
        run_cfg = RunConfig.read_saved(run_dir)
        retrained = M.load(run_dir)
        fold = {"test_fields": [fields[j].key for j in test], "train_fields": [f.key for f in train_fields],
                "best_epoch": trained.get("best_epoch"), "validation": trained.get("validation"), "fields": {}}
        for j in test:
            f = fields[j]
            fluo = np.asarray(f.channel(pc.fluorescence))
            bf = np.asarray(f.channel(pc.brightfield))
            teacher = L.teacher(fluo, pretrained, cfg, f.key)
            _, pre = infer.segment_field(pretrained, bf, cfg)
            _, post = infer.segment_field(retrained, bf, run_cfg)
            row = {"teacher_cells": int(len(np.unique(teacher)) - 1)}
            for name, pred in (("pretrained", pre), ("retrained", post)):
                s = _scores(teacher, pred)
                totals[name] = totals[name] + s
                row[name] = s.as_dict()
            if pc.reference and pc.reference in f.channels:
                ref, _ = scoring.reference_instances(np.asarray(f.channel(pc.reference)),
                                               f"{plate.path}: reference {pc.reference!r} of {f.key}")
                for name, pred in (("pretrained", pre), ("retrained", post), ("teacher", teacher)):
                    s = _scores(ref, pred)
                    recall[name] = recall[name] + s
                    row[f"{name}_vs_reference"] = s.as_dict()
            fold["fields"][f.key] = row
        results["folds"].append(fold)
        log.info("fold %d/%d: F1@0.5 vs teacher so far: pretrained %.3f, retrained %.3f", i + 1, k,
                 totals["pretrained"].f1, totals["retrained"].f1)
    results["overall"] = {name: s.as_dict() for name, s in totals.items()}
    if any(s.tp + s.fn for s in recall.values()):
        results["reference_recall"] = {name: s.recall for name, s in recall.items()}
    results["time_s"] = round(time.perf_counter() - t_start, 1)
    (out / "crossval.json").write_text(json.dumps(results, indent=1))
    (out / "crossval.txt").write_text(table(results))
    return results


def table(res: dict) -> str:
    o = res["overall"]
    lines = [f"cross-validation on {res['plate']} ({len(res['folds'])} folds, mean width {res['mean_width']:g} px): "
             f"brightfield instances vs the fluorescence teacher on held-out fields",
             f"{'model':<11}{'F1@0.5':>8}{'prec':>7}{'recall':>8}{'mIoU':>7}"]
    for name in ("pretrained", "retrained"):
        s = o[name]
        lines.append(f"{name:<11}{s['f1']:>8.3f}{s['precision']:>7.3f}{s['recall']:>8.3f}{s['mean_iou']:>7.3f}")
    if "reference_recall" in res:
        lines.append("recall of the reference masks at IoU 0.5: " +
                     ", ".join(f"{k} {v:.3f}" for k, v in res["reference_recall"].items()))
    lines.append(f"gain: {o['retrained']['f1'] - o['pretrained']['f1']:+.3f} F1@0.5; {res['time_s']:.0f} s")
    return "\n".join(lines) + "\n"
