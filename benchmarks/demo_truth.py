"""The demo judged against the truth: the fluorescence teacher beside the pretrained and retrained student.

    python -m benchmarks.demo_truth DEMO_DIR [DEMO_DIR ...]

For each finished ``hpc-retrain demo --out DEMO_DIR``: the teacher (pretrained MISIC on the test plate's
fluorescence, made as the training labels are: ``labels.teacher`` with the store's settings) scored against
the true masks at IoU 0.5, beside the student's figures from the demo's ``summary.json`` (its brightfield
or phase-contrast segmentations, pretrained and retrained, against the same masks). Writes
``DEMO_DIR/truth.json`` and prints one line per demo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import zarr


def teacher_vs_truth(demo: Path) -> dict:
    from hpc_retrain.evaluate import scoring as E
    from hpc_retrain.prepare import labels as L
    from hpc_retrain.prepare import store as S

    cfg = S.read_config(demo / "train.zarr")  # the settings the training labels were made with
    model = L.get_model(None)
    plate = zarr.open_group(str(demo / "test_plate.zarr"), mode="r")
    total, fields = None, {}
    for row in sorted(plate.group_keys()):
        for col in sorted(plate[row].group_keys()):
            for fld in sorted(k for k in plate[row][col].group_keys() if k.isdigit()):
                g = plate[row][col][fld]
                names = g.attrs["ome"]["omero"]["channels"] if "ome" in g.attrs else g.attrs["omero"]["channels"]
                channel = [c["label"] for c in names].index(cfg.plate.fluorescence)
                fluo = np.asarray(g["0"][channel])
                truth = np.asarray(g["labels/truth/0"])
                cells = L.teacher(fluo, model, cfg, f"{row}{col}/{fld}")
                s = E.match(truth, cells, (0.5,))
                fields[f"{row}{col}/{fld}"] = s[0].as_dict()
                total = s if total is None else [a + b for a, b in zip(total, s)]
    return {"teacher": total[0].as_dict(), "fields": fields}


def student(demo: Path) -> dict:
    summary = json.loads((demo / "summary.json").read_text())
    out = {name: next(r for r in rows if r["threshold"] == 0.5) for name, rows in summary["scores"].items()}
    out["recipe"] = summary.get("recipe", [])
    out["modality"] = summary.get("modality", "brightfield")
    out["timings_s"] = summary.get("timings_s", {})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demos", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for demo in args.demos:
        result = {"student": student(demo), **teacher_vs_truth(demo)}
        (demo / "truth.json").write_text(json.dumps(result, indent=1))
        st, te = result["student"], result["teacher"]
        print(f"{demo}: {st['modality']}, recipe {' '.join(st['recipe']) or 'defaults'}: F1@0.5 vs truth: "
              f"pretrained {st['pretrained']['f1']:.3f}, retrained {st['retrained']['f1']:.3f}, "
              f"teacher (fluorescence) {te['f1']:.3f}; total {sum(st['timings_s'].values()):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
