"""Score instance segmentations against reference masks, as cellpose and StarDist do.

The matching and the scores are ``imaging.metrics``'s; here, reading the plates (predictions and references)
and writing the scores. Pictures of the matching (overlays, a contact sheet): ``overlays``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.imaging.metrics import THRESHOLDS, Score, match_objects, summarize, table
from hpc_retrain.io import atomic

log = logging.getLogger(__name__)


class EvaluateError(HpcRetrainError, ValueError):
    """Predictions or references that cannot be scored; the message names the plate and field."""


# ------------------------------------------------------------------------------------------ references
BINARY = "binary masks (connected components are the cells)"
LABELS = "label images (each value is one cell)"


def reference_instances(reference: np.ndarray, source: str = "reference") -> tuple[np.ndarray, str]:
    """The reference cells as an instance label image, and how the image was read (:data:`BINARY`, :data:`LABELS`).

    A mask with a single non-zero value, whatever it is (1, 255 as ImageJ/Fiji export, 1.0, True), is binary:
    its connected components are the cells. Otherwise each non-zero value is one cell; fractional or negative
    values (probabilities, signed images) are refused, naming ``source``.
    """
    from scipy import ndimage as ndi

    reference = np.asarray(reference)
    if reference.dtype.kind == "b":
        return ndi.label(reference)[0], BINARY
    if reference.dtype.kind not in "uif":
        raise EvaluateError(f"{source}: a {reference.dtype} image is not a mask; give integer labels or a binary mask")
    if reference.dtype.kind == "f":
        if not np.all(np.isfinite(reference)):
            raise EvaluateError(f"{source}: holds NaN or infinite values; give integer labels or a binary mask")
        if np.any(reference != np.round(reference)):
            raise EvaluateError(f"{source}: holds fractional values (a probability map?); give integer labels or "
                                f"a binary mask (0 background, one value for cells)")
    if reference.dtype.kind in "if" and reference.size and reference.min() < 0:
        raise EvaluateError(f"{source}: holds negative values ({reference.min():g}); labels are 0 (background) "
                            f"and positive cell ids")
    values = np.unique(reference)
    values = values[values != 0]
    if len(values) <= 1:
        return ndi.label(reference != 0)[0], BINARY
    # Sequential ids (any integer ids, however large, count as given; ``np.bincount`` needs small ones)
    return np.searchsorted(np.concatenate([[0], values]), reference).astype(np.int64), LABELS


# ------------------------------------------------------------------------------------------ plates
def _field_key(well: str, field: str) -> str:
    return f"{well}/{field}"


def prediction_fields(path: Path, name: str, ref: str | None = None):
    """(key, image group, labels array, source key) for each field of an OME-Zarr plate with labels ``name``.

    Label images (``name``, and ``ref`` when given) that a killed ``segment`` left unfinished are refused,
    all named in one line: scoring them would report a recall of 0 for fields that were never segmented.
    """
    from hpc_retrain.io import ngff

    try:
        root, entries = ngff.open_hcs(path)
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    out = []
    unfinished: dict[str, list[str]] = {}
    missing = []
    for well, idx, gpath in entries:
        grp = root[gpath]
        labels = grp.get("labels")
        if labels is None or name not in labels:
            missing.append(gpath)
            continue
        for n in (name, ref):
            if n is not None and n in labels and not ngff.is_complete(labels[n]):
                unfinished.setdefault(n, []).append(_field_key(well, str(idx)))
        src = grp.attrs.get("hpc_retrain_source")
        # Fields copied from a TIFF plate keep their original names, so TIFF references can be paired.
        source_key = _field_key(src["well"], src["field"]) if src else _field_key(well, str(idx))
        out.append((_field_key(well, str(idx)), grp, labels[name]["0"], source_key))
    if unfinished:
        n, keys = next(iter(unfinished.items()))
        shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
        none = f" and {len(missing)} field(s) have none yet" if missing and n == name else ""
        raise EvaluateError(f"{path}: label image {n!r} is incomplete in {len(keys)} field(s) ({shown}){none}: a "
                            f"segment was stopped before finishing them; run the same segment command again "
                            f"to finish them, then evaluate")
    if missing:
        raise EvaluateError(f"{path}/{missing[0]}: no label image {name!r} (run hpc-retrain segment, or pick --name)")
    return out


def _writable_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot take the scores, before any scoring: a file, or a folder that cannot be
    written (read-only, permission denied, full)."""
    from hpc_retrain.segment.outputs import probe_writable

    if out.exists() and not out.is_dir():
        raise EvaluateError(f"{out}: is a file, not a folder; choose another --out for the scores and pictures")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvaluateError(f"{out}: cannot create it ({e.strerror or e}); choose another --out") from None
    err = probe_writable(out)
    if err is not None:
        raise EvaluateError(f"{out}: cannot write there ({err.strerror or err}); choose another --out, or fix its "
                            f"permissions or free space")


class _OutLock:
    """An exclusive flock on ``--out`` for the whole evaluate: two evaluates into one folder would mix their
    pictures. Where the file system has no flock, nothing is locked."""

    def __init__(self, out: Path | None):
        self.out, self.fd = out, None

    def __enter__(self):
        import fcntl
        import os

        if self.out is None:
            return self
        try:
            self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise EvaluateError(f"{self.out}: another evaluate is writing there now; wait for it, or choose another "
                                f"--out") from None
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        import os

        if self.fd is not None:
            os.close(self.fd)


def evaluate_plate(pred_path: str | Path, name: str, ref: str, ref_plate: str | Path | None = None,
                   out: str | Path | None = None, overlays: int = 3, image_channel: str | None = None,
                   thresholds=THRESHOLDS, plate_cfg=None, channel_given: bool = False) -> dict[str, Any]:
    """Score label image ``name`` of every field against ``ref``: a label image of the same plate, or
    (with ``ref_plate``) a channel of a TIFF/OME-Zarr plate such as ``masks``. Writes JSON (+ PNGs) to ``out``.

    ``channel_given``: ``image_channel`` was asked for (``--channel``), so a plate without it is refused rather
    than drawn on its first channel."""
    for n in (name, ref) if ref_plate is None else (name,):
        # read, not written: any name a label image can have, but one path element inside labels/
        if not n or "/" in n or "\\" in n or n.startswith("."):
            raise EvaluateError(f"{pred_path}: {n!r} is not a label image name (one name under labels/, such as "
                                f"misic); pass --name/--ref with the name")
    if out is not None:
        _writable_out(Path(out))
    with _OutLock(Path(out) if out is not None else None):
        return _evaluate_plate(pred_path, name, ref, ref_plate, out, overlays, image_channel, thresholds, plate_cfg,
                               channel_given)


def _evaluate_plate(pred_path, name, ref, ref_plate, out, overlays, image_channel, thresholds, plate_cfg,
                    channel_given) -> dict[str, Any]:
    from hpc_retrain.config import PlateConfig
    from hpc_retrain.io.plate import open_plate

    pred_path = Path(pred_path)
    fields = prediction_fields(pred_path, name, ref if ref_plate is None else None)
    if channel_given and out is not None and overlays > 0 and fields:
        from hpc_retrain.io import ngff

        have = ngff.channel_names(fields[0][1])
        if image_channel not in have:
            raise EvaluateError(f"{pred_path}/{fields[0][0]}: no channel {image_channel!r} to draw the overlays on "
                                f"(has {have}); pass --channel with one of them")
    refs: dict[str, Any] = {}
    if ref_plate is not None:
        cfg = plate_cfg or PlateConfig()
        rp = open_plate(cfg.model_copy(update={"path": Path(ref_plate)}))
        refs = {_field_key(f.well, f.field): f for f in rp.fields}
    per_field: dict[str, list[Score]] = {}
    readings: dict[str, list[str]] = {}
    pictures = None
    if out is not None and overlays > 0:
        from hpc_retrain.evaluate.overlays import Pictures  # matplotlib: only when drawing

        pictures = Pictures(out, name, len(fields), overlays, image_channel)
    for k, (key, grp, pred_arr, source_key) in enumerate(fields):
        pred = np.asarray(pred_arr[...])
        if ref_plate is None:
            labels = grp["labels"]
            if ref not in labels:
                raise EvaluateError(f"{pred_path}/{key}: no reference label image {ref!r} "
                                 f"(has {sorted(labels.attrs.get('ome', {}).get('labels', []))})")
            reference = np.asarray(labels[ref]["0"][...])
        else:
            f = refs.get(source_key) or refs.get(key)
            if f is None:
                raise EvaluateError(f"{ref_plate}: no field matching {source_key} of {pred_path}")
            reference = np.asarray(f.channel(ref))
        reference, reading = reference_instances(reference, f"{ref_plate or pred_path}: reference {ref!r} of {key}")
        readings.setdefault(reading, []).append(key)
        # Pictures: matched / false-positive / missed objects at IoU 0.5, by the same matching as the scores.
        per_field[key], outcome = match_objects(reference, pred, thresholds, 0.5 if pictures is not None else None)
        if pictures is not None:
            pictures.add(k, key, source_key, grp, pred, reference, outcome)
    for reading, keys in readings.items():
        log.info("reference %r: %d field(s) read as %s", ref, len(keys), reading)
    overall = summarize(per_field)
    result = {
        "prediction": str(pred_path), "name": name, "reference": ref,
        "reference_plate": str(ref_plate) if ref_plate else None,
        "thresholds": list(thresholds),
        "reference_reading": {reading: len(keys) for reading, keys in readings.items()},
        "overall": [s.as_dict() for s in overall],
        "fields": {k: [s.as_dict() for s in v] for k, v in per_field.items()},
        "overlays": pictures.written if pictures is not None else [],
        "contact_sheet": pictures.sheet(pred_path.name) if pictures is not None else None,
        "table": table(per_field, overall),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(out) / f"scores_{name}.json", result)
    return result

