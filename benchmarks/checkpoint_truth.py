"""How far a demo's training had to go: each checkpoint judged against the truth as `train` would export it.

    python -m benchmarks.checkpoint_truth DEMO_DIR [EPOCH ...]

For each kept checkpoint of a finished ``hpc-retrain demo --out DEMO_DIR`` (``run/checkpoints/ckpt-eNNNNN``;
all of them when no EPOCH is given): its post-processing calibrated on the run's validation fields against the
teacher (``FieldValidator.calibrate``, the call ``train`` makes for the model it exports), then the held-out
test plate segmented with it (``segment --model CHECKPOINT``, as label image ``ckpt-eNNNNN``) and scored against
the true masks (``evaluate --ref truth``). Writes ``DEMO_DIR/checkpoint_truth.json`` and prints a row per
checkpoint (benchmarks/RESULTS.md, 6c).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def validation(demo: Path):
    """The run's validation fields (a ``FieldValidator`` with the teacher's cells) and their target tiles,
    in the demo's config (MISIC's thresholds, as training starts): the same for every checkpoint."""
    from hpc_retrain.config import RunConfig
    from hpc_retrain.prepare import store as S
    from hpc_retrain.training.data import field_tiles
    from hpc_retrain.training.validation import FieldValidator

    cfg = RunConfig.load(demo / "config.yaml")
    root = S.open_store(demo / "train.zarr")
    fields = np.array(json.loads((demo / "run" / "metrics.json").read_text())["val_fields"])
    return cfg, FieldValidator(root, fields, cfg), np.asarray(root["targets"][field_tiles(root, fields)], np.float32)


def calibrated(cfg, validator, tiles: np.ndarray, checkpoint: Path) -> dict:
    """The checkpoint's validation F1 at MISIC's thresholds and the thresholds ``calibrate`` chooses."""
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference.predictor import predictor_for

    probs = validator.stitch(predictor_for(M.load(checkpoint), cfg.compute.batch_size, cfg.tiling.size)(tiles))
    th = validator.calibrate(probs)
    return {"val_f1_misic": validator.score(probs).f1, "val_f1_calibrated": th.f1, "body": th.body,
            "marker": th.marker, "contour": th.contour}


def truth_f1(demo: Path, checkpoint: Path, th: dict) -> dict:
    """F1@0.5 (and its precision, recall) of the checkpoint on the test plate, with thresholds ``th``."""
    from hpc_retrain.commands import main

    common = ["--config", str(demo / "config.yaml")]
    name = checkpoint.name
    rc = main(["segment", *common, "--plate", str(demo / "test_plate.zarr"), "--name", name, "--model",
               str(checkpoint), "--overwrite", "--set", f"infer.body_threshold={th['body']}",
               "--set", f"infer.marker_threshold={th['marker']}", "--set", f"infer.contour_threshold={th['contour']}"])
    out = demo / "evaluation"
    rc = rc or main(["evaluate", *common, "--pred", str(demo / "test_plate.zarr"), "--name", name, "--ref", "truth",
                     "--out", str(out)])
    if rc:
        raise SystemExit(f"{checkpoint}: segment or evaluate failed (exit {rc})")
    row = next(r for r in json.loads((out / f"scores_{name}.json").read_text())["overall"] if r["threshold"] == 0.5)
    return {k: row[k] for k in ("f1", "precision", "recall")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path)
    ap.add_argument("epochs", type=int, nargs="*")
    args = ap.parse_args(argv)
    ckpts = sorted((args.demo / "run" / "checkpoints").glob("ckpt-e?????"))
    if args.epochs:
        ckpts = [c for c in ckpts if int(c.name[6:]) in args.epochs]
    rows = {}
    val = validation(args.demo) if ckpts else None
    for c in ckpts:
        th = calibrated(*val, c)
        rows[c.name] = {**th, **truth_f1(args.demo, c, th)}
        r = rows[c.name]
        print(f"{c.name}: validation F1 {r['val_f1_misic']:.3f} / calibrated {r['val_f1_calibrated']:.3f} "
              f"(body {r['body']}, markers {r['marker']}, contour < {r['contour']}); test F1@0.5 vs truth "
              f"{r['f1']:.3f} (P {r['precision']:.3f}, R {r['recall']:.3f})", flush=True)
    (args.demo / "checkpoint_truth.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
