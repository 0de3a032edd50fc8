"""Pictures of a scored segmentation: per-field overlays (matched, false-positive and missed objects
outlined in colour-blind-safe colours, a legend with the counts) and a contact sheet of every field.

Drawn with matplotlib's Agg canvas, no pyplot; the objects are those of ``evaluate``'s matching at IoU 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_retrain.imaging.metrics import Outcome, Score, classify

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


def _figure(picture: np.ndarray, shown: tuple[int, int], title: str, counts: dict[str, int]):
    """A matplotlib Figure (Agg, no pyplot) showing ``picture`` on ``shown`` (h, w) screen pixels, the title
    above, a legend with the counts below; and the picture's axes."""
    from matplotlib.figure import Figure

    (h, w), dpi, top, bottom = shown, 100, 46, 30
    W, H = max(w, 560), h + top + bottom
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes(((W - w) / 2 / W, bottom / H, w / W, h / H))
    ax.imshow(picture, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.text(0.5, 1 - 4 / H, title, ha="center", va="top", fontsize=10)
    _legend(fig, counts)
    return fig, ax


def overlay_figure(rgb: np.ndarray, outcome: Outcome, title: str):
    """``rgb`` at one screen pixel per picture pixel (tiny test fields magnified), titled, with a legend."""
    h, w = rgb.shape[:2]
    zoom = max(1, 384 // max(h, w))
    return _figure(rgb, (h * zoom, w * zoom), title, outcome.counts())[0]


def title(key: str, name: str, score: Score) -> str:
    return (f"{key} - {name}\nF1@{score.threshold:g} {score.f1:.3f}   precision {score.precision:.3f}   "
            f"recall {score.recall:.3f}")


def contact_sheet(tiles: list[tuple[str, np.ndarray, float]], title: str, counts: dict[str, int]):
    """A Figure with every field as a tile in a grid, each titled with its field and F1."""
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
    fig, ax = _figure(sheet, sheet.shape[:2], title, counts)
    for x, y, text in places:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=fontsize, gid="tile", clip_on=False)
    return fig


class Pictures:
    """The overlay PNGs of the first ``overlays`` fields of a plate being scored, and its contact sheet."""

    def __init__(self, out: str | Path, name: str, n_fields: int, overlays: int, image_channel: str | None):
        self.out, self.name, self.overlays, self.channel = Path(out), name, overlays, image_channel
        self.tile_side = max(64, min(TILE_SIDE, 4096 // int(np.ceil(np.sqrt(max(n_fields, 1))))))
        self.totals = dict.fromkeys(COLOURS, 0)
        self.tiles: list[tuple[str, np.ndarray, float]] = []
        self.written: list[str] = []

    def add(self, k: int, key: str, source_key: str, grp, pred: np.ndarray, reference: np.ndarray,
            outcome: Outcome) -> None:
        """Field number ``k`` (``key``; ``source_key`` in its source plate), its image from group ``grp``."""
        from hpc_retrain.io import ngff

        score = Score(0.5, len(outcome.matched), len(outcome.false_pos), len(outcome.missed), 0.0)
        for w, c in outcome.counts().items():
            self.totals[w] += c
        names = ngff.channel_names(grp)
        ch = self.channel if self.channel in names else names[0]
        image = np.asarray(grp["0"][names.index(ch)])
        self.tiles.append((key, tile_rgb(image, pred, reference, outcome, self.tile_side), score.f1))
        if k < self.overlays:
            png = self.out / f"overlay_{self.name}_{key.replace('/', '_')}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            label = key if source_key == key else f"{key} ({source_key})"
            rgb = outline_rgb(image, pred, reference, outcome, OVERLAY_SIDE)
            _save(overlay_figure(rgb, outcome, title(label, self.name, score)), png)
            self.written.append(str(png))

    def sheet(self, plate_name: str) -> str:
        """Write the contact sheet of every field added; its path."""
        t = self.totals
        total = Score(0.5, t["matched"], t["false positive"], t["missed"], 0.0)
        path = self.out / f"contact_{self.name}.png"
        _save(contact_sheet(self.tiles, title(f"{plate_name}: {len(self.tiles)} fields", self.name, total), t), path)
        return str(path)


def _save(fig, path: Path) -> None:
    """A PNG written under a temporary name and renamed into place: a failed or killed evaluate leaves no
    half-written picture."""
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
