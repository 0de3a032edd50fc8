"""The GPU check, in one call, on a machine with one GPU where only PyTorch and/or JAX (and their CUDA libraries)
are installed, no TensorFlow: MISIC trained and run on each Keras backend there.

    python -m benchmarks.gpu_bench --download .whl   # here (network): the wheels the GPU machine lacks, Python 3.12
    python -m benchmarks gpu --wheels .whl           # there: install them (pip --no-index), then measure
    python -m benchmarks gpu --cpu                   # the same script here on the CPU, tiny sizes, ~2 min per backend

Per backend (each in its own process: Keras fixes its backend at import), into benchmarks/out/gpu_bench.json:
the GPU's name; training tiles/s in float32 and in mixed precision (``train.mixed_precision: on``: float16 with
loss scaling on a GPU, bfloat16 on a CPU), from the Zarr store (the threaded tile loader) and from tensors already
on the device (their ratio: the share of the input pipeline); bare inference tiles/s (``infer.Predictor``); a
4096 px scan through ``infer.segment_scan`` end to end (tiles/s and the GPU memory peak); and a 2-epoch training
(``python -m hpc_retrain train``) killed with SIGTERM mid-epoch and resumed, its weights against an uninterrupted
run's. A part that would run past ``--budget-s`` (default 450 s: the check must finish in 8 minutes) is skipped
and says so.

``--side-by-side train|infer`` (what ``python -m benchmarks train --quick`` / ``infer --quick`` add): training or
bare inference tiles/s on every installed backend, same tiles, one process each, with the ratio to TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "gpu_bench.json"
BACKENDS = ("tensorflow", "jax", "torch")

# What the tool imports that a GPU machine with PyTorch/JAX, NumPy, SciPy, scikit-image, tifffile, h5py and PyYAML
# lacks, with what those pull in (versions: container/constraints.txt). misic is installed without its
# dependencies: it requires tensorflow, but the tool only reads its weights file. Not carried: TensorFlow,
# OpenVINO (TensorFlow-only engine), the test and Slurm extras.
CARRY = ("keras", "absl-py", "namex", "optree", "rich", "markdown-it-py", "mdurl", "Pygments", "zarr", "numcodecs",
         "donfig", "google-crc32c", "typing_extensions", "dask", "distributed", "tornado", "zict", "tblib",
         "sortedcontainers", "msgpack", "psutil", "Jinja2", "MarkupSafe", "urllib3", "cloudpickle", "toolz", "partd",
         "locket", "fsspec", "click", "importlib_metadata", "lazy-importer", "zipp", "pydantic", "pydantic_core", "annotated-types",
         "typing-inspection", "submitit", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver",
         "pyparsing", "python-dateutil", "tzdata", "six", "tqdm", "packaging")
NO_DEPS = ("misic",)


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "container" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[name.lower().replace("_", "-")] = f"{name}=={ver}"
    return out


def wheel_specs() -> list[str]:
    p = pins()
    return [p[n.lower().replace("_", "-")] for n in CARRY + NO_DEPS]


def download_command(folder: Path, python: str = "3.12") -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
            "manylinux2014_x86_64", "--no-deps", "-d", str(folder), *wheel_specs()]


def install(folder: Path) -> None:
    """The carried wheels, from ``folder`` only (the GPU machine has no network)."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    # Dependencies checked against the folder and what is installed: a missing one fails here, by name.
    subprocess.run(base + [s for s in wheel_specs() if not s.lower().startswith(NO_DEPS)], check=True)
    subprocess.run(base + ["--no-deps"] + [s for s in wheel_specs() if s.lower().startswith(NO_DEPS)], check=True)


# ------------------------------------------------------------------------------------------ one backend
def train_rates(store: Path, batch: int, policy: str, steps: int, warmup: int) -> dict[str, float]:
    """Training tiles/s of the real training step, one model compiled once: from a batch already on the device
    (``device``) and through the threaded Zarr tile loader (``zarr``), ``steps`` steps each after ``warmup``."""
    import keras

    from hpc_retrain.config import RunConfig
    from hpc_retrain.training import data as td
    from hpc_retrain.training import network as nw
    from hpc_retrain.training.loader import TileLoader

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    net, _ = nw.build_model(RunConfig(), policy)
    opt = nw.make_optimizer(1e-4, policy)
    opt.build(net.trainable_variables)
    reader = td.TileReader(store)
    step, _ = nw.make_steps(net, opt, np.array([3.0, 15.0]), reader.size)
    n = int(reader.targets.shape[0])
    total = (steps + 1) * batch
    order = np.resize(np.random.default_rng(1).permutation(n), total)
    codes = np.random.default_rng(2).integers(0, 8, total).astype(np.int32)
    xs, ys = zip(*(reader.read(i) for i in order[:batch]))
    x = keras.ops.convert_to_tensor(np.stack(xs))
    y = keras.ops.convert_to_tensor(np.stack(ys).astype(np.float32))
    for _ in range(warmup):  # compilation; the step returns floats, so it has finished
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    rates = {"device": steps * batch / (time.perf_counter() - t0)}
    batches = iter(TileLoader(reader, order, codes, batch))
    step(*next(batches))  # the loader's fill, untimed (as every epoch starts one)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    rates["zarr"] = steps * batch / (time.perf_counter() - t0)
    return rates


def infer_rate(n_tiles: int, batch: int, reps: int = 1) -> float:
    """Bare inference tiles/s: pretrained MISIC through ``infer.Predictor`` (the Keras predictor)."""
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference.predictor import Predictor

    pred = Predictor(M.load(), batch, 256, engine="keras")
    tiles = np.random.default_rng(0).uniform(-1, 1, (n_tiles, 256, 256, 3)).astype(np.float32)
    pred(tiles[:pred.step])  # compile
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        pred(tiles)
        best = max(best, n_tiles / (time.perf_counter() - t0))
    return best


def scan_rate(n: int, work: Path, batch: int) -> dict:
    """``segment_scan`` of an n x n px brightfield scan (cells 7 px: 1.43x rescale) from Zarr to Zarr."""
    import dask.array as da
    import zarr

    from benchmarks.infer_bench import write_scan
    from hpc_retrain.config import RunConfig
    from hpc_retrain.imaging import tiling as T
    from hpc_retrain.inference import backend
    from hpc_retrain.inference import model as M
    from hpc_retrain.inference import predictor as infer

    cfg = RunConfig().updated(preprocess__mean_width=7.0, compute__batch_size=batch, compute__engine="keras")
    zpath, _ = write_scan(work, n)
    model = M.load()
    root = zarr.open_group(str(work / "out.zarr"), mode="w")
    prob = root.create_array("prob", shape=(2, n, n), dtype=np.float32, chunks=(1, 2048, 2048))
    labels = root.create_array("labels", shape=(n, n), dtype=np.int32, chunks=(2048, 2048))
    t0 = time.perf_counter()
    cells = infer.segment_scan(model, da.from_zarr(zarr.open_array(str(zpath), mode="r")), cfg, prob, labels,
                               "stitch", tmpdir=work)
    dt = time.perf_counter() - t0
    side = int(round(n * cfg.preprocess.scale))
    tiles = int(np.prod(T.TileGrid((side, side), cfg.tiling.size, cfg.tiling.margin).rows_cols))
    return {"px": n, "seconds": dt, "tiles": tiles, "tiles_s": tiles / dt, "cells": int(cells),
            "gpu_memory_peak_bytes": backend.gpu_memory_peak()}


def resume_check(work: Path, backend: str, batch: int, steps: int, validate: bool = True) -> dict:
    """A 2-epoch training killed with SIGTERM in epoch 2 and resumed, against an uninterrupted one (without
    ``validate`` no validation fields: the CPU rehearsal skips compiling the validation pass)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from trainstore import build_store

    store = build_store(work / "resume.zarr", n_fields=6)
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")

    def cmd(run: Path) -> list[str]:
        return [sys.executable, "-m", "hpc_retrain", "-q", "train", "--store", str(store), "--run", str(run),
                "--executor", "inline", "--epochs", "2", "--batch-size", str(batch), "--set",
                f"train.steps_per_epoch={steps}", "--set", "train.deterministic=true", "--set", "seed=3",
                "--set", f"train.val_fraction={0.34 if validate else 0}"]

    run, ref = work / "killed", work / "uninterrupted"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd(run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not ((run / "train.log").is_file() and f"epoch 2/2 step 1/{steps}" in (run / "train.log").read_text()):
        if proc.poll() is not None:
            return {"ok": False, "error": proc.stderr.read()[-2000:]}
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    killed_rc = proc.returncode
    for r in (run, ref):
        out = subprocess.run(cmd(r), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode:
            return {"ok": False, "error": out.stderr[-2000:]}

    def last(r: Path) -> dict:
        with np.load(sorted((r / "checkpoints").glob("ckpt-*"))[-1] / "variables.npz") as z:
            return {k: z[k] for k in z.files}

    a, b = last(run), last(ref)
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in b)
    return {"ok": killed_rc == 128 + signal.SIGTERM and diff <= 1e-5, "killed_exit": killed_rc,
            "max_abs_weight_diff": diff, "resumed_from_mid_epoch": "resuming at step" in (run / "train.log").read_text(),
            "seconds": time.perf_counter() - t0}


def measure(backend: str, cpu: bool, budget_s: float) -> dict:
    """Everything for the backend this process runs (KERAS_BACKEND is set by the caller)."""
    from hpc_retrain.inference import backend

    backend.apply(backend)
    import keras

    from benchmarks.train_bench import synthetic_store
    from hpc_retrain.training.network import precision_policy

    t_start = time.perf_counter()
    gpu = backend.gpu_visible()
    res: dict = {"backend": backend, "keras": keras.__version__, "gpu": backend.gpu_names(), "gpu_visible": gpu,
                 "version": _version(backend), "skipped": []}
    if not cpu and not gpu:
        res["error"] = f"{backend} sees no GPU (use --cpu for the CPU rehearsal)"
        return res
    batch = 2 if cpu else 16
    steps, warmup = (2, 1) if cpu else (20, 2)
    sizes = {"store_tiles": 4 if cpu else 64, "infer_tiles": 2 if cpu else 256, "scan_px": 512 if cpu else 4096}
    res.update(batch=batch, steps=steps, warmup=warmup, **sizes)

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    def part(name: str, need_s: float, fn):
        if left() < need_s:
            res["skipped"].append(f"{name}: {left():.0f} s of the budget left, it needs ~{need_s:.0f} s")
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # a part that fails is reported; the others still run
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"  {backend}: {name} {out if not isinstance(out, float) else round(out, 3)} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        return out

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        store = synthetic_store(work / "bench.zarr", sizes["store_tiles"])
        train = {}
        for prec, policy in (("float32", "float32"), ("mixed", precision_policy("on"))):
            r = part(f"train {prec} ({policy})", 30, lambda p=policy: train_rates(store, batch, p, steps, warmup))
            if r is not None and "error" not in r:
                train.update({f"{prec}_{k}": v for k, v in r.items()})
                train[f"{prec}_pipeline_share"] = 1 - r["zarr"] / r["device"]
            elif r is not None:
                train[f"{prec}_error"] = r["error"]
        res["train_tiles_s"] = train
        res["mixed_policy"] = precision_policy("on")
        res["infer_tiles_s"] = part("bare inference", 20, lambda: infer_rate(sizes["infer_tiles"], 1 if cpu else 32))
        res["segment_scan"] = part(f"segment {sizes['scan_px']} px scan", 40,
                                   lambda: scan_rate(sizes["scan_px"], work, 1 if cpu else 32))
        res["resume"] = part("2 epochs killed and resumed", 90 if cpu else 120,
                             lambda: resume_check(work, backend, batch, 2 if cpu else 3, validate=not cpu))
    res["gpu_memory_peak_bytes"] = backend.gpu_memory_peak()
    res["seconds"] = time.perf_counter() - t_start
    return res


def _version(backend: str) -> str | None:
    try:
        from importlib.metadata import version

        return version({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend])
    except Exception:
        return None


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def _child(args: list[str], backend: str, timeout: float) -> dict:
    """Run this module in a fresh process for one backend; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = Path(f.name)
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                          if p]))
    try:
        rc = subprocess.call([sys.executable, "-m", "benchmarks.gpu_bench", *args, "--backend", backend,
                              "--result", str(path)], cwd=ROOT, env=env, timeout=timeout)
        return json.loads(path.read_text()) if path.stat().st_size else {"backend": backend, "error": f"exit {rc}"}
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": f"timed out after {timeout:.0f} s"}
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ side by side
def side_by_side(kind: str, quick: bool) -> dict:
    """``kind`` (train or infer) tiles/s on every installed backend, one process each, ratio to TensorFlow."""
    rows = {}
    for b in installed_backends():
        rows[b] = _child(["--measure", kind] + (["--quick"] if quick else []), b, 900)
    base = rows.get("tensorflow", {}).get("tiles_s")
    what = ("training (float32, Zarr loader, batch 2)" if kind == "train" else "bare inference (Keras predictor)")
    print(f"\n{what}, each backend in its own process, CPU ({platform.processor() or platform.machine()}):")
    print(f"{'backend':>10} {'version':>10} {'tiles/s':>9} {'vs TF':>7}")
    for b, r in rows.items():
        t = r.get("tiles_s")
        rate = f"{t:.3f}" if t else r.get("error", "-")
        ratio = f"{t / base:.2f}x" if t and base else "-"
        print(f"{b:>10} {str(r.get('version')):>10} {rate:>9} {ratio:>7}")
    return rows


def measure_one(kind: str, backend: str, quick: bool) -> dict:
    from hpc_retrain.inference import backend

    backend.apply(backend)
    from benchmarks.train_bench import synthetic_store

    res = {"backend": backend, "version": _version(backend), "kind": kind}
    if kind == "train":
        steps, warmup, batch = (3, 1, 2) if quick else (10, 2, 8)
        with tempfile.TemporaryDirectory() as tmp:
            store = synthetic_store(Path(tmp) / "s.zarr", 8)
            res.update(tiles_s=train_rates(store, batch, "float32", steps, warmup)["zarr"], batch=batch, steps=steps)
    else:
        n = 4 if quick else 32
        res.update(tiles_s=infer_rate(n, 1, reps=2), tiles=n)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU rehearsal: tiny sizes, no GPU needed")
    p.add_argument("--backends", help=f"comma-separated (default: every installed one of {', '.join(BACKENDS)}; "
                   "--cpu: jax)")
    p.add_argument("--budget-s", type=float, default=450, help="seconds for all backends together (default 450)")
    p.add_argument("--wheels", type=Path, help="first install the carried wheels from this folder (pip --no-index)")
    p.add_argument("--download", type=Path, metavar="FOLDER", help="download the carried wheels for Python 3.12 "
                   "manylinux into FOLDER (needs the network) and exit")
    p.add_argument("--side-by-side", choices=["train", "infer"], help="tiles/s on every installed backend")
    p.add_argument("--quick", action="store_true", help="with --side-by-side: small sizes")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--measure", choices=["train", "infer"], help=argparse.SUPPRESS)
    p.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.download:
        cmd = download_command(a.download)
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        size = sum(f.stat().st_size for f in a.download.glob("*.whl"))
        print(f"{len(list(a.download.glob('*.whl')))} wheels, {size / 1e6:.1f} MB in {a.download}")
        return 0
    if a.result:  # a child: one backend
        res = measure_one(a.measure, a.backend, a.quick) if a.measure else measure(a.backend, a.cpu, a.budget_s)
        a.result.write_text(json.dumps(res))
        return 0
    if a.side_by_side:
        rows = side_by_side(a.side_by_side, a.quick)
        out = a.out if a.out != OUT else OUT.with_name(f"backends_{a.side_by_side}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"kind": a.side_by_side, "quick": a.quick, "results": rows}, indent=1))
        print(f"written {out}")
        return 0
    if a.wheels:
        install(a.wheels)
    t0 = time.perf_counter()
    backends = [b.strip() for b in a.backends.split(",")] if a.backends else (
        ["jax"] if a.cpu else [b for b in installed_backends()])
    results = []
    for i, b in enumerate(backends):
        share = (a.budget_s - (time.perf_counter() - t0)) / (len(backends) - i)
        args = ["--cpu"] * a.cpu + ["--budget-s", str(share)]
        print(f"=== {b}: {share:.0f} s of the budget", file=sys.stderr, flush=True)
        results.append(_child(args, b, share + 300))
    out = {"command": " ".join(["python -m benchmarks gpu"] + list(sys.argv[1:] if argv is None else argv)),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host_cpu": platform.processor() or platform.machine(),
           "cpu_rehearsal": a.cpu, "seconds": time.perf_counter() - t0, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    for r in results:
        tr = r.get("train_tiles_s", {})
        print(f"{r.get('backend')}: GPU {r.get('gpu') or '-'}; train tiles/s "
              + ", ".join(f"{k} {v:.2f}" for k, v in tr.items() if isinstance(v, float))
              + f"; inference {r.get('infer_tiles_s')}; scan {r.get('segment_scan')}; resume {r.get('resume')}"
              + (f"; skipped {r['skipped']}" if r.get("skipped") else "") + (f"; ERROR {r['error']}" if r.get("error")
                                                                               else ""))
    print(f"written {a.out} ({out['seconds']:.0f} s)")
    ok = all(not r.get("error") and (r.get("resume") or {}).get("ok", True) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
