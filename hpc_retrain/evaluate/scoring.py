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


def evaluate_plate(pred_path: str | Path, name: str, ref: str, ref_plate: str | Path | None = None,
                   out: str | Path | None = None, overlays: int = 3, image_channel: str | None = None,
                   thresholds=THRESHOLDS, plate_cfg=None) -> dict[str, Any]:
    """Score label image ``name`` of every field against ``ref``: a label image of the same plate, or
    (with ``ref_plate``) a channel of a TIFF/OME-Zarr plate such as ``masks``. Writes JSON (+ PNGs) to ``out``."""
    from hpc_retrain.config import PlateConfig
    from hpc_retrain.io.plate import open_plate

    pred_path = Path(pred_path)
    fields = prediction_fields(pred_path, name, ref if ref_plate is None else None)
    refs: dict[str, Any] = {}
    if ref_plate is not None:
        cfg = plate_cfg or PlateConfig()
        rp = open_plate(cfg.model_copy(update={"path": Path(ref_plate)}))
        refs = {_field_key(f.well, f.field): f for f in rp.fields}
    per_field: dict[str, list[Score]] = {}
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
        if reference.dtype.kind == "b" or (reference.max() == 1 and reference.dtype.kind in "ui"):
            # A binary mask: its connected components are the reference cells.
            from scipy import ndimage as ndi
            reference = ndi.label(reference > 0)[0]
        # Pictures: matched / false-positive / missed objects at IoU 0.5, by the same matching as the scores.
        per_field[key], outcome = match_objects(reference, pred, thresholds, 0.5 if pictures is not None else None)
        if pictures is not None:
            pictures.add(k, key, source_key, grp, pred, reference, outcome)
    overall = summarize(per_field)
    result = {
        "prediction": str(pred_path), "name": name, "reference": ref,
        "reference_plate": str(ref_plate) if ref_plate else None,
        "thresholds": list(thresholds),
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

