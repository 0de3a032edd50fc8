"""Benchmark of ``hpc-retrain labels/targets/prepare``: peak memory on large scans, throughput over fields.

    python -m benchmarks.prepare_bench --quick      # a few minutes on 2 cores
    python -m benchmarks.prepare_bench              # larger plates, labels on every scan size

1. Peak RSS of one ``hpc-retrain`` process on single-field scans of 4096, 8192 and 16384 px (OME-Zarr,
   1024 px chunks), processed chunk by chunk: it should stay flat as the scan grows. The 4096 px scan is
   also run through the whole-image path for comparison.
2. Fields per second on a synthetic TIFF plate: a plain per-image loop (read, label, cut targets, write
   the same store arrays; no Dask) vs ``prepare --workers 1`` vs ``--workers 2``, all measured here, side
   by side: wall time including start-up, and steady state from the store's per-field finish times.
3. The labels pass's ``fraction_of_model``: the wall time inside the model's calls over the pass's wall time
   (``labels --workers 1`` in one process, the model loaded and warmed first; JSON ``labels_fraction_of_model``).

Every measured run is a fresh child process; its own high-water mark (VmHWM) is its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The synthetic plate's cell width: given, not measured (mean_width auto would time the measurement too, and
# the loop baseline has no measuring step)
SYNTH_WIDTH = 7.0


# ------------------------------------------------------------------------------------ child modes
def _child_cli(argv: list[str]) -> None:
    from hpc_retrain import commands

    t0 = time.time()
    rc = commands.main(argv)
    _report(rc=rc, seconds=time.time() - t0)


def _child_loop(plate: str, out: str) -> None:
    """The baseline: one image after another with the same functions, no Dask, no resume, no QC table."""
    import tifffile

    t0 = time.time()
    from hpc_retrain.config import RunConfig
    from hpc_retrain.io.plate import open_plate
    from hpc_retrain.prepare import labels as L
    from hpc_retrain.prepare import layout
    from hpc_retrain.prepare import store as st
    from hpc_retrain.prepare import targets as TG

    cfg = RunConfig().updated(plate__path=plate, preprocess__mean_width=SYNTH_WIDTH)
    fields = open_plate(cfg.plate).fields
    entries = layout.plan_fields(fields, cfg.preprocess.scale, cfg.tiling.size, cfg.tiling.margin)
    root = st.create(out, entries, cfg.to_dict(), cfg.tiling.size)
    model = L.get_model()
    finished = []
    for e in entries:
        fl = tifffile.imread(Path(plate) / f"{e.well}_s{e.field}_fluorescence.tif")
        bf = tifffile.imread(Path(plate) / f"{e.well}_s{e.field}_brightfield.tif")
        p, lab, _, _ = L.label_tiles(fl, model, cfg)
        t, _ = TG.target_tiles(bf, cfg)
        root["probabilities"][e.tiles] = p
        root["labels"][e.tiles] = lab
        root["targets"][e.tiles] = t
        finished.append(time.time())
    _report(rc=0, seconds=time.time() - t0, finished=finished)


class ModelClock:
    """Wall seconds spent inside the model's calls (``Predictor.__call__``, every engine), while installed."""

    def __init__(self):
        self.seconds, self.calls, self.tiles = 0.0, 0, 0
        self._orig = None

    def __enter__(self):
        from hpc_retrain.inference import predictor as infer

        self._orig = orig = infer.Predictor.__call__

        def timed(pred, tiles):
            t = time.perf_counter()
            try:
                return orig(pred, tiles)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
                self.tiles += len(tiles)

        infer.Predictor.__call__ = timed
        return self

    def __exit__(self, *exc):
        from hpc_retrain.inference import predictor as infer

        infer.Predictor.__call__ = self._orig


def _child_labels(argv: list[str]) -> None:
    """``hpc-retrain labels ARGV`` in this process (synchronous Dask: ``--workers 1``), the model loaded and
    its engine chosen and warmed first; reports the pass's wall time and the time inside the model's calls."""
    import logging

    from hpc_retrain import commands
    from hpc_retrain.config import RunConfig
    from hpc_retrain.prepare import labels as L

    logging.getLogger("hpc_retrain").setLevel(logging.WARNING)
    model = L.get_model()
    L.predict_tiles(model, np.zeros((1, 256, 256, 3), np.float32), RunConfig().compute.batch_size)
    with ModelClock() as clock:
        t0 = time.perf_counter()
        rc = commands.main(argv)
        wall = time.perf_counter() - t0
    _report(rc=rc, seconds=wall, model_seconds=clock.seconds, model_calls=clock.calls, model_tiles=clock.tiles)


def _peak_rss_mb() -> float:
    # VmHWM belongs to this program's own address space; ru_maxrss would also carry the high-water mark
    # of the benchmark process this child was forked from (Linux keeps it across exec).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report(**kw) -> None:
    kw["peak_rss_mb"] = _peak_rss_mb()
    print("BENCH " + json.dumps(kw), flush=True)


def _run_child(args: list[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-m", "benchmarks.prepare_bench", *args], cwd=cwd, env=env,
                         capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")]
    if res.returncode or not lines:
        raise RuntimeError(f"benchmark child {args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    out = json.loads(lines[-1][6:])
    if out.get("rc"):
        raise RuntimeError(f"hpc-retrain {args} exited {out['rc']}:\n{res.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------------ inputs
def _scan(path: Path, size: int, mean_width: float) -> Path:
    """A one-field OME-Zarr plate of size x size px, tiled (with mirror flips) from one rendered field."""
    from hpc_retrain.io import ngff
    from hpc_retrain.synth import plates as synth

    base = synth.render_field(7, (1024, 1024), mean_width=mean_width)
    reps = size // 1024

    def big(a: np.ndarray) -> np.ndarray:
        row = np.concatenate([a if j % 2 == 0 else a[:, ::-1] for j in range(reps)], axis=1)
        return np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)

    plate = ngff.create_plate(path, ["A1"], 1, name=f"scan{size}")
    ngff.write_field(plate, "A1", 0, np.stack([big(base.brightfield), big(base.fluorescence)]),
                     ["brightfield", "fluorescence"], chunk=1024)
    return path


def _store_rate(store: Path) -> float:
    """Steady-state fields/s from when each field finished (start-up excluded)."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    t = np.sort(np.maximum(g["labels_written"][:], g["targets_written"][:]))
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")


# ------------------------------------------------------------------------------------ benchmarks
def memory(work: Path, quick: bool, sizes: list[int] | None = None, stage: str = "targets",
           mean_width: float | None = None, smoke: bool = False) -> list[dict]:
    # quick: ColiCoords-like cells, half the pixels after scaling; wider cells (fewer tiles) reach the largest
    # scans in minutes: blocks are fixed in input pixels, so the memory pattern holds at any magnification.
    mw = mean_width or (14.0 if quick else 7.0)
    rows = []
    plan = [(4096, "targets", 4096), (4096, "targets", 1024), (8192, "targets", 1024), (16384, "targets", 1024),
            (4096, "labels", 1024)]
    if not quick:  # --quick must finish, with the other benchmarks, within 15 minutes on 2 cores
        plan += [(4096, "labels", 4096), (8192, "labels", 1024), (16384, "labels", 1024)]
    if sizes:  # only the chunked runs of one stage (targets, labels or prepare: both), at these sizes
        plan = [(s, stage, 1024) for s in sizes]
    if smoke:  # one chunked and one whole-image run of a 1024 px scan (wide cells: few tiles)
        mw, plan = mean_width or 40.0, [(1024, "targets", 512), (1024, "targets", 1024)]
    scans: dict[int, Path] = {}
    for size, stage, chunk in plan:
        if size not in scans:
            scans[size] = _scan(work / f"scan{size}.zarr", size, mw)
        out = work / f"scan{size}-{stage}-{chunk}.train.zarr"
        r = _run_child(["--child-cli", stage, "--plate", str(scans[size]), "--out", str(out), "--mean-width", str(mw),
                        "--set", f"compute.chunk={chunk}"], work)
        path = "chunked" if size > chunk else "whole image"  # blocks.is_large
        rows.append({"scan": size, "stage": stage, "path": path, "chunk": chunk, "mean_width": mw,
                     "peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"]})
        print(f"  {stage:8s} {size:6d} px  {path:11s} chunk {chunk:5d}: peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"in {r['seconds']:6.1f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def throughput(work: Path, quick: bool, smoke: bool = False) -> dict:
    from hpc_retrain.synth import plates as synth

    n, shape = (2, (256, 256)) if smoke else (6, (512, 512)) if quick else (24, (1024, 1024))
    plate = synth.write_plate(work / "plate", fmt="tiff", wells=["A1", "A2"], fields_per_well=n // 2, shape=shape,
                              seed=1)
    res = {"fields": n, "shape": list(shape)}
    loop = _run_child(["--child-loop", str(plate), str(work / "loop.zarr")], work)
    res["loop"] = {"wall_fields_per_s": n / loop["seconds"],
                   "steady_fields_per_s": (n - 1) / (loop["finished"][-1] - loop["finished"][0]),
                   "peak_rss_mb": loop["peak_rss_mb"]}
    for w in (1,) if smoke else (1, 2):  # smoke: the part runs; 2 workers are tested in test_prepare.py
        out = work / f"w{w}.train.zarr"
        r = _run_child(["--child-cli", "prepare", "--plate", str(plate), "--out", str(out), "--workers", str(w),
                        "--mean-width", str(SYNTH_WIDTH)], work)
        res[f"workers{w}"] = {"wall_fields_per_s": n / r["seconds"], "steady_fields_per_s": _store_rate(out),
                              "peak_rss_mb_main_process": r["peak_rss_mb"]}
    return res


def labels_fraction(work: Path, quick: bool, smoke: bool = False) -> dict:
    """The labels pass's model calls vs its wall time (``fraction_of_model``), on a synthetic TIFF plate
    (quick: 4 fields of 512 px; else 8 of 1024 px; smoke: 2 of 256 px), one process, the width given (no
    width measurement)."""
    from hpc_retrain.synth import plates as synth

    n, shape = (2, (256, 256)) if smoke else (4, (512, 512)) if quick else (8, (1024, 1024))
    plate = synth.write_plate(work / "labels-plate", fmt="tiff", wells=["A1", "A2"], fields_per_well=n // 2,
                              shape=shape, seed=2)
    r = _run_child(["--child-labels", "labels", "--plate", str(plate), "--out", str(work / "labels.train.zarr"),
                    "--mean-width", "7", "--workers", "1"], work)
    res = {"fields": n, "shape": list(shape), "wall_seconds": r["seconds"], "model_seconds": r["model_seconds"],
           "model_calls": r["model_calls"], "model_tiles": r["model_tiles"],
           "fraction_of_model": r["model_seconds"] / r["seconds"], "load": os.getloadavg()[0]}
    print(f"labels pass, {n} fields of {shape[0]} x {shape[1]} px: {res['model_seconds']:.1f} s of "
          f"{res['wall_seconds']:.1f} s in {res['model_calls']} model calls ({res['model_tiles']} tiles): "
          f"fraction of model {res['fraction_of_model']:.2f} (load {res['load']:.1f})", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-cli":
        _child_cli(argv[1:])
        return 0
    if argv and argv[0] == "--child-labels":
        _child_labels(argv[1:])
        return 0
    if argv and argv[0] == "--child-loop":
        _child_loop(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.prepare_bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller plates, labels only on the 4096 px scan")
    p.add_argument("--workdir", type=Path, help="where inputs and stores go (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "prepare_bench.json",
                   help="where the JSON results go (default: benchmarks/out/prepare_bench.json)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                   help="memory part: only chunked runs on these scan sizes, e.g. 16384,32768")
    p.add_argument("--stage", choices=("targets", "labels", "prepare"), default="targets",
                   help="with --sizes: the stage measured (prepare: labels + targets in one process)")
    p.add_argument("--mean-width", type=float, help="memory part: cell width of the scans (default 14 quick, 7)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--smoke", action="store_true", help="one small scan and a two-field plate, once (a test that "
                   "the benchmark runs; its figures mean nothing)")
    p.add_argument("--skip-labels-fraction", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick = True
        if args.json == p.get_default("json"):  # the figures of a smoke run replace no real result
            args.json = Path(tempfile.gettempdir()) / "hpc-retrain-bench-smoke" / "prepare_bench.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"prepare benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores, work in {work}")
    results: dict = {"quick": args.quick, "cores": os.cpu_count()}
    try:
        if not args.skip_memory:
            print("peak memory, one field per scan (OME-Zarr, 1024 px chunks):")
            rows = results["memory"] = memory(work, args.quick, args.sizes, args.stage, args.mean_width, args.smoke)
            t = {r["scan"]: r["peak_rss_mb"] for r in rows if r["stage"] == "targets" and r["path"] == "chunked"}
            if 4096 in t:
                print("  targets peak RSS relative to the 4096 px scan (chunked): "
                      + ", ".join(f"{s} px x{t[s] / t[4096]:.2f}" for s in sorted(t)) + "  (pixels: x1, x4, x16)")
            whole = [r for r in rows if r["scan"] == 4096 and r["path"] == "whole image"]
            for r in whole:
                c = next(x for x in rows if x["scan"] == 4096 and x["stage"] == r["stage"] and x["path"] == "chunked")
                print(f"  {r['stage']} 4096 px: chunked / whole-image peak RSS = "
                      f"{c['peak_rss_mb'] / r['peak_rss_mb']:.2f}, time {c['seconds'] / r['seconds']:.2f}")
        if not args.skip_throughput:
            tp = results["throughput"] = throughput(work, args.quick, args.smoke)
            print(f"throughput, {tp['fields']} fields of {tp['shape'][0]} x {tp['shape'][1]} px (labels + targets):")
            for k in (k for k in ("loop", "workers1", "workers2") if k in tp):
                r = tp[k]
                print(f"  {k:9s}: {r['wall_fields_per_s']:.3f} fields/s wall (with start-up), "
                      f"{r['steady_fields_per_s']:.3f} fields/s steady")
            for kind in ("wall", "steady") if "workers2" in tp else ():
                a, b, c = (tp[k][f"{kind}_fields_per_s"] for k in ("loop", "workers1", "workers2"))
                print(f"  ratios ({kind}): workers2/workers1 = {c / b:.2f}, workers1/loop = {b / a:.2f}, "
                      f"workers2/loop = {c / a:.2f}")
        if not args.skip_labels_fraction:
            lf = results["labels_fraction"] = labels_fraction(work, args.quick, args.smoke)
            results["labels_fraction_of_model"] = lf["fraction_of_model"]
    finally:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
