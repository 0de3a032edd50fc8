"""``hpc-retrain demo``: the whole workflow on a synthetic plate, locally, into one folder (``hpc_retrain.demo``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hpc_retrain import demo as D
from hpc_retrain.commands.common import CliError, config_from_args


def demo_arguments(p: argparse.ArgumentParser, name: str = "demo") -> None:
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    # 4 x 8 batches of 8 tiles (plus a validation pass per epoch): the whole demo takes about 4 minutes on 2
    # quiet CPU cores; more epochs train further (the best epoch by validation F1 is exported)
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--size", type=int, default=512, help="field size in px (default 512)")
    p.add_argument("--fields", type=int, default=2, help="fields per well of the training plate (default 2)")
    p.add_argument("--steps", type=int, default=8, help="training batches per epoch (default 8; 0: all tiles)")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing output folder")


def demo_command(args: argparse.Namespace) -> int:
    """The same commands a user runs (through :func:`main`), so the demo cannot drift from the tool."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite and (out / "summary.json").exists():
        raise CliError(f"{out}: holds a finished demo; pass --overwrite or choose another --out")
    # (an interrupted demo: every stage below resumes or skips what is done)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_args(args)
    # Synthetic cells are 7 px wide (the config's default mean width); the run's config goes beside it.
    cfg_path = cfg.save(out)
    common = ["--config", str(cfg_path)]
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    from hpc_retrain.commands import main  # the package imports this module: main exists once it runs

    def step(name: str, argv: list[str]) -> None:
        print(f"\n--- demo: {name}: hpc-retrain {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        rc = main(argv)
        timings[name] = round(time.perf_counter() - t, 1)
        if rc:
            raise CliError(f"demo step {name!r} failed (exit {rc}); see the messages above")

    train_plate, test_plate = out / "train_plate.zarr", out / "test_plate.zarr"
    size = str(args.size)
    if not train_plate.exists():
        step("synth train", ["synth", *common, "--out", str(train_plate), "--wells", "A1,A2,B1",
                             "--fields", str(args.fields), "--size", size, "--seed", "1"])
    if not test_plate.exists():
        step("synth test", ["synth", *common, "--out", str(test_plate), "--wells", "C1",
                            "--fields", "2", "--size", size, "--seed", "2"])
    store = out / "train.zarr"
    step("prepare", ["prepare", *common, "--plate", str(train_plate), "--out", str(store)])
    run = out / "run"
    train_argv = ["train", *common, "--store", str(store), "--run", str(run), "--epochs", str(args.epochs)]
    if args.steps:
        train_argv += ["--set", f"train.steps_per_epoch={args.steps}"]
    step("train", train_argv)
    for name, model in (("pretrained", []), ("retrained", ["--model", str(run)])):
        step(f"segment {name}", ["segment", *common, "--plate", str(test_plate), "--name", name, *model,
                                 "--overwrite"])
    scores = {}
    for name in ("pretrained", "retrained"):
        step(f"evaluate {name}", ["evaluate", *common, "--pred", str(test_plate), "--name", name,
                                  "--ref", "truth", "--out", str(out / "evaluation")])
        scores[name] = json.loads((out / "evaluation" / f"scores_{name}.json").read_text())
    summary = D._summary(scores, timings, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps({"scores": {k: v.get("overall") for k, v in scores.items()},
                                                  "timings_s": timings}, indent=1))
    (out / "summary.txt").write_text(summary)
    print("\n" + summary)
    return 0

