"""What a training run reports: its history (JSON and CSV), training curves, status file and epoch score."""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import numpy as np

from hpc_retrain.io import atomic
from hpc_retrain.io.runfolder import HISTORY_CSV, HISTORY_JSON, STATUS_FILE

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_iou", "val_dice",
                   "val_f1", "val_precision", "val_recall", "time_s", "tiles_per_s")



def write_history(run_dir: Path, history: list[dict]) -> None:
    atomic.write_json(run_dir / HISTORY_JSON, history)
    with atomic.replacing(run_dir / HISTORY_CSV, newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def read_history(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / HISTORY_JSON
    return json.loads(p.read_text()) if p.is_file() else []


def plot_curves(run_dir: Path, history: list[dict]) -> Path:
    """Loss and validation loss per epoch (as the original workflow plotted), and validation IoU/Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]

    def col(k):
        return [np.nan if h.get(k) is None else h[k] for h in history]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, col("loss"), "o-", label="loss")
    if any(h.get("val_loss") is not None for h in history):
        a.plot(ep, col("val_loss"), "o-", label="val loss")
    a.set_xlabel("epoch"), a.set_ylabel("weighted BCE"), a.set_title("Model loss"), a.legend()
    b.plot(ep, col("val_f1"), "o-", label="val instance F1@0.5")
    b.plot(ep, col("val_iou"), "o-", label="val IoU (body)")
    b.set_xlabel("epoch (0: the starting model)"), b.set_ylim(0, 1), b.set_title("Validation"), b.legend()
    fig.tight_layout()
    out = run_dir / "training_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_status(run_dir: Path, state: str, **extra) -> None:
    doc = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    doc.update(extra)
    atomic.write_json(run_dir / STATUS_FILE, doc)


def selection_score(row: dict) -> float:
    """Higher is better: validation instance F1@0.5 plus a hundredth of the body IoU; -loss without validation.
    For the record (``best_score``); which epoch is exported is ``replaces_best``'s call."""
    if row.get("val_f1") is None:
        return -row["loss"]
    return row["val_f1"] + 0.01 * row["val_iou"]


def replaces_best(row: dict, best: dict | None, history: list[dict], cells: int) -> bool:
    """Does epoch ``row`` (the last of ``history``) become the epoch to export instead of ``best``?

    Validation F1 on a lab's few fields moves in steps of about one cell (1 / ``cells``), while fine-tuning
    keeps bringing the masks closer to the labels (body IoU rises): on ColiCoords the epoch with the top
    F1 came 6 epochs before later ones that scored 0.03-0.08 lower on 14 validation cells and 0.08-0.16
    higher on the held-out fields. So F1s within one cell of the best so far count as equal, and among
    those the higher body IoU wins; an F1 more than one cell above the chosen epoch's always wins. Without
    validation fields: the lower training loss.
    """
    if best is None:
        return True
    if row.get("val_f1") is None or best.get("val_f1") is None:
        return selection_score(row) > selection_score(best)
    tol = 1.0 / max(int(cells), 1)
    top = max(h["val_f1"] for h in history if h.get("val_f1") is not None)
    if best["val_f1"] < top - tol:  # this epoch raised the top F1 by more than a cell over the chosen one
        return True
    return row["val_f1"] >= top - tol and row["val_iou"] > best["val_iou"]
