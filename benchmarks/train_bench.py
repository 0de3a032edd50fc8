"""Training throughput of the MISIC U-Net (tiles/s): batch sizes x precision x input pipeline.

Pipelines: ``zarr`` is the real one (tf.data reading tiles from the training store, augmenting, batching,
prefetching); ``device`` feeds one batch already resident on the accelerator, the upper bound the model
itself allows. Their ratio shows how much the input pipeline costs; mixed/float32 shows what
``mixed_float16`` buys.

    python -m benchmarks.train_bench                       # GPU: batches 8 and 32, float32 and mixed
    python -m benchmarks.train_bench --quick               # CPU smoke run: tiny store, few steps
    python -m benchmarks.train_bench --store STORE --out results.json

Without ``--store`` a synthetic store of random tiles is written to a temporary folder (throughput does not
depend on the pixel values). Results are printed and written as JSON (default benchmarks/out/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

from hpc_retrain import store as st
from hpc_retrain.config import RunConfig

_F = namedtuple("_F", "well field source shape")


def synthetic_store(path: Path, n_tiles: int, size: int = 256) -> Path:
    cfg = RunConfig()
    # One field per tile: a field of (size - 2 margin)/scale px rescales to exactly one tile.
    px = int((size - 2 * cfg.tiling.margin) / cfg.preprocess.scale)
    ents = st.plan_fields([_F("A1", str(i), "bench", (px, px)) for i in range(n_tiles)], cfg.preprocess.scale,
                          size, cfg.tiling.margin)
    root = st.create(path, ents, cfg.to_dict(), size)
    rng = np.random.default_rng(0)
    n = sum(e.n_tiles for e in ents)
    root["targets"][:] = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    root["labels"][:] = (rng.random((n, size, size, 2)) < [0.25, 0.06]).astype(np.uint8)
    root["field_done"][:] = 1
    root["field_status"][:] = st.OK
    return path


def bench_one(store: Path, batch: int, mixed: bool, pipeline: str, steps: int, warmup: int) -> float:
    """Tiles per second over ``steps`` training steps after ``warmup`` (tracing, autotuning)."""
    import keras
    import tensorflow as tf

    from hpc_retrain import train as tr

    keras.backend.clear_session()
    cfg = RunConfig()
    net, _ = tr.build_model(cfg, mixed)
    opt = keras.optimizers.Adam(1e-3)
    if mixed:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    reader = tr.TileReader(store)
    train_step, _ = tr.make_steps(net, opt, np.array([3.0, 15.0]), reader.size)
    n_tiles = int(st.open_store(store)["targets"].shape[0])
    total = (steps + warmup) * batch
    order = np.resize(np.random.default_rng(1).permutation(n_tiles), total)
    codes = np.random.default_rng(2).integers(0, 8, total).astype(np.int32)
    if pipeline == "zarr":
        it = iter(tr.make_dataset(reader, order, codes, batch))
        batches = (next(it) for _ in range(steps + warmup))
    else:
        with tf.device("/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"):
            xs, ys = zip(*(reader.read(i) for i in order[:batch]))
            x = tf.identity(tf.constant(np.stack(xs)))
            y = tf.identity(tf.constant(np.stack(ys).astype(np.float32)))
        batches = ((x, y) for _ in range(steps + warmup))
    loss = None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if loss is not None:
                float(loss)  # drain queued work before the clock starts
            t0 = time.perf_counter()
        loss, _ = train_step(x, y)
    float(loss)
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="training store to read (default: a synthetic one)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,32; --quick: 2)")
    p.add_argument("--precisions", default=None,
                   help="float32 and/or mixed (default both; --quick on a CPU: float32, as float16 is emulated there)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="tiny settings that finish on a CPU in a minute or two")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "train_bench.json")
    a = p.parse_args(argv)
    batches = [int(b) for b in (a.batch_sizes or ("2" if a.quick else "8,32")).split(",")]
    steps = a.steps or (2 if a.quick else 20)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    precisions = [x.strip() for x in (a.precisions or ("float32" if a.quick and not gpus else "float32,mixed")).split(",")]
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else \
        f"CPU ({platform.processor() or platform.machine()})"
    with tempfile.TemporaryDirectory() as tmp:
        store = a.store or synthetic_store(Path(tmp) / "bench.zarr", 8 if a.quick else 64)
        rows = []
        for batch in batches:
            for prec in precisions:
                r = {"batch": batch, "precision": prec}
                for pipe in ("zarr", "device"):
                    r[pipe] = bench_one(store, batch, prec == "mixed", pipe, steps, warmup)
                    print(f"  batch {batch:3d} {prec:8s} {pipe:6s} {r[pipe]:8.2f} tiles/s", file=sys.stderr,
                          flush=True)
                rows.append(r)

    f32 = {r["batch"]: r for r in rows if r["precision"] == "float32"}
    print(f"\nMISIC U-Net training throughput on {device} (TF {tf.__version__}), {steps} timed steps")
    print(f"{'batch':>5} {'precision':>9} {'zarr t/s':>9} {'device t/s':>10} {'zarr/device':>11} "
          f"{'vs float32':>10}")
    for r in rows:
        base = f32.get(r["batch"])
        vs = f"{r['zarr'] / base['zarr']:.2f}x" if base and r["precision"] != "float32" else "-"
        print(f"{r['batch']:>5} {r['precision']:>9} {r['zarr']:>9.2f} {r['device']:>10.2f} "
              f"{r['zarr'] / r['device']:>11.2f} {vs:>10}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": device, "tensorflow": tf.__version__, "steps": steps,
                                 "warmup": warmup, "results": rows}, indent=1))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
