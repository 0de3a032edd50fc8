"""Run the benchmarks: ``python -m benchmarks all --quick`` (or name some: ``python -m benchmarks infer``).

Each benchmark is its own module, runs in its own process (so peak-memory figures do not mix), prints its
table with ratios measured side by side, and writes JSON under benchmarks/out/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCHES = {
    "prepare": "benchmarks.prepare_bench",  # labels + targets: fields/s, workers scaling, peak RSS by scan size
    "infer": "benchmarks.infer_bench",  # segment vs the MISIC reference: MP/s, peak RSS by scan size
    "train": "benchmarks.train_bench",  # training tiles/s: Zarr vs in-memory; efficiency vs bare inference
    "gpu": "benchmarks.gpu_bench",  # the GPU check on every installed Keras backend (--cpu: its rehearsal here)
}
# With --quick these also report every installed Keras backend side by side (benchmarks.gpu_bench --side-by-side).
SIDE_BY_SIDE = {"train", "infer"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("which", nargs="*", default=["all"], help=f"all or any of {', '.join(BENCHES)}")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one repetition: that every benchmark runs to its end (figures meaningless)")
    p.add_argument("--cpu", action="store_true", help="gpu: the CPU rehearsal (tiny sizes, no GPU)")
    args, rest = p.parse_known_args(argv)  # the rest goes to the gpu check (--wheels DIR, --backends ...)
    if rest and args.which != ["gpu"]:
        p.error(f"unrecognized arguments: {' '.join(rest)} (only `gpu` takes more options)")
    # TensorFlow's native start-up lines (cuInit, oneDNN) are noise in a benchmark's output too; -v-like
    # detail is kept when the caller exported its own TF_CPP_MIN_LOG_LEVEL.
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    names = [n for n in BENCHES if n != "gpu"] if "all" in args.which else args.which  # gpu: named, on its machine
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    failed = []
    for name in names:
        print(f"\n=== {name} ({BENCHES[name]}) ===", flush=True)
        t = time.perf_counter()
        if name == "gpu":
            rc = subprocess.call([sys.executable, "-m", BENCHES[name]] + (["--cpu"] if args.cpu else []) + rest,
                                 env=env)
        else:
            flags = (["--quick"] if args.quick else []) + (["--smoke"] if args.smoke else [])
            rc = subprocess.call([sys.executable, "-m", BENCHES[name]] + flags, env=env)
        if not rc and args.quick and not args.smoke and name in SIDE_BY_SIDE:
            rc = subprocess.call([sys.executable, "-m", BENCHES["gpu"], "--side-by-side", name, "--quick"], env=env)
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
