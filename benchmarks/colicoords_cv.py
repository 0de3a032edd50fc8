"""Real-data yardstick: k-fold cross-validation of retraining on the ColiCoords E. coli fields (ds1 + ds2).

    python -m benchmarks.colicoords_cv [--folds 3] [--out benchmarks/out/colicoords_cv] [--set train.epochs=20 ...]

The 12 fields of ../shared/data/colicoords (MIT, not part of this repository) are gathered into one TIFF
plate in the output folder (brightfield, fluorescence, and the partial ilastik masks as the reference
channel ``binary``), then ``hpc_retrain.evaluate.crossval`` trains on some fields and scores the others: brightfield
instances of pretrained and retrained MISIC against the fluorescence teacher's cells, and recall of the
ilastik cells. Everything else is the tool's defaults unless ``--set`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "colicoords"


def gather(out: Path) -> Path:
    """ds1 fields 1-10 and ds2 fields 1-2 as fields 1-12 of one channel-folder plate."""
    import tifffile

    k = 0
    for ds in ("ds1", "ds2"):
        for bf in sorted((DATA / ds / "brightfield").glob("*.tif")):
            k += 1
            n = bf.stem
            srcs = {"brightfield": bf, "fluorescence": DATA / ds / "fluorescence" / f"{n}.tif",
                    "binary": DATA / ds / "binary" / f"{n}_Probabilities_filtered.tif"}
            for ch, src in srcs.items():
                (out / ch).mkdir(parents=True, exist_ok=True)
                dst = out / ch / f"{k:05d}.tif"
                if not dst.exists():
                    tifffile.imwrite(dst, tifffile.imread(src))
    return out


def main(argv: list[str] | None = None) -> int:
    from hpc_retrain.config import RunConfig
    from hpc_retrain.evaluate import crossval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "colicoords_cv")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA}: not here; this benchmark needs the ColiCoords fields", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    plate = gather(a.out / "plate")
    cfg = RunConfig.load(None, [f"plate.path={plate}", "plate.reference=binary", *a.overrides])
    res = crossval.run(cfg, a.out, a.folds)
    print(crossval.table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
