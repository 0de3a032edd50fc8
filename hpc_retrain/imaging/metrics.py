"""Instance metrics: objects matched one to one by intersection over union (IoU), as cellpose and StarDist do.

The IoU of every overlapping pair comes from one pass of sparse overlap counting, and pairs are taken greedily by
decreasing IoU. For thresholds above 0.5 greedy is optimal (a pair with IoU > 0.5 is the only one either object
can have). At each threshold: precision TP/(TP+FP), recall TP/(TP+FN), F1, average precision TP/(TP+FP+FN) and
the mean IoU of the matched pairs. Counts add up over fields for the overall figures.

Here, below every stage, because two stages score instances: ``evaluate`` against reference masks and
``training.validation`` against the teacher's labels on held-out fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hpc_retrain.errors import HpcRetrainError


class MetricsError(HpcRetrainError, ValueError):
    """Two label images that cannot be compared (different shapes)."""


THRESHOLDS = (0.5, 0.75, 0.9)


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

    def __add__(self, other: Score) -> Score:
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
        raise MetricsError(f"reference {ref.shape} and prediction {pred.shape} differ in shape")
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


def match_objects(ref: np.ndarray, pred: np.ndarray, thresholds=THRESHOLDS,
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
    return match_objects(ref, pred, thresholds)[0]


def classify(ref: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Outcome:
    """Matched, false-positive and missed objects, by the same one-to-one matching as ``match``."""
    return match_objects(ref, pred, (), threshold)[1]


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
