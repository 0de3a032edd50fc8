"""``hpc-retrain demo``: the whole workflow on a synthetic plate, locally, into one folder.

It runs the same commands a user runs (through ``commands.main``), so the demo cannot drift from the tool:
synthesize a training plate and a separate test plate, build the training store from the training plate
(labels from fluorescence with the pretrained MISIC, targets from brightfield), retrain, segment the test
plate's brightfield with the pretrained and with the retrained model, and score both against the true masks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hpc_retrain.commands.common import CliError, config_from_args

STOPPED = {128 + signal.SIGINT: "Ctrl-C", 128 + signal.SIGTERM: "SIGTERM"}  # a stage stopped by the user


class _Stopped(Exception):
    """A stage was stopped by the user: the demo stops with the stage's exit status."""


def demo_arguments(p: argparse.ArgumentParser, name: str = "demo") -> None:
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    # 6 x 16 batches of 8 tiles (plus a validation pass per epoch): about 7 minutes on 2 AVX-512 cores, 20-40 on
    # 2 AVX2 ones (benchmarks/RESULTS.md, 6 and 6c); more epochs train further (the best epoch by validation F1
    # is exported), 4 score 0.836 against 6's 0.901
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    p.add_argument("--size", type=int, default=512, help="field size in px (default 512)")
    p.add_argument("--fields", type=int, default=2, help="fields per well of the training plate (default 2)")
    p.add_argument("--steps", type=int, default=16, help="training batches per epoch (default 16; 0: all tiles)")
    p.add_argument("--modality", choices=["brightfield", "phase"], default="brightfield",
                   help="the plates' transmitted light: brightfield (default) or phase contrast (its channel "
                   "is named 'phase' and given to the tool as plate.phase)")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing output folder")


def demo_command(args: argparse.Namespace, main: Callable[[list[str]], int]) -> int:
    """The same commands a user runs (through the command line's ``main``), so the demo cannot drift from
    the tool. Stopped by the user (Ctrl-C, SIGTERM), it exits with the stopped stage's status."""
    try:
        return _demo(args, main)
    except _Stopped as e:
        return int(e.args[0])


def _demo(args: argparse.Namespace, main: Callable[[list[str]], int]) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite and (out / "summary.json").exists():
        raise CliError(f"{out}: holds a finished demo; pass --overwrite or choose another --out")
    # (an interrupted demo: every stage below resumes or skips what is done)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_args(args)
    if args.modality == "phase":
        # What a lab with phase contrast does: name its transmitted-light channel (config.ALIASES).
        cfg = cfg.updated(plate__phase="phase")
    # Synthetic cells are 7 px wide (the config's default mean width); the run's config goes beside it.
    cfg_path = cfg.save(out)
    common = ["--config", str(cfg_path)]
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, argv: list[str]) -> None:
        print(f"\n--- demo: {name}: hpc-retrain {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        rc = main(argv)
        timings[name] = round(time.perf_counter() - t, 1)
        if rc in STOPPED:  # Ctrl-C or SIGTERM: what was finished is kept (train saved a checkpoint)
            print(f"hpc-retrain demo: stopped during {name!r} ({STOPPED[rc]}); run the same demo command to "
                  f"continue from where it stopped", file=sys.stderr)
            raise _Stopped(rc)
        if rc:
            raise CliError(f"demo step {name!r} failed (exit {rc}); see the messages above")

    train_plate, test_plate = out / "train_plate.zarr", out / "test_plate.zarr"
    size = str(args.size)
    synth_opts = ["--size", size, "--modality", args.modality]
    if not train_plate.exists():
        step("synth train", ["synth", *common, "--out", str(train_plate), "--wells", "A1,A2,B1",
                             "--fields", str(args.fields), *synth_opts, "--seed", "1"])
    if not test_plate.exists():
        step("synth test", ["synth", *common, "--out", str(test_plate), "--wells", "C1",
                            "--fields", "2", *synth_opts, "--seed", "2"])
    store = out / "train.zarr"
    step("prepare", ["prepare", *common, "--plate", str(train_plate), "--out", str(store)])
    run = out / "run"
    # Inline, not the local job `train` submits by default: the demo is one command, so stopping it (Ctrl-C,
    # SIGTERM) stops its training too (with a checkpoint, resumed by the next demo), where a submitted job would
    # go on training after the demo had gone.
    train_argv = ["train", *common, "--store", str(store), "--run", str(run), "--epochs", str(args.epochs),
                  "--executor", "inline"]
    if args.steps:  # exactly this many batches an epoch, of tiles that go round again as needed
        train_argv += ["--set", f"train.steps_per_epoch={args.steps}",
                       "--set", f"train.tiles_per_epoch={args.steps * cfg.train.batch_size}"]
    step("train", train_argv)  # with the tool's defaults: the recipe is chosen from the store (training.recipe)
    recipe = json.loads((run / "metrics.json").read_text()).get("recipe") or {}
    for name, model in (("pretrained", []), ("retrained", ["--model", str(run)])):
        step(f"segment {name}", ["segment", *common, "--plate", str(test_plate), "--name", name, *model,
                                 "--overwrite"])
    scores = {}
    for name in ("pretrained", "retrained"):
        step(f"evaluate {name}", ["evaluate", *common, "--pred", str(test_plate), "--name", name,
                                  "--ref", "truth", "--out", str(out / "evaluation")])
        scores[name] = json.loads((out / "evaluation" / f"scores_{name}.json").read_text())
    summary = summary_text(scores, timings, time.perf_counter() - t0, recipe, args.modality)
    (out / "summary.json").write_text(json.dumps({"scores": {k: v.get("overall") for k, v in scores.items()},
                                                  "timings_s": timings, "recipe": recipe,
                                                  "modality": args.modality}, indent=1))
    (out / "summary.txt").write_text(summary)
    print("\n" + summary)
    return 0


def f1_at_half(score: dict) -> float:
    return next(r["f1"] for r in score["overall"] if r["threshold"] == 0.5)


def summary_text(scores: dict, timings: dict, total: float, recipe: dict | None = None,
                 modality: str = "brightfield") -> str:
    what = "phase-contrast" if modality == "phase" else "brightfield"
    lines = [f"hpc-retrain demo: {what} segmentation of held-out synthetic fields vs their true masks", ""]
    lines.append(f"{'model':<11} {'F1@0.5':>7} {'AP@0.5':>7} {'AP@0.75':>8} {'mean IoU':>9}")
    for name, s in scores.items():
        o = {row["threshold"]: row for row in s["overall"]}
        lines.append(f"{name:<11} {o[0.5]['f1']:>7.3f} {o[0.5]['ap']:>7.3f} {o[0.75]['ap']:>8.3f} "
                     f"{o[0.5]['mean_iou']:>9.3f}")
    pre, post = (f1_at_half(scores[k]) for k in ("pretrained", "retrained"))
    verdict = "wins" if post > pre else "does NOT win"
    lines += ["", f"retraining {verdict}: F1 at IoU 0.5 {pre:.3f} -> {post:.3f} ({post - pre:+.3f})"]
    if recipe:
        lines.append(f"training recipe: the tool's defaults, chosen from the store: cells on "
                     f"{recipe['body_fraction']:.1%} of the pixels ({recipe['regime']}): lr {recipe['learning_rate']:g}, "
                     f"class weights {[round(w, 2) for w in recipe['pos_weight']]}")
    lines += ["", "time per step (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
              f"total {total:.0f} s"]
    return "\n".join(lines) + "\n"
