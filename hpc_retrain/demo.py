"""``hpc-retrain demo``: the whole workflow on a synthetic plate, locally, into one folder.

It runs the same commands a user runs (through ``cli.main``), so the demo cannot drift from the tool:
synthesize a training plate and a separate test plate, build the training store from the training plate
(labels from fluorescence with the pretrained MISIC, targets from brightfield), retrain, segment the test
plate's brightfield with the pretrained and with the retrained model, and score both against the true masks.
"""

from __future__ import annotations


def _f1(score: dict) -> float:
    return next(r["f1"] for r in score["overall"] if r["threshold"] == 0.5)


def _summary(scores: dict, timings: dict, total: float) -> str:
    lines = ["hpc-retrain demo: brightfield segmentation of held-out synthetic fields vs their true masks", ""]
    lines.append(f"{'model':<11} {'F1@0.5':>7} {'AP@0.5':>7} {'AP@0.75':>8} {'mean IoU':>9}")
    for name, s in scores.items():
        o = {row["threshold"]: row for row in s["overall"]}
        lines.append(f"{name:<11} {o[0.5]['f1']:>7.3f} {o[0.5]['ap']:>7.3f} {o[0.75]['ap']:>8.3f} "
                     f"{o[0.5]['mean_iou']:>9.3f}")
    pre, post = (_f1(scores[k]) for k in ("pretrained", "retrained"))
    verdict = "wins" if post > pre else "does NOT win"
    lines += ["", f"retraining {verdict}: F1 at IoU 0.5 {pre:.3f} -> {post:.3f} ({post - pre:+.3f})"]
    lines += ["", "time per step (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
              f"total {total:.0f} s"]
    return "\n".join(lines) + "\n"
