"""Training throughput of the MISIC U-Net (tiles/s): batch sizes x precision x input pipeline.

Pipelines: ``zarr`` is the real one (the threaded tile loader reading tiles from the training store, augmenting,
batching, prefetching); ``device`` feeds one batch already resident on the accelerator, the upper bound the model
itself allows. Their ratio shows how much the input pipeline costs; mixed/float32 shows what
``mixed_float16`` buys on a GPU, bfloat16/float32 what ``mixed_bfloat16`` buys on a CPU that has it natively
(training's ``train.mixed_precision: on`` picks it there).

    python -m benchmarks.train_bench                       # GPU: batches 8 and 32, float32 and mixed
    python -m benchmarks.train_bench --quick               # CPU smoke run: tiny store, few steps
    python -m benchmarks.train_bench --parts precision --steps 3 --reps 3   # float32 vs the `on` policy, alternating
    python -m benchmarks.train_bench --store STORE --out results.json

Without ``--store`` a synthetic store of random tiles is written to a temporary folder (throughput does not
depend on the pixel values). Results are printed and written as JSON (default benchmarks/out/).

Efficiency (top level of the JSON): one float32 model at the training default batch (``train.batch_size``),
and in the same process, alternating repetition by repetition so a change in machine load hits every side:
bare inference (``infer.Predictor`` on TensorFlow, at that batch and at ``compute.batch_size``) and the training
step on the same tiles. A training step is ~3x a forward pass's FLOPs (forward + backward to activations and
weights), so ``efficiency = 3 x train tiles/s / inference tiles/s`` (1.0: training runs its FLOPs as fast as
inference does); ``efficiency`` uses the real Zarr pipeline, ``efficiency_device`` the in-memory batch, both on
the wall clock; ``efficiency_cpu`` and ``efficiency_device_cpu`` are the same on the process's CPU time, which
other jobs on the machine barely move. Where the rest goes (``efficiency_detail.wall`` / ``.cpu``: seconds per
tile and share of the step), from cumulative cuts of the same step on the in-memory batch: the forward in
training mode (batch-statistics BatchNorm, Dropout), + the loss, + the gradients (no update), the full step
(+ Adam's update and the accuracy), and the Zarr pipeline on top. ``--xla`` also times the same step compiled
with XLA (``tf.function(jit_compile=True)``), a candidate lever.

    python -m benchmarks.train_bench --quick               # ~3 min on 2 CPU cores: table at batch 2, efficiency at 8
    python -m benchmarks.train_bench --parts efficiency --steps 10 --warmup 1 --reps 3 --xla  # RESULTS.md, 8
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

from hpc_retrain.config import RunConfig
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st

_F = namedtuple("_F", "well field source shape")


def synthetic_store(path: Path, n_tiles: int, size: int = 256) -> Path:
    cfg = RunConfig()
    if cfg.preprocess.mean_width == "auto":  # nothing to measure in random tiles: MISIC's native 10 px cells
        cfg = cfg.updated(preprocess__mean_width=10.0)
    # One field per tile: a field of (size - 2 margin)/scale px rescales to exactly one tile.
    px = int((size - 2 * cfg.tiling.margin) / cfg.preprocess.scale)
    ents = layout.plan_fields([_F("A1", str(i), "bench", (px, px)) for i in range(n_tiles)], cfg.preprocess.scale,
                          size, cfg.tiling.margin)
    root = st.create(path, ents, cfg.to_dict(), size)
    rng = np.random.default_rng(0)
    n = sum(e.n_tiles for e in ents)
    root["targets"][:] = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    root["labels"][:] = (rng.random((n, size, size, 2)) < [0.25, 0.06]).astype(np.uint8)
    root["field_done"][:] = 1
    root["field_status"][:] = layout.OK
    return path


POLICIES = {"float32": "float32", "mixed": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def bench_one(store: Path, batch: int, precision: str, pipeline: str, steps: int, warmup: int) -> float:
    """Tiles per second over ``steps`` training steps after ``warmup`` (tracing, autotuning)."""
    import keras
    import tensorflow as tf

    from hpc_retrain.training import loop as tr

    keras.backend.clear_session()
    cfg = RunConfig()
    net, _ = tr.build_model(cfg, POLICIES[precision])
    opt = tr.make_optimizer(1e-3, POLICIES[precision])
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


def _cuts(net, opt, pos_w, size: int, xla: bool) -> dict:
    """Cumulative cuts of ``train.make_steps``' training step (same model, loss and optimizer), as compiled
    functions of (x, y): what each adds to the step is the difference to the previous one. Every cut returns
    what it computed (the gradients too), so graph pruning cannot drop work."""
    import tensorflow as tf

    from hpc_retrain.training import network as nw

    w = tf.constant(pos_w, tf.float32)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None, size, size, 2), tf.float32))

    @tf.function(input_signature=spec)
    def forward_train(x, y):
        return tf.reduce_mean(net(x, training=True))

    @tf.function(input_signature=spec)
    def forward_loss(x, y):
        return nw.weighted_bce(y, net(x, training=True), w)

    @tf.function(input_signature=spec)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = nw.weighted_bce(y, net(x, training=True), w)
            scaled = opt.scale_loss(loss)
        return loss, tape.gradient(scaled, net.trainable_variables)

    def step_xla(x, y):  # make_steps' train_step, body unchanged, compiled with XLA
        with tf.GradientTape() as tape:
            p = net(x, training=True)
            loss = nw.weighted_bce(y, p, w)
            scaled = opt.scale_loss(loss)
        grads = tape.gradient(scaled, net.trainable_variables)
        opt.apply(grads, net.trainable_variables)
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.cast(p, tf.float32) >= 0.5, y >= 0.5), tf.float32))
        return loss, acc

    cuts = {"forward_train": forward_train, "forward_loss": forward_loss, "gradients": gradients}
    if xla:
        cuts["step_xla"] = tf.function(step_xla, input_signature=spec, jit_compile=True)
    return cuts


def _block(out) -> None:
    """Wait for a step's results (a tensor, or a tuple whose first item is one; the training step returns
    Python floats, already waited for)."""
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, float):
        float(first.numpy().ravel()[0])


def efficiency(store: Path, batch: int, infer_batch: int, steps: int, warmup: int, reps: int,
               xla: bool = False) -> dict:
    """Training vs bare inference tiles/s, same float32 model and tiles, alternating; plus the breakdown."""
    import keras
    import tensorflow as tf

    from hpc_retrain.inference.predictor import Predictor
    from hpc_retrain.training import loop as tr

    warmup = max(warmup, 1)  # the Zarr side's pipeline fill is one untimed step
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    cfg = RunConfig()
    net, _ = tr.build_model(cfg, "float32")
    opt = keras.optimizers.Adam(1e-4)  # a speed benchmark: any rate times the same
    opt.build(net.trainable_variables)
    reader = tr.TileReader(store)
    pos_w = np.array([3.0, 15.0])
    train_step, _ = tr.make_steps(net, opt, pos_w, reader.size)
    n_tiles = int(st.open_store(store)["targets"].shape[0])
    total = (steps + warmup) * batch
    order = np.resize(np.random.default_rng(1).permutation(n_tiles), total)
    codes = np.random.default_rng(2).integers(0, 8, total).astype(np.int32)
    timed = order[warmup * batch:]  # the tiles the timed training steps see
    tiles = np.stack([reader.read(i)[0] for i in timed])  # inference: the very same tiles
    xs, ys = zip(*(reader.read(i) for i in order[:batch]))
    x, y = tf.constant(np.stack(xs)), tf.constant(np.stack(ys).astype(np.float32))
    predictors = {b: Predictor(net, b, reader.size, engine="tensorflow") for b in dict.fromkeys((batch, infer_batch))}
    cuts = _cuts(net, opt, pos_w, reader.size, xla)

    def clocks(t0: float, c0: float, n: int) -> dict:
        return {"wall": n / (time.perf_counter() - t0), "cpu": n / (time.process_time() - c0)}

    def run_train(fn, pipeline: str, warm: int) -> dict:
        if pipeline == "zarr":  # a fresh pipeline, as every epoch makes one; its fill is in the untimed step(s)
            it = iter(tr.make_dataset(reader, order[(warmup - warm) * batch:], codes[(warmup - warm) * batch:],
                                      batch))
        else:
            it = iter(lambda: (x, y), None)
        for _ in range(warm):
            _block(fn(*next(it)))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            out = fn(*next(it))
        _block(out)
        return clocks(t0, c0, steps * batch)

    def run_infer(pred, warm: int) -> dict:
        if warm:
            pred(tiles[:pred.batch_size])
        t0, c0 = time.perf_counter(), time.process_time()
        pred(tiles)
        return clocks(t0, c0, len(tiles))

    sides = {f"inference_b{b}": (lambda w, p=p: run_infer(p, w)) for b, p in predictors.items()}
    sides.update({name: (lambda w, f=f: run_train(f, "device", w)) for name, f in cuts.items()})
    sides["train_device"] = lambda w: run_train(train_step, "device", w)
    sides["train_zarr"] = lambda w: run_train(train_step, "zarr", max(w, 1))
    raw: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(reps):  # alternating (reversed every other rep): a change in machine load hits every side
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            raw[name].append(sides[name](warmup if r == 0 else 0))
            print(f"  efficiency rep {r + 1}/{reps}: {name:16s} {raw[name][-1]['wall']:7.3f} tiles/s "
                  f"({raw[name][-1]['cpu']:.3f} per CPU-s)", file=sys.stderr, flush=True)
    res = summarize(raw, batch, infer_batch, xla)
    res.update(steps=steps, warmup=warmup, reps=reps, tiles=int(len(tiles)))
    return res


def summarize(raw: dict[str, list[dict]], batch: int, infer_batch: int, xla: bool) -> dict:
    """Efficiencies and the breakdown from each side's repetitions ({"wall": tiles/s, "cpu": tiles/CPU-s})."""
    inf_key, inf_default_key = f"inference_b{batch}", f"inference_b{infer_batch}"
    res: dict = {"batch": batch, "infer_batch": infer_batch, "precision": "float32", "xla": xla}
    for clock in ("wall", "cpu"):
        med = {k: float(np.median([d[clock] for d in v])) for k, v in raw.items()}
        spt = {k: 1 / v for k, v in med.items()}  # seconds (wall or CPU) per tile of each side
        # What each cut adds: the difference to the previous one (they sum to the Zarr step's time).
        parts = {"inference_forward": spt[inf_key],
                 "training_mode_forward": spt["forward_train"] - spt[inf_key],
                 "loss": spt["forward_loss"] - spt["forward_train"],
                 "backward": spt["gradients"] - spt["forward_loss"],
                 "optimizer_update_and_accuracy": spt["train_device"] - spt["gradients"],
                 "input_pipeline": spt["train_zarr"] - spt["train_device"]}
        sfx = "" if clock == "wall" else "_cpu"
        res[f"efficiency{sfx}"] = 3 * med["train_zarr"] / med[inf_key]
        res[f"efficiency_device{sfx}"] = 3 * med["train_device"] / med[inf_key]
        res[f"efficiency_vs_infer_default_batch{sfx}"] = 3 * med["train_zarr"] / med[inf_default_key]
        if xla:
            res[f"efficiency_xla_device{sfx}"] = 3 * med["step_xla"] / med[inf_key]
            res[f"xla_speedup_device{sfx}"] = med["step_xla"] / med["train_device"]
        res[clock] = {"tiles_s" if clock == "wall" else "tiles_per_cpu_s": med,
                      "seconds_per_tile": parts,
                      "share_of_step": {k: v / spt["train_zarr"] for k, v in parts.items()},
                      "backward_over_inference_forward": parts["backward"] / spt[inf_key],
                      "step_over_3x_inference_forward": spt["train_zarr"] / (3 * spt[inf_key])}
    wall = res["wall"]["tiles_s"]
    res["train_tiles_s"] = {"zarr": wall["train_zarr"], "device": wall["train_device"]}
    res["inference_tiles_s"] = {f"batch {b}": wall[f"inference_b{b}"] for b in dict.fromkeys((batch, infer_batch))}
    # Cores busy per side (CPU-s / wall-s): a side that leaves a core idle shows it, on a quiet machine.
    res["cores_busy"] = {k: wall[k] / res["cpu"]["tiles_per_cpu_s"][k] for k in raw}
    res["raw"] = raw
    return res


def efficiency_table(e: dict) -> str:
    w, c = e["wall"], e["cpu"]
    inf = ", ".join(f"{k} {v:.3f}" for k, v in e["inference_tiles_s"].items())
    xla = lambda sfx: (f"; XLA step (in memory) {e['efficiency_xla_device' + sfx]:.2f} "  # noqa: E731
                       f"(x{e['xla_speedup_device' + sfx]:.2f})") if e["xla"] else ""
    out = [f"Training vs bare inference (TensorFlow, float32, same model and {e['tiles']} tiles, batch {e['batch']}; "
           f"medians of {e['reps']} alternating reps of {e['steps']} steps)",
           f"  inference tiles/s: {inf}; training tiles/s: Zarr {e['train_tiles_s']['zarr']:.3f}, "
           f"in memory {e['train_tiles_s']['device']:.3f}",
           f"  efficiency = 3 x train / inference, wall clock: {e['efficiency']:.2f} (Zarr pipeline), "
           f"{e['efficiency_device']:.2f} (in memory){xla('')}",
           f"  the same on CPU time (robust to other jobs): {e['efficiency_cpu']:.2f} (Zarr), "
           f"{e['efficiency_device_cpu']:.2f} (in memory){xla('_cpu')}",
           "  where a training step's time goes (per tile; share of the Zarr step):",
           f"    {'':30s} {'wall s':>8} {'share':>7} {'CPU s':>8} {'share':>7}"]
    for k in w["seconds_per_tile"]:
        out.append(f"    {k:30s} {w['seconds_per_tile'][k]:8.3f} {w['share_of_step'][k]:7.1%} "
                   f"{c['seconds_per_tile'][k]:8.3f} {c['share_of_step'][k]:7.1%}")
    out.append(f"  backward / inference forward (FLOPs ~2): wall {w['backward_over_inference_forward']:.2f}, "
               f"CPU {c['backward_over_inference_forward']:.2f}; cores busy: "
               + ", ".join(f"{k} {v:.2f}" for k, v in e["cores_busy"].items()))
    return "\n".join(out)


def precision_speedup(store: Path, batch: int, policy: str, steps: int, warmup: int, reps: int) -> dict:
    """The training step in float32 and in ``policy`` (what ``train.mixed_precision: on`` picks here), same
    in-memory batch, alternating repetition by repetition; speed-ups on the wall clock and on CPU time."""
    import keras
    import tensorflow as tf

    from hpc_retrain.training import loop as tr

    keras.backend.clear_session()
    reader = tr.TileReader(store)
    n_tiles = int(reader.targets.shape[0])
    xs, ys = zip(*(reader.read(i % n_tiles) for i in range(batch)))
    x, y = tf.constant(np.stack(xs)), tf.constant(np.stack(ys).astype(np.float32))
    steps_by = {}
    for pol in ("float32", policy):
        net, _ = tr.build_model(RunConfig(), pol)
        steps_by[pol] = tr.make_steps(net, tr.make_optimizer(1e-4, pol), np.array([3.0, 15.0]), reader.size)[0]
        for _ in range(max(warmup, 1)):
            float(steps_by[pol](x, y)[0])
    wall = {p: [] for p in steps_by}
    cpu = {p: [] for p in steps_by}
    for _ in range(reps):
        for pol, step in steps_by.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                loss = step(x, y)[0]
            float(loss)
            wall[pol].append((time.perf_counter() - t) / steps)
            cpu[pol].append((time.process_time() - c) / steps)
    med = {p: (float(np.median(wall[p])), float(np.median(cpu[p]))) for p in steps_by}
    return {"policy": policy, "batch": batch, "steps": steps, "reps": reps,
            "s_per_step": {p: {"wall": w, "cpu": c} for p, (w, c) in med.items()},
            "speedup": med["float32"][0] / med[policy][0], "speedup_cpu": med["float32"][1] / med[policy][1]}


def main(argv: list[str] | None = None) -> int:
    from hpc_retrain.config import ComputeConfig, TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="training store to read (default: a synthetic one)")
    p.add_argument("--parts", default="table,efficiency",
                   help="table (batch sizes x precisions x pipelines), efficiency and/or precision (the "
                   "training step in float32 vs the policy `train.mixed_precision: on` picks here, alternating; "
                   "default table,efficiency)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,32; --quick: 2)")
    p.add_argument("--precisions", default=None,
                   help="float32, mixed (float16) and/or bfloat16 (default on a GPU: float32,mixed; on a CPU: "
                   "float32, and bfloat16 where the CPU has it natively, as training does)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick: 1)")
    p.add_argument("--efficiency-batch", type=int, default=TrainConfig().batch_size,
                   help="batch of the efficiency measurement (default: train.batch_size, %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions of the efficiency sides "
                   "(default 3; --quick: 1)")
    p.add_argument("--xla", action="store_true", help="also time the training step compiled with XLA")
    p.add_argument("--quick", action="store_true", help="tiny settings that finish on a CPU in a few minutes")
    p.add_argument("--smoke", action="store_true", help="every part once at the smallest sizes (a test that the "
                   "benchmark runs; its figures mean nothing)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "train_bench.json")
    a = p.parse_args(argv)
    if a.smoke:
        a.quick, a.parts, a.efficiency_batch = True, "table,efficiency,precision", 2
        if a.out == p.get_default("out"):  # the figures of a smoke run replace no real result
            a.out = Path(tempfile.gettempdir()) / "hpc-retrain-bench-smoke" / "train_bench.json"
        a.precisions = a.precisions or "float32"  # the other policy is timed by the precision part
        a.steps, a.warmup, a.reps = a.steps or 1, a.warmup if a.warmup is not None else 0, a.reps or 1
    parts = {x.strip() for x in a.parts.split(",")}
    batches = [int(b) for b in (a.batch_sizes or ("2" if a.quick else "8,32")).split(",")]
    steps = a.steps or (2 if a.quick else 20)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)
    reps = a.reps or (1 if a.quick else 3)

    from hpc_retrain.inference.model import import_tensorflow

    tf = import_tensorflow()  # without TensorFlow's native start-up lines, as the CLI

    gpus = tf.config.list_physical_devices("GPU")
    from hpc_retrain.training.network import cpu_has_native_bfloat16

    cpu_default = "float32,bfloat16" if cpu_has_native_bfloat16() else "float32"
    precisions = [x.strip() for x in (a.precisions or ("float32,mixed" if gpus else cpu_default)).split(",")]
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else \
        f"CPU ({platform.processor() or platform.machine()})"
    rows, eff, speed = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        store = a.store or synthetic_store(Path(tmp) / "bench.zarr", 2 if a.smoke else 8 if a.quick else 64)
        if "table" in parts:
            for batch in batches:
                for prec in precisions:
                    r = {"batch": batch, "precision": prec}
                    for pipe in ("zarr", "device"):
                        r[pipe] = bench_one(store, batch, prec, pipe, steps, warmup)
                        print(f"  batch {batch:3d} {prec:8s} {pipe:6s} {r[pipe]:8.2f} tiles/s", file=sys.stderr,
                              flush=True)
                    rows.append(r)
        if "efficiency" in parts:
            eff = efficiency(store, a.efficiency_batch, 2 if a.smoke else ComputeConfig().batch_size, steps, warmup,
                             reps, a.xla)
        if "precision" in parts:
            from hpc_retrain.training.network import precision_policy

            # smoke: batch 1 (where bfloat16 is emulated, each step of batch 2 takes ~40 s on 2 cores)
            speed = precision_speedup(store, 1 if a.smoke else a.efficiency_batch, precision_policy("on"), steps,
                                      warmup, reps)

    if rows:
        f32 = {r["batch"]: r for r in rows if r["precision"] == "float32"}
        print(f"\nMISIC U-Net training throughput on {device} (TF {tf.__version__}), {steps} timed steps")
        print(f"{'batch':>5} {'precision':>9} {'zarr t/s':>9} {'device t/s':>10} {'zarr/device':>11} "
              f"{'vs float32':>10}")
        for r in rows:
            base = f32.get(r["batch"])
            vs = f"{r['zarr'] / base['zarr']:.2f}x" if base and r["precision"] != "float32" else "-"
            print(f"{r['batch']:>5} {r['precision']:>9} {r['zarr']:>9.2f} {r['device']:>10.2f} "
                  f"{r['zarr'] / r['device']:>11.2f} {vs:>10}")
    out = {"device": device, "tensorflow": tf.__version__, "command": " ".join(["python -m benchmarks.train_bench"]
           + list(sys.argv[1:] if argv is None else argv)), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "steps": steps, "warmup": warmup, "results": rows}
    if eff is not None:
        print("\n" + efficiency_table(eff))
        out.update({k: eff[k] for k in ("efficiency", "efficiency_device", "efficiency_cpu", "efficiency_device_cpu",
                                        "train_tiles_s", "inference_tiles_s")},
                   efficiency_batch=eff["batch"], efficiency_detail=eff)
    if speed is not None:
        sp = speed["s_per_step"]
        print(f"\ntraining step, batch {speed['batch']}: float32 {sp['float32']['wall']:.2f} s, {speed['policy']} "
              f"{sp[speed['policy']]['wall']:.2f} s: {speed['speedup']:.2f}x ({speed['speedup_cpu']:.2f}x in CPU time)")
        out.update(precision_speedup=speed["speedup"], precision_speedup_cpu=speed["speedup_cpu"],
                   precision_detail=speed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
