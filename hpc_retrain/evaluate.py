"""Score instance segmentations against reference masks, as cellpose and StarDist do.

Objects are matched one to one by intersection over union (IoU): the IoU of every overlapping pair comes
from one pass of sparse overlap counting, and pairs are taken greedily by decreasing IoU. For thresholds
above 0.5 greedy is optimal (a pair with IoU > 0.5 is the only one either object can have). At each
threshold: precision TP/(TP+FP), recall TP/(TP+FN), F1, average precision TP/(TP+FP+FN) and the mean IoU
of the matched pairs. Counts add up over fields for the overall figures.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


# ------------------------------------------------------------------------------------------ overlays
# Okabe-Ito colours, told apart with every common colour-vision deficiency.
COLOURS = {"matched": (0, 114, 178), "false positive": (230, 159, 0), "missed": (204, 121, 167)}
OVERLAY_SIDE = 1024  # per-field pictures are downsampled to at most this many pixels a side
TILE_SIDE = 192  # contact-sheet tiles (smaller for plates with many fields)


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    """Mean over s x s blocks (the edges padded by repetition)."""
    if s <= 1:
        return a
    h, w = a.shape
    H, W = -(-h // s) * s, -(-w // s) * s
    a = np.pad(a, ((0, H - h), (0, W - w)), mode="edge")
    return a.reshape(H // s, s, W // s, s).mean(axis=(1, 3))


def _grey(image: np.ndarray, s: int) -> np.ndarray:
    im = _block_mean(np.asarray(image, np.float32), s)
    lo, hi = np.percentile(im, (0.5, 99.5))
    grey = ((im - lo) / (hi - lo if hi > lo else 1)).clip(0, 1)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _outline(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` pixels of the edge of their object, inside it."""
    from skimage.segmentation import find_boundaries

    lab = np.array(labels, copy=True)
    edge = np.zeros(lab.shape, bool)
    for _ in range(width):
        ring = find_boundaries(lab, mode="inner") & (lab > 0)
        edge |= ring
        lab[ring] = 0
    return edge


def outline_rgb(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, outcome: Outcome | None = None,
                max_side: int | None = None, width: int = 2) -> np.ndarray:
    """RGB uint8: the image in grey, downsampled to ``max_side``; outlines ``width`` px wide inside each
    object: matched predictions in blue, false positives in orange and missed reference cells in magenta."""
    outcome = outcome or classify(ref, pred)
    s = max(1, -(-max(np.shape(image)) // max_side)) if max_side else 1
    rgb = _grey(image, s)
    pred_s, ref_s = np.asarray(pred)[::s, ::s], np.asarray(ref)[::s, ::s]
    pred_edge, ref_edge = _outline(pred_s, width), _outline(ref_s, width)
    for what, lab, edge, ids in (("matched", pred_s, pred_edge, outcome.matched),
                                 ("false positive", pred_s, pred_edge, outcome.false_pos),
                                 ("missed", ref_s, ref_edge, outcome.missed)):
        if len(ids):
            rgb[edge & np.isin(lab, ids)] = COLOURS[what]
    return rgb


def overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """The picture of one field before its title and legend (see ``outline_rgb``)."""
    return outline_rgb(image, pred, ref, max_side=max_side)


def tile_rgb(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, outcome: Outcome, side: int) -> np.ndarray:
    """A small picture of a field: blocks holding an object are tinted with its colour, so no cell vanishes
    when a field shrinks to a few pixels per cell."""
    s = max(1, -(-max(np.shape(image)) // side))
    rgb = _grey(image, s).astype(np.float32)
    for what, lab, ids in (("matched", pred, outcome.matched), ("false positive", pred, outcome.false_pos),
                           ("missed", ref, outcome.missed)):
        if len(ids):
            frac = _block_mean(np.isin(lab, ids).astype(np.float32), s)
            a = np.where(frac > 0, 0.5 + 0.5 * np.minimum(1, 2 * frac), 0)[..., None]
            rgb = rgb * (1 - a) + np.array(COLOURS[what], np.float32) * a
    return rgb.round().astype(np.uint8)


def _legend(fig, counts: dict[str, int], fontsize: float = 9):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=np.array(COLOURS[w]) / 255, lw=3) for w in COLOURS]
    return fig.legend(handles, [f"{w} ({counts[w]})" for w in COLOURS], loc="lower center", ncol=3,
                      frameon=False, fontsize=fontsize, handlelength=1.5, borderaxespad=0.3)


def overlay_figure(rgb: np.ndarray, outcome: Outcome, title: str):
    """A matplotlib Figure (Agg, no pyplot): ``rgb`` at one screen pixel per picture pixel, the title
    above, a legend with the counts below."""
    from matplotlib.figure import Figure

    h, w = rgb.shape[:2]
    zoom = max(1, 384 // max(h, w))  # tiny test fields are magnified
    h, w = h * zoom, w * zoom
    dpi, top, bottom = 100, 46, 30
    W, H = max(w, 560), h + top + bottom
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes(((W - w) / 2 / W, bottom / H, w / W, h / H))
    ax.imshow(rgb, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.text(0.5, 1 - 4 / H, title, ha="center", va="top", fontsize=10)
    _legend(fig, outcome.counts())
    return fig


def _title(key: str, name: str, score: Score) -> str:
    return (f"{key} - {name}\nF1@{score.threshold:g} {score.f1:.3f}   precision {score.precision:.3f}   "
            f"recall {score.recall:.3f}")


def contact_sheet(tiles: list[tuple[str, np.ndarray, float]], title: str, counts: dict[str, int]):
    """A Figure with every field as a tile in a grid, each titled with its field and F1."""
    from matplotlib.figure import Figure

    n = max(len(tiles), 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    side = max(max((max(t.shape[:2]) for _, t, _ in tiles), default=1), 1)
    fontsize = float(np.clip(side / 24, 5, 8))
    strip = int(fontsize * 100 / 72 * 1.5) + 2
    gap = 4
    cw, ch = side + gap, side + strip + gap
    sheet = np.full((rows * ch, cols * cw, 3), 255, np.uint8)
    places = []
    for i, (key, t, f1) in enumerate(tiles):
        y, x = (i // cols) * ch + strip, (i % cols) * cw + gap // 2
        th, tw = t.shape[:2]
        oy, ox = (side - th) // 2, (side - tw) // 2
        sheet[y + oy:y + oy + th, x + ox:x + ox + tw] = t
        places.append((x + side / 2, y - 1, f"{key}  F1 {f1:.2f}"))
    dpi, top, bottom = 100, 46, 30
    Hs, Ws = sheet.shape[:2]
    W, H = max(Ws, 560), Hs + top + bottom
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes(((W - Ws) / 2 / W, bottom / H, Ws / W, Hs / H))
    ax.imshow(sheet, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for x, y, text in places:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=fontsize, gid="tile", clip_on=False)
    fig.text(0.5, 1 - 4 / H, title, ha="center", va="top", fontsize=10)
    _legend(fig, counts)
    return fig


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


def evaluate_plate(pred_path: str | Path, name: str, ref: str, ref_plate: str | Path | None = None,
                   out: str | Path | None = None, overlays: int = 3, image_channel: str | None = None,
                   thresholds=THRESHOLDS, plate_cfg=None) -> dict[str, Any]:
    """Score label image ``name`` of every field against ``ref``: a label image of the same plate, or
    (with ``ref_plate``) a channel of a TIFF/OME-Zarr plate such as ``masks``. Writes JSON (+ PNGs) to ``out``."""
    from hpc_retrain import ngff
    from hpc_retrain.config import PlateConfig
    from hpc_retrain.plate import open_plate

    pred_path = Path(pred_path)
    fields = prediction_fields(pred_path, name, ref if ref_plate is None else None)
    refs: dict[str, Any] = {}
    if ref_plate is not None:
        cfg = plate_cfg or PlateConfig()
        rp = open_plate(cfg.model_copy(update={"path": Path(ref_plate)}))
        refs = {_field_key(f.well, f.field): f for f in rp.fields}
    per_field: dict[str, list[Score]] = {}
    written = []
    pictures = out is not None and overlays > 0
    tiles: list[tuple[str, np.ndarray, float]] = []
    tile_side = max(64, min(TILE_SIDE, 4096 // int(np.ceil(np.sqrt(max(len(fields), 1))))))
    totals = dict.fromkeys(COLOURS, 0)
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
        per_field[key], outcome = _match(reference, pred, thresholds, 0.5 if pictures else None)
        if not pictures:
            continue
        # Pictures: matched / false-positive / missed objects at IoU 0.5, by the same matching as the scores.
        score = Score(0.5, len(outcome.matched), len(outcome.false_pos), len(outcome.missed), 0.0)
        for w, c in outcome.counts().items():
            totals[w] += c
        names = ngff.channel_names(grp)
        ch = image_channel if image_channel in names else names[0]
        image = np.asarray(grp["0"][names.index(ch)])
        tiles.append((key, tile_rgb(image, pred, reference, outcome, tile_side), score.f1))
        if k < overlays:
            png = Path(out) / f"overlay_{name}_{key.replace('/', '_')}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            label = key if source_key == key else f"{key} ({source_key})"
            rgb = outline_rgb(image, pred, reference, outcome, OVERLAY_SIDE)
            overlay_figure(rgb, outcome, _title(label, name, score)).savefig(png)
            written.append(str(png))
    sheet = None
    if pictures:
        total = Score(0.5, totals["matched"], totals["false positive"], totals["missed"], 0.0)
        sheet = Path(out) / f"contact_{name}.png"
        contact_sheet(tiles, _title(f"{pred_path.name}: {len(tiles)} fields", name, total), totals).savefig(sheet)
        sheet = str(sheet)
    overall = summarize(per_field)
    result = {
        "prediction": str(pred_path), "name": name, "reference": ref,
        "reference_plate": str(ref_plate) if ref_plate else None,
        "thresholds": list(thresholds),
        "overall": [s.as_dict() for s in overall],
        "fields": {k: [s.as_dict() for s in v] for k, v in per_field.items()},
        "overlays": written,
        "contact_sheet": sheet,
        "table": table(per_field, overall),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"scores_{name}.json").write_text(json.dumps(result, indent=1))
    return result


def add_arguments(p: argparse.ArgumentParser, name: str = "evaluate") -> None:
    p.add_argument("--pred", required=True, metavar="PLATE", help="OME-Zarr plate holding the segmentation")
    p.add_argument("--name", help="label image to score (default: infer.name)")
    p.add_argument("--ref", required=True, metavar="NAME",
                   help="reference masks: a label image of the same plate (e.g. truth), or with --ref-plate "
                        "a channel of that plate (e.g. masks, binary)")
    p.add_argument("--ref-plate", metavar="PATH", help="TIFF folder or OME-Zarr plate holding the reference")
    p.add_argument("--out", metavar="DIR", help="where scores_<name>.json, overlay PNGs and contact_<name>.png go")
    p.add_argument("--overlays", type=int, default=3, help="overlay PNGs for this many fields (default 3), plus a contact sheet of all fields; "
                        "0 draws no pictures")
    p.add_argument("--channel", default=None, help="image channel under the overlays (default: brightfield)")


def main(args: argparse.Namespace) -> int:
    from hpc_retrain.cli import config_from_args

    cfg = config_from_args(args, infer__name=args.name)
    result = evaluate_plate(args.pred, cfg.infer.name, args.ref, args.ref_plate, args.out, args.overlays,
                            args.channel or cfg.plate.brightfield, plate_cfg=cfg.plate)
    print(result["table"])
    if args.out:
        print(f"scores: {Path(args.out) / f'scores_{cfg.infer.name}.json'}")
    return 0
