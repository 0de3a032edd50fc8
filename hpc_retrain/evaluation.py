"""Score instance segmentations against reference masks, as cellpose and StarDist do.

Objects are matched one to one by intersection over union (IoU): the IoU of every overlapping pair comes
from one pass of sparse overlap counting, and pairs are taken greedily by decreasing IoU. For thresholds
above 0.5 greedy is optimal (a pair with IoU > 0.5 is the only one either object can have). At each
threshold: precision TP/(TP+FP), recall TP/(TP+FN), F1, average precision TP/(TP+FP+FN) and the mean IoU
of the matched pairs. Counts add up over fields for the overall figures. Pictures of the matching (overlays,
a contact sheet): ``overlays``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain import atomic

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.75, 0.9)


class EvaluateError(ValueError):
    """Predictions or references that cannot be scored; the message names the plate and field."""


@dataclass
class Score:
    threshold: float
    tp: int
    fp: int
    fn: int
    iou_sum: float  # over matched pairs; kept so scores of fields add up exactly

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    @property
    def ap(self) -> float:
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else 1.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.tp if self.tp else 0.0

    def __add__(self, other: "Score") -> "Score":
        return Score(self.threshold, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                     self.iou_sum + other.iou_sum)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("iou_sum")
        d.update(precision=self.precision, recall=self.recall, f1=self.f1, ap=self.ap, mean_iou=self.mean_iou)
        return d


def iou_pairs(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(ref ids, pred ids, IoU) of every overlapping pair, and the object counts of each image."""
    ref = np.asarray(ref)
    pred = np.asarray(pred)
    if ref.shape != pred.shape:
        raise EvaluateError(f"reference {ref.shape} and prediction {pred.shape} differ in shape")
    ref, pred = ref.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    ref_area = np.bincount(ref)
    pred_area = np.bincount(pred)
    n_ref = int(np.count_nonzero(ref_area[1:]))
    n_pred = int(np.count_nonzero(pred_area[1:]))
    both = (ref > 0) & (pred > 0)
    key = ref[both] * (int(pred.max()) + 1) + pred[both]
    keys, inter = np.unique(key, return_counts=True)
    r, p = np.divmod(keys, int(pred.max()) + 1)
    iou = inter / (ref_area[r] + pred_area[p] - inter)
    return r, p, iou, n_ref, n_pred


def _greedy(r: np.ndarray, p: np.ndarray, iou: np.ndarray, t: float) -> list[tuple[int, int, float]]:
    """One-to-one (ref id, pred id, IoU) pairs with IoU >= t; the pairs come sorted by decreasing IoU."""
    sel = iou >= t
    used_r: set[int] = set()
    used_p: set[int] = set()
    pairs = []
    for a, b, v in zip(r[sel], p[sel], iou[sel]):
        if a in used_r or b in used_p:
            continue
        used_r.add(a)
        used_p.add(b)
        pairs.append((int(a), int(b), float(v)))
    return pairs


@dataclass
class Outcome:
    """Which objects of one field matched at ``threshold``: the ids behind a Score's TP, FP and FN."""
    threshold: float
    matched: np.ndarray  # predicted ids with a reference partner (TP)
    matched_ref: np.ndarray  # their reference partners
    false_pos: np.ndarray  # predicted ids without a partner (FP)
    missed: np.ndarray  # reference ids without a partner (FN)

    def counts(self) -> dict[str, int]:
        return {"matched": len(self.matched), "false positive": len(self.false_pos), "missed": len(self.missed)}


def _match(ref: np.ndarray, pred: np.ndarray, thresholds=THRESHOLDS,
           classify_at: float | None = None) -> tuple[list[Score], Outcome | None]:
    r, p, iou, n_ref, n_pred = iou_pairs(ref, pred)
    order = np.argsort(-iou, kind="stable")
    r, p, iou = r[order], p[order], iou[order]
    scores = []
    for t in thresholds:
        pairs = _greedy(r, p, iou, t)
        scores.append(Score(float(t), len(pairs), n_pred - len(pairs), n_ref - len(pairs),
                            sum(v for _, _, v in pairs)))
    outcome = None
    if classify_at is not None:
        pairs = _greedy(r, p, iou, classify_at)
        ref_ids = np.flatnonzero(np.bincount(np.asarray(ref).ravel().astype(np.int64)))
        pred_ids = np.flatnonzero(np.bincount(np.asarray(pred).ravel().astype(np.int64)))
        ref_ids, pred_ids = ref_ids[ref_ids > 0], pred_ids[pred_ids > 0]
        mr = np.array([a for a, _, _ in pairs], np.int64)
        mp = np.array([b for _, b, _ in pairs], np.int64)
        outcome = Outcome(float(classify_at), mp, mr, np.setdiff1d(pred_ids, mp), np.setdiff1d(ref_ids, mr))
    return scores, outcome


def match(ref: np.ndarray, pred: np.ndarray, thresholds=THRESHOLDS) -> list[Score]:
    return _match(ref, pred, thresholds)[0]


def classify(ref: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Outcome:
    """Matched, false-positive and missed objects, by the same one-to-one matching as ``match``."""
    return _match(ref, pred, (), threshold)[1]


def summarize(per_field: dict[str, list[Score]]) -> list[Score]:
    total = None
    for scores in per_field.values():
        total = list(scores) if total is None else [a + b for a, b in zip(total, scores)]
    return total or [Score(t, 0, 0, 0, 0.0) for t in THRESHOLDS]


def table(per_field: dict[str, list[Score]], overall: list[Score]) -> str:
    head = f"{'field':<14}{'IoU':>6}{'TP':>7}{'FP':>7}{'FN':>7}{'prec':>8}{'recall':>8}{'F1':>8}{'AP':>8}{'mIoU':>8}"
    lines = [head, "-" * len(head)]
    for key, scores in [*per_field.items(), ("overall", overall)]:
        for s in scores:
            lines.append(f"{key:<14}{s.threshold:>6.2f}{s.tp:>7}{s.fp:>7}{s.fn:>7}{s.precision:>8.3f}"
                         f"{s.recall:>8.3f}{s.f1:>8.3f}{s.ap:>8.3f}{s.mean_iou:>8.3f}")
    return "\n".join(lines)


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
    from hpc_retrain import ngff

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
    from hpc_retrain.outputs import probe_writable

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
    from hpc_retrain.plate import open_plate

    pred_path = Path(pred_path)
    fields = prediction_fields(pred_path, name, ref if ref_plate is None else None)
    if channel_given and out is not None and overlays > 0 and fields:
        from hpc_retrain import ngff

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
        from hpc_retrain.overlays import Pictures  # matplotlib: only when drawing

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
        per_field[key], outcome = _match(reference, pred, thresholds, 0.5 if pictures is not None else None)
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

