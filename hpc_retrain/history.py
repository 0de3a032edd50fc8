"""What a training run reports: its history (JSON and CSV), training curves, status file and epoch score."""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path

import numpy as np

from hpc_retrain import atomic

STATUS_FILE = "status.json"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_iou", "val_dice",
                   "val_f1", "val_precision", "val_recall", "time_s", "tiles_per_s")



def write_history(run_dir: Path, history: list[dict]) -> None:
    atomic.write_json(run_dir / "history.json", history)
    with atomic.replacing(run_dir / "history.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def read_history(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "history.json"
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
    """Higher is better: validation instance F1@0.5, ties broken by body IoU (a few validation cells give
    a coarse F1, and a plateau of equal F1s would otherwise stop training early); -loss without validation."""
    if row.get("val_f1") is None:
        return -row["loss"]
    return row["val_f1"] + 0.01 * row["val_iou"]
