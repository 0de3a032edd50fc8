"""Inference on CPU, ours vs the MISIC reference path, side by side: speed and peak memory.

    python -m benchmarks.infer_bench --quick      # ~3 minutes on 2 loaded cores (one 4096 px scan)
    python -m benchmarks.infer_bench              # cells 7 px wide: scans of up to ~11,000 tiles (hours)

Reference ("what a user does today"): the whole-image shape index in float64 (as MISIC's
``shapeindex_preprocess`` returns it), ``misic.utils.extract_tiles``, ``model.predict``,
``misic.utils.stitch_tiles``, ``skimage.transform.resize`` back to the image, and for instances MISIC's
``postprocess_ws``. Ours: ``infer.segment_fields`` / ``infer.segment_scan`` (which include instances). Both use
the same features and the same model, so the probabilities agree (the table shows the largest difference).

Speed: megapixels (of the original images) per second to segment a small plate (probabilities and
instances), median of the repetitions, both sides in this process, alternating; ours runs the plate through
``infer.segment_fields`` (next field's features and last field's instances overlap the model).

Engines (``compute.engine``): the bare model (``infer.Predictor`` on a stack of tiles, nothing else) on
TensorFlow and on OpenVINO, tiles/s on the same tiles (each plate's own), alternating; then 6 (full: 12)
back-to-back pairs on 16 tiles, whose median TensorFlow / OpenVINO time ratio is ``cpu_engine_speedup`` in the
JSON (``engine_pairs``). ``fraction_of_model`` (per plate): segment's end-to-end rate (ours, on the
engine ``auto`` picks) as a fraction of that engine's bare rate on the plate's tiles, i.e. the bare model's
time over segment's time; 1.0 would mean features, stitching, resizing and instances cost nothing.
--quick segments cells 14 px wide (scale 0.71, 49 tiles per 2048 px field) once.

Profile (``--profile REPS``, JSON ``profile``): on the same plates, REPS alternating repetitions of the bare
model, the pipelined ``segment_fields`` (now), the helper-thread pipeline it replaced (before) and every part
one after another (features, tiles, model, stitch, resize, instances: wall and CPU s each), with
``fraction_of_model`` for each and ``cpu_ceiling``, the model's share of all the CPU work: the most any overlap
can give when the model alone keeps every core busy.

Memory: peak RSS of a fresh process segmenting one square scan, ours from an OME-Zarr array into Zarr
outputs, the reference from a TIFF into memory; the reference is run only while its estimated peak fits
in half the free memory, and the table says where it stops. --quick scans cells 40 px wide (scale 0.25)
so the model's share stays small; the full run uses 7 px cells (scale 1.43).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REF_BYTES_PER_SCALED_PX = 100  # reference, per rescaled px: f64 features, f64 tiles (x1.31 overlap), stitch
REF_BYTES_PER_PX = 100  # per original px: f64 image, resize output, postprocess_ws's f64 Hessian and watershed


def _cfg(mean_width: float = 7.0):
    from hpc_retrain.config import RunConfig

    return RunConfig().updated(preprocess__mean_width=mean_width)


# ------------------------------------------------------------------------------------------ paths
def reference_probabilities(model, im: np.ndarray, cfg) -> np.ndarray:
    import misic.utils as mu
    from skimage.transform import resize

    from hpc_retrain.imaging import preprocess as P

    sh = P.features_np(im, cfg.preprocess.brightfield, cfg.preprocess).astype(np.float64)
    tiles, params = mu.extract_tiles(sh, size=cfg.tiling.size, exclude=cfg.tiling.margin)
    del sh
    yp = model.predict(tiles, verbose=0)  # as MiSiC.segment calls it (Keras' default batch of 32)
    del tiles
    y = mu.stitch_tiles(yp, params)
    return resize(y, im.shape + (y.shape[-1],), order=1)


def reference_instances(im: np.ndarray, prob: np.ndarray) -> np.ndarray:
    from misic.extras import postprocess_ws

    return postprocess_ws(im.astype(np.float64), prob)


def ours_probabilities(predictor, im: np.ndarray, cfg) -> np.ndarray:
    from hpc_retrain.inference import predictor as infer

    return infer.predict_field(predictor, im, cfg, "stitch")


def _timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


# ------------------------------------------------------------------------------------------ speed
def plate_tiles(images: list[np.ndarray], cfg) -> np.ndarray:
    """The model's input for a plate: every field's tiles, as ``segment`` cuts them (stitch mode)."""
    from hpc_retrain.imaging import tiling as T
    from hpc_retrain.inference import predictor as infer

    return np.concatenate([T.extract_tiles(infer.field_features(im, cfg), cfg.tiling.size, cfg.tiling.margin)[0]
                           for im in images])


def engine_pairs(bare: dict, tiles: np.ndarray, pairs: int) -> dict:
    """The bare engines on the same tiles back to back, ``pairs`` times, the order alternating: a change of
    machine load between pairs cancels in each pair's TensorFlow / OpenVINO time ratio, and the median of
    those ratios is ``cpu_engine_speedup`` (one timing per engine and plate swung 0.78-1.24 at load ~5)."""
    t: dict[str, list[float]] = {e: [] for e in bare}
    ratios = []
    for i in range(pairs):
        dt = {}
        for e in (("tensorflow", "openvino") if i % 2 == 0 else ("openvino", "tensorflow")):
            dt[e] = _timed(bare[e], tiles)[1]
            t[e].append(dt[e])
        ratios.append(dt["tensorflow"] / dt["openvino"])
    return {"pairs": pairs, "tiles": int(len(tiles)), "ratios": ratios, "speedup": float(np.median(ratios)),
            "tiles_s": {e: len(tiles) / float(np.median(v)) for e, v in t.items()}, "raw_seconds": t}


def speed(plates: dict[int, tuple[int, int]], seed: int = 0, mean_width: float = 7.0,
          pairs: int = 6) -> tuple[list[dict], dict]:
    """``plates``: field size -> (fields on the plate, repetitions). Segments the plate both ways, and runs
    the bare model on the plate's tiles on each engine; returns the plate rows and the engines' summary."""
    from hpc_retrain.inference import engine as E
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference import predictor as infer
    from hpc_retrain.synth import plates as synth

    cfg = _cfg(mean_width)
    model = M.load()
    predictor = infer.Predictor(model, cfg.compute.batch_size)  # compute.engine=auto, as segment runs
    engines = ["tensorflow"] + (["openvino"] if E.openvino_version() is not None else [])
    bare = {e: infer.Predictor(model, cfg.compute.batch_size, engine=e) for e in engines}
    print(f"  segment runs on {predictor.engine} (compute.engine=auto); bare model on {', '.join(engines)}",
          flush=True)
    warm = synth.render_field(seed, (256, 256)).brightfield
    list(infer.segment_fields(predictor, [warm], cfg))  # trace both sides once, outside the timings
    reference_probabilities(model, warm, cfg)
    for b in bare.values():
        b(plate_tiles([warm], cfg))
    rows = []
    for n, (count, reps) in plates.items():
        images = [synth.render_field(seed + n + i, (n, n), mean_width=mean_width).brightfield
                  for i in range(count)]
        tiles = plate_tiles(images, cfg)
        t: dict[str, list[float]] = {"ours": [], "ref": [], "ref_prob": [], **{f"bare_{e}": [] for e in engines}}
        diff, ediff = 0.0, 0.0
        for r in range(reps):  # alternating, so a change in machine load hits every side
            start, ref_probs, t_prob = time.perf_counter(), [], 0.0
            for im in images:
                p, dt = _timed(reference_probabilities, model, im, cfg)
                t_prob += dt
                reference_instances(im, p)
                ref_probs.append(p)
            t["ref"].append(time.perf_counter() - start)
            t["ref_prob"].append(t_prob)
            ours, dt = _timed(lambda images=images: list(infer.segment_fields(predictor, images, cfg, "stitch")))
            t["ours"].append(dt)
            diff = max(diff, max(float(np.abs(o[0] - r_[..., :2]).max()) for o, r_ in zip(ours, ref_probs)))
            del ours, ref_probs
            outs = {}
            for e in (engines if r % 2 == 0 else engines[::-1]):
                outs[e], dt = _timed(bare[e], tiles)
                t[f"bare_{e}"].append(dt)
            ediff = max(ediff, float(np.abs(outs[engines[-1]] - outs[engines[0]]).max()))
            del outs
        med = {k: float(np.median(v)) for k, v in t.items()}
        mp = count * n * n / 1e6
        row = {"size": n, "fields": count, "reps": reps, "megapixels": mp, "tiles": int(len(tiles)),
               "mean_width": mean_width, "max_abs_diff": diff, "engine": predictor.engine,
               "max_abs_diff_engines": ediff, "seconds": med, "raw_seconds": t,
               "mp_s": {"ours": mp / med["ours"], "ref": mp / med["ref"], "ref_prob_only": mp / med["ref_prob"]},
               "bare_tiles_s": {e: len(tiles) / med[f"bare_{e}"] for e in engines}}
        row["ratio"] = row["mp_s"]["ours"] / row["mp_s"]["ref"]
        # segment's MP/s over the bare model's MP/s on the same engine and tiles = bare time / segment time
        row["fraction_of_model"] = med[f"bare_{predictor.engine}"] / med["ours"]
        rows.append(row)
        bare_txt = ", ".join(f"{e} {v:.2f}" for e, v in row["bare_tiles_s"].items())
        print(f"  {count} x {n} px: ours {row['mp_s']['ours']:.4f} MP/s, reference {row['mp_s']['ref']:.4f} MP/s "
              f"(x{row['ratio']:.2f}), max |diff| {diff:.1e}; bare model tiles/s: {bare_txt}; segment at "
              f"{row['fraction_of_model']:.2f} of its engine's bare rate", flush=True)
    total = sum(r["tiles"] for r in rows)
    summary = {"tiles": total, "batch_size": cfg.compute.batch_size, "segment_engine": predictor.engine,
               "openvino": E.openvino_version(),
               "tiles_s": {e: total / sum(r["seconds"][f"bare_{e}"] for r in rows) for e in engines}}
    if "openvino" in engines:
        summary["max_abs_diff"] = max(r["max_abs_diff_engines"] for r in rows)
        summary["pairs"] = engine_pairs(bare, tiles[:16], pairs)  # the last plate's first 16 tiles
    return rows, summary


# ------------------------------------------------------------------------------------------ profile
def _clock(fn, *a):
    """(result, wall s, CPU s of the whole process: every thread, the engines' included)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a)
    return out, time.perf_counter() - w, time.process_time() - c


def helper_thread_fields(predictor, images, cfg, mode="stitch"):
    """``segment_fields`` as it was before issue 28, for the before/after ratio: one helper thread computed
    the next field's features and labelled the last field's instances while the model ran on this one (in
    the caller's thread, which also did the tiles, stitching and resizing)."""
    from concurrent.futures import ThreadPoolExecutor

    from hpc_retrain.inference import instances as I
    from hpc_retrain.inference import predictor as infer

    out = []
    with ThreadPoolExecutor(1) as pool:
        feats_next = pool.submit(infer.field_features, images[0], cfg)
        labelled = None
        for i, image in enumerate(images):
            feats = feats_next.result()
            if i + 1 < len(images):
                feats_next = pool.submit(infer.field_features, images[i + 1], cfg)
            prob = infer.resize_to(infer.predict_scaled(predictor, feats, cfg, mode), tuple(image.shape))
            if labelled is not None:
                out.append(labelled.result())
            labelled = pool.submit(lambda p: (p, I.instances(p, cfg)), prob)
        out.append(labelled.result())
    return out


def sequential_parts(predictor, images, cfg, mode="stitch") -> dict[str, list[float]]:
    """Segment ``images`` one part after another in one thread: {part: [wall s, CPU s]} summed over fields."""
    from hpc_retrain.imaging import tiling as T
    from hpc_retrain.inference import instances as I
    from hpc_retrain.inference import predictor as infer
    from hpc_retrain.prepare import targets as TG

    parts = {k: [0.0, 0.0] for k in ("features", "tiles", "model", "stitch", "resize", "instances")}

    def add(k, r):
        parts[k][0] += r[1]
        parts[k][1] += r[2]
        return r[0]

    for im in images:
        feats = add("features", _clock(infer.field_features, im, cfg))
        grid = T.TileGrid(tuple(feats.shape[:2]), cfg.tiling.size, cfg.tiling.margin)
        index, out = TG.canvas_index(grid), infer.ScaledResult(grid.shape, mode)
        for rows, cols in infer.field_blocks(grid):
            tiles = add("tiles", _clock(infer.block_tiles, feats, grid, rows, cols, index))
            pred = add("model", _clock(predictor, tiles))
            add("stitch", _clock(infer.add_block, pred, grid, rows, cols, out, mode))
        prob = add("resize", _clock(lambda o=out, g=grid, im=im: infer.resize_to(o.read(0, g.shape[0], 0, g.shape[1]),
                                                                                 im.shape)))
        add("instances", _clock(I.instances, prob, cfg))
    return parts


def profile(predictor, plates: dict[int, list[np.ndarray]], cfg, reps: int = 3) -> list[dict]:
    """Where segment's time goes, per plate, medians of ``reps`` alternating repetitions of: the bare model
    on the plate's tiles; the parts one after another (wall and CPU s each); the pipelined ``segment_fields``
    (now); the helper-thread pipeline it replaced (before). ``fraction_of_model`` = bare time / segment time;
    ``cpu_ceiling`` = the model's CPU s over all parts' CPU s: the fraction reachable when the model alone
    keeps every core busy, so other work can only take cores from it."""
    from hpc_retrain.inference import predictor as infer

    rows = []
    for n, images in plates.items():
        tiles = plate_tiles(images, cfg)
        raw: dict[str, list] = {"bare": [], "now": [], "before": [], "sequential": []}
        for r in range(reps):
            runs = [("bare", lambda t=tiles: predictor(t)),
                    ("now", lambda ims=images: list(infer.segment_fields(predictor, ims, cfg, "stitch"))),
                    ("before", lambda ims=images: helper_thread_fields(predictor, ims, cfg)),
                    ("sequential", lambda ims=images: sequential_parts(predictor, ims, cfg))]
            for name, fn in (runs if r % 2 == 0 else runs[::-1]):
                out, w, c = _clock(fn)
                raw[name].append({"wall": w, "cpu": c, **({"parts": out} if name == "sequential" else {})})
        med = {k: {c: float(np.median([x[c] for x in v])) for c in ("wall", "cpu")} for k, v in raw.items()}
        parts = {k: {c: float(np.median([x["parts"][k][i] for x in raw["sequential"]])) for i, c in
                     enumerate(("wall", "cpu"))} for k in raw["sequential"][0]["parts"]}
        cpu_all = sum(p["cpu"] for p in parts.values())
        row = {"size": n, "fields": len(images), "tiles": int(len(tiles)), "reps": reps, "seconds": med,
               "parts": parts, "raw": raw,
               "fraction_of_model": {k: med["bare"]["wall"] / med[k]["wall"] for k in ("now", "before", "sequential")},
               "now_over_before": med["before"]["wall"] / med["now"]["wall"],
               "cpu_ceiling": parts["model"]["cpu"] / cpu_all,
               "cores_busy": {k: v["cpu"] / v["wall"] for k, v in med.items()},
               "load": os.getloadavg()[0]}
        rows.append(row)
        print(f"  profile {len(images)} x {n} px: fraction of the bare model now {row['fraction_of_model']['now']:.2f}, "
              f"before {row['fraction_of_model']['before']:.2f}, sequential {row['fraction_of_model']['sequential']:.2f}; "
              f"CPU ceiling {row['cpu_ceiling']:.2f} (load {row['load']:.1f})", flush=True)
    return rows


def run_profile(plates: dict[int, tuple[int, int]], mean_width: float, reps: int, seed: int = 0) -> list[dict]:
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference import predictor as infer
    from hpc_retrain.synth import plates as synth

    cfg = _cfg(mean_width)
    predictor = infer.Predictor(M.load(), cfg.compute.batch_size)
    images = {n: [synth.render_field(seed + n + i, (n, n), mean_width=mean_width).brightfield for i in range(count)]
              for n, (count, _) in plates.items()}
    list(infer.segment_fields(predictor, images[min(images)][:1], cfg))  # warm
    return profile(predictor, images, cfg, reps)


def profile_table(rows: list[dict]) -> str:
    out = ["Where segment's time goes (parts one after another in one thread: wall s / CPU s, medians; the",
           "fraction of the bare model's rate: bare wall time / segment wall time)"]
    for r in rows:
        out.append(f"{r['fields']} x {r['size']} px, {r['tiles']} tiles, {r['reps']} reps, load {r['load']:.1f}:")
        cpu_all = sum(p["cpu"] for p in r["parts"].values())
        for k, p in r["parts"].items():
            out.append(f"  {k:>10} {p['wall']:7.2f} s {p['cpu']:7.2f} CPU s  {p['cpu'] / cpu_all:6.1%} of CPU")
        f = r["fraction_of_model"]
        out.append(f"  fraction of model: now {f['now']:.2f}, before {f['before']:.2f}, sequential "
                   f"{f['sequential']:.2f}; now / before {r['now_over_before']:.2f}; CPU ceiling {r['cpu_ceiling']:.2f}; "
                   "cores busy " + ", ".join(f"{k} {v:.2f}" for k, v in r["cores_busy"].items()))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ memory
def write_scan(folder: Path, n: int, seed: int = 0, mean_width: float = 7.0) -> tuple[Path, Path]:
    """A square brightfield scan as a Zarr array (ours) and a TIFF (reference), tiled from one field."""
    import tifffile
    import zarr

    from hpc_retrain.synth import plates as synth

    tile = min(n, 2048)
    base = synth.render_field(seed, (tile, tile), mean_width=mean_width).brightfield
    zpath, tpath = folder / f"scan{n}.zarr", folder / f"scan{n}.tif"
    arr = zarr.create_array(str(zpath), shape=(n, n), dtype=base.dtype, chunks=(2048, 2048))
    for r in range(0, n, tile):
        for c in range(0, n, tile):
            arr[r:r + tile, c:c + tile] = base
    tifffile.imwrite(tpath, np.tile(base, (n // tile, n // tile)), bigtiff=True)
    return zpath, tpath


def peak_rss_gib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a
    child of a big parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_child(side: str, scan: str, mean_width: float, out_dir: str) -> dict:
    """Runs in a fresh process: segment one scan, report peak RSS (and the RSS with only TF + model)."""
    import dask.array as da
    import tifffile
    import zarr

    from hpc_retrain.inference import model as M
    from hpc_retrain.inference import predictor as infer

    cfg = _cfg(mean_width)
    model = M.load()
    base = peak_rss_gib()
    t = time.perf_counter()
    if side == "ours":
        image = da.from_zarr(zarr.open_array(scan, mode="r"))
        n = image.shape[0]
        root = zarr.open_group(out_dir, mode="w")
        prob = root.create_array("prob", shape=(2, n, n), dtype=np.float32, chunks=(1, 2048, 2048))
        labels = root.create_array("labels", shape=(n, n), dtype=np.int32, chunks=(2048, 2048))
        cells = infer.segment_scan(model, image, cfg, prob, labels, "stitch", tmpdir=out_dir)
    else:
        im = tifffile.imread(scan)
        p = reference_probabilities(model, im, cfg)
        cells = int(reference_instances(im, p).max())
    return {"side": side, "seconds": time.perf_counter() - t, "cells": int(cells),
            "peak_rss_gib": peak_rss_gib(), "base_rss_gib": base}


def memory(sizes: list[int], mean_width: float, workdir: Path) -> list[dict]:
    import psutil

    from hpc_retrain.imaging import preprocess as P

    cfg = _cfg(mean_width)
    rows = []
    for n in sizes:
        zpath, tpath = write_scan(workdir, n, mean_width=mean_width)
        scaled = np.prod(P.rescaled_shape((n, n), cfg.preprocess.scale))
        est = (scaled * REF_BYTES_PER_SCALED_PX + n * n * REF_BYTES_PER_PX) / 2**30
        row = {"size": n, "mean_width": mean_width, "scale": cfg.preprocess.scale, "ref_estimate_gib": est}
        for side in ("ours", "ref"):
            free = psutil.virtual_memory().available / 2**30
            if side == "ref" and est > 0.5 * free:
                row[side] = {"skipped": f"estimated {est:.1f} GiB > half the {free:.1f} GiB free"}
                print(f"  {n} px reference: skipped ({row[side]['skipped']})", flush=True)
                continue
            out_dir = tempfile.mkdtemp(dir=workdir)
            cmd = [sys.executable, "-m", "benchmarks.infer_bench", "--rss-child", side, "--scan",
                   str(zpath if side == "ours" else tpath), "--mean-width", str(mean_width), "--out-dir", out_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                row[side] = {"failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
            else:
                row[side] = json.loads(lines[-1])
            print(f"  {n} px {side}: {row[side]}", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ report
def table(result: dict) -> str:
    eng = result.get("engines") or {}
    out = []
    if eng:
        rates = ", ".join(f"{e} {v:.2f}" for e, v in eng["tiles_s"].items())
        out += [f"Bare model on CPU, same {eng['tiles']} tiles (batch {eng['batch_size']}), tiles/s: {rates}"
                + (f", max |diff| {eng['max_abs_diff']:.1e}" if "max_abs_diff" in eng else "")]
        if eng.get("pairs"):
            pr = eng["pairs"]
            out += [f"OpenVINO / TensorFlow = {result['cpu_engine_speedup']:.2f} (median of {pr['pairs']} back-to-back "
                    f"pairs on {pr['tiles']} tiles; pairs {min(pr['ratios']):.2f}-{max(pr['ratios']):.2f})"]
        out += [f"segment runs on {eng['segment_engine']}; fraction of its bare rate per plate: "
                + ", ".join(f"{r['fields']} x {r['size']} px {r['fraction_of_model']:.2f}" for r in result["speed"]), ""]
    out += ["Segmenting a plate on CPU (probabilities + instances; megapixels of the original images per s,",
           "medians; ours: segment_fields pipeline, reference: MISIC path + postprocess_ws per field)",
           f"{'plate':>12} {'ours':>9} {'ref':>9} {'ratio':>6} {'ref prob only':>14} {'max|diff|':>10}"]
    for r in result["speed"]:
        m = r["mp_s"]
        out.append(f"{str(r['fields']) + ' x ' + str(r['size']):>12} {m['ours']:>9.4f} {m['ref']:>9.4f} "
                   f"{r['ratio']:>6.2f} {m['ref_prob_only']:>14.4f} {r['max_abs_diff']:>10.1e}")
    if result.get("memory"):
        mw = result["memory"][0]["mean_width"]
        out += ["", f"Peak RSS segmenting one scan (GiB; mean_width {mw}, scale {result['memory'][0]['scale']};"
                    " TF + model alone in brackets)",
                f"{'scan':>7} {'ours':>14} {'ref':>14} {'ours s':>8} {'ref s':>8}"]
        for r in result["memory"]:
            def cell(side, r=r):
                d = r[side]
                if "peak_rss_gib" in d:
                    return f"{d['peak_rss_gib']:.2f} ({d['base_rss_gib']:.2f})", f"{d['seconds']:.0f}"
                return ("skipped" if "skipped" in d else "failed"), "-"
            (o, os_), (f, fs) = cell("ours"), cell("ref")
            out.append(f"{r['size']:>7} {o:>14} {f:>14} {os_:>8} {fs:>8}")
        stopped = [r for r in result["memory"] if "peak_rss_gib" not in r["ref"]]
        if stopped:
            why = stopped[0]["ref"].get("skipped") or stopped[0]["ref"].get("failed")
            out.append(f"reference stops at {stopped[0]['size']} px: {why}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.infer_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; scans at low magnification")
    ap.add_argument("--smoke", action="store_true", help="one tiny field and one small scan, once (a test that "
                    "the benchmark runs; its figures mean nothing)")
    ap.add_argument("--json", default=str(HERE / "out" / "infer_bench.json"), help="where the JSON goes")
    ap.add_argument("--skip-memory", action="store_true", help="speed only")
    ap.add_argument("--profile", type=int, default=0, metavar="REPS",
                    help="also profile segment on the speed plates (where the time goes; before/after), REPS reps")
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="scan sizes for peak RSS (default 4096,8192,16384; --quick: 4096)")
    ap.add_argument("--rss-child", choices=("ours", "ref"), help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--mean-width", type=float, default=7.0, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke and args.json == ap.get_default("json"):  # the figures of a smoke run replace no real result
        args.json = str(Path(tempfile.gettempdir()) / "hpc-retrain-bench-smoke" / "infer_bench.json")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from hpc_retrain.inference.model import import_tensorflow

    import_tensorflow()  # without TensorFlow's native start-up lines, as the CLI
    if args.rss_child:
        print(json.dumps(_rss_child(args.rss_child, args.scan, args.mean_width, args.out_dir)))
        return 0
    # --quick: the scans at low magnification (mean cell width 40 px, scale 0.25) keep the model's share
    # small; the full run uses the default 7 px cells (scale 1.43), ~11,000 tiles at 16384 px.
    plates = {256: (1, 1)} if args.smoke else {512: (4, 1), 2048: (1, 1)} if args.quick else {512: (8, 3), 2048: (2, 3)}
    speed_width = 14.0 if args.quick or args.smoke else 7.0
    mem_sizes = args.sizes or ([1024] if args.smoke else [4096] if args.quick else [4096, 8192, 16384])
    mem_width = 40.0 if args.quick or args.smoke else 7.0
    result = {"command": "python -m benchmarks.infer_bench" + (" --quick" if args.quick else "")
              + (" --smoke" if args.smoke else ""),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    print("speed:", flush=True)
    result["speed"], result["engines"] = speed(plates, mean_width=speed_width,
                                               pairs=1 if args.smoke else 6 if args.quick else 12)
    pairs = result["engines"].get("pairs")
    result["cpu_engine_speedup"] = pairs["speedup"] if pairs else None
    if args.profile:
        print("profile:", flush=True)
        result["profile"] = run_profile(plates, speed_width, args.profile)
    if not args.skip_memory:
        print("memory:", flush=True)
        with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
            result["memory"] = memory(mem_sizes, mem_width, Path(tmp))
    text = table(result) + ("\n\n" + profile_table(result["profile"]) if result.get("profile") else "")
    result["table"] = text
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print(text)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
