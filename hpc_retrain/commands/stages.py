"""The stage commands: options and a few lines around each library entry point (``hpc_retrain.api``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from hpc_retrain import api
from hpc_retrain.commands.common import CliError, config_from_args
from hpc_retrain.config import CHANNELS, MODALITIES, MODES, RunConfig
from hpc_retrain.errors import HpcRetrainError, JobFailed, TrainingInterrupted
from hpc_retrain.io.runfolder import CONFIG_FILE

# Other names of the transmitted-light channel (config.ALIASES): phase contrast is segmented as brightfield is.
TRANSMITTED = ("phase", "transmitted")


# ------------------------------------------------------------------------------------------ synth
def synth_arguments(p: argparse.ArgumentParser, name: str = "synth") -> None:
    p.add_argument("--out", required=True, help="plate to write (a folder; .zarr for OME-Zarr)")
    p.add_argument("--format", choices=["ome-zarr", "tiff"], default=None,
                   help="default: ome-zarr when --out ends in .zarr, else tiff")
    p.add_argument("--wells", default="A1,A2", help="comma-separated wells (default A1,A2)")
    p.add_argument("--fields", type=int, default=2, help="fields per well (default 2)")
    p.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX", help="field size: N or H W")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    p.add_argument("--mean-width", type=float, default=None,
                   help="cell width in px (default: the config's preprocess.mean_width; 7 when that is auto)")
    p.add_argument("--density", type=float, default=0.3, help="fraction of the field covered by cells")
    p.add_argument("--modality", choices=MODALITIES, default="brightfield",
                   help="the transmitted-light channel: brightfield (cells dark, a dark envelope between "
                   "touching cells; channel 'brightfield') or phase contrast (dark cells with a bright halo; "
                   "channel 'phase', read with --set plate.phase=phase). Default brightfield")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plate at --out")


def synth_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, **{"preprocess.mean_width": args.mean_width, "seed": args.seed})
    out = Path(args.out)
    occupied = any(out.iterdir()) if out.is_dir() else out.exists() or out.is_symlink()
    if occupied:
        if not args.overwrite:
            raise CliError(f"{out}: already exists; choose another --out or pass --overwrite")
        # --overwrite replaces only a plate synth wrote: never a file, a folder of other things, or the
        # folder this command runs in.
        if not out.is_dir() or out.is_symlink():
            raise CliError(f"{out}: exists and is not a folder; --overwrite replaces only a plate synth wrote: "
                           f"choose another --out")
        if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise CliError(f"{out}: is the working folder (or holds it); --overwrite never deletes it: choose "
                           f"another --out")
        problem = api.synth_plate_problem(out)
        if problem:
            raise CliError(f"{out}: is not a plate synth wrote ({problem}); --overwrite replaces only those, "
                           f"nothing was deleted: choose another --out")
    fmt = args.format or ("ome-zarr" if out.suffix == ".zarr" else "tiff")
    shape = tuple(args.size * 2 if len(args.size) == 1 else args.size[:2])
    wells = [w.strip() for w in args.wells.split(",") if w.strip()]
    # Written under a temporary name beside --out and renamed into place once whole: bad parameters, a full
    # disk or a kill leave neither a partial plate that blocks the rerun nor a deleted old one.
    tmp = out.with_name(f".{out.name}.synth-tmp-{os.getpid()}")
    try:
        api.synth(tmp, cfg, fmt=fmt, wells=wells, fields_per_well=args.fields, shape=shape, density=args.density,
                  modality=args.modality)
        if occupied:
            shutil.rmtree(out)
        os.replace(tmp, out)
    except HpcRetrainError as e:  # synth's parameter errors name the temporary plate: name --out
        raise CliError(str(e).replace(str(tmp), str(out))) from None
    except OSError as e:
        raise CliError(f"{out}: cannot write the plate ({e.strerror or e}{f': {e.filename}' if e.filename else ''})"
                       f"; choose another --out or fix its permissions or free space".replace(str(tmp), str(out))
                       ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {fmt} {args.modality} plate {out}: {len(wells)} wells x {args.fields} fields of "
          f"{shape[0]}x{shape[1]} px")
    return 0


# ------------------------------------------------------------------------------------------ labels, targets, prepare
def prepare_arguments(p: argparse.ArgumentParser, name: str = "prepare") -> None:
    what = {"labels": "labels, probabilities and label QC", "targets": "target tiles",
            "prepare": "labels and targets"}[name]
    p.add_argument("--plate", type=Path, help="TIFF folder or OME-Zarr HCS plate (default: plate.path)")
    p.add_argument("--out", type=Path, metavar="STORE",
                   help=f"training store to fill with {what} (default: ./<plate name>.train.zarr); "
                   "the QC table is written beside it as <store>.qc.csv")
    p.add_argument("--workers", type=int, help="local Dask worker processes (default: cluster.workers; "
                   "1 runs in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="use a running Dask scheduler, e.g. tcp://host:8786 "
                   "(its workers must see the plate and the store at the same paths)")
    p.add_argument("--mean-width", type=mean_width_arg, metavar="PX|auto",
                   help="mean cell width in pixels, or auto: measured from the fluorescence and saved in "
                   "the store (default: preprocess.mean_width, auto unless set)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild the store if it exists with other parameters (otherwise it is refused)")


def mean_width_arg(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a width in pixels or 'auto', got {text!r}") from None


def prepare_command(args: argparse.Namespace) -> int:
    plate = args.plate.resolve() if args.plate else None
    cfg = config_from_args(args, **{"plate.path": plate, "cluster.workers": args.workers,
                                    "cluster.scheduler_address": args.scheduler,
                                    "preprocess.mean_width": args.mean_width})
    summary = api.prepare(cfg, args.out, api.PREPARE_STAGES[args.command], overwrite=args.overwrite)
    print(summary.text())
    return 0


# ------------------------------------------------------------------------------------------ train, status
def train_arguments(p: argparse.ArgumentParser, name: str = "train") -> None:
    p.add_argument("--store", help="training store (from `hpc-retrain prepare`); a resumed run remembers it")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run folder for the model, history and checkpoints; an existing run resumes")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="total epochs (a resumed run continues up to this)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="Adam learning rate (default: chosen from the store: 1e-4 on sparse "
                   "fields, 2e-3 on dense colonies; the log's recipe: line says which)")
    g.add_argument("--init", choices=["pretrained", "reinit", "finetune-decoder"])
    g.add_argument("--base-model", metavar="PATH", help="Keras model to start from (default: MISIC's)")
    j = p.add_argument_group("job")
    j.add_argument("--executor", choices=["local", "slurm", "inline"],
                   help="local (default): a background process here; slurm: a batch job; inline: this process")
    j.add_argument("--partition")
    j.add_argument("--account")
    j.add_argument("--qos")
    j.add_argument("--time", type=int, metavar="MIN", help="wall-clock limit in minutes")
    j.add_argument("--gpus", type=int, help="GPUs per job (0 on clusters without GPUs)")
    j.add_argument("--cpus", type=int)
    j.add_argument("--mem", type=float, metavar="GB")
    j.add_argument("--container", metavar="IMAGE", help="run the job inside this Apptainer image")
    j.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the job and show its progress (default: wait for local, not for slurm)")


def build_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Saved run config (when resuming without --config), then --config/--set, then options."""
    fields = {
        "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.learning_rate": args.lr,
        "train.init": args.init, "train.base_model": args.base_model,
        # "inline" is a way to run, not a cluster setting: the config keeps local|slurm
        "cluster.executor": None if args.executor == "inline" else args.executor,
        "cluster.partition": args.partition, "cluster.account": args.account, "cluster.qos": args.qos,
        "cluster.time_min": args.time, "cluster.gpus": args.gpus, "cluster.cpus": args.cpus,
        "cluster.mem_gb": args.mem, "cluster.container": args.container,
    }
    saved = run_dir if args.config is None and (run_dir / CONFIG_FILE).is_file() else None
    return RunConfig.layered(saved=saved, file=args.config, overrides=list(args.overrides), options=fields)


def train_command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    cfg = build_config(args, run_dir)
    if args.executor == "inline":
        try:
            metrics = api.train(cfg, args.store, run_dir, executor="inline").result()
        except TrainingInterrupted as e:
            print(f"hpc-retrain train: {e}; run the same command to resume", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print("hpc-retrain train: stopped by Ctrl-C before the step in flight finished; the last checkpoint "
                  "is kept: run the same command to resume from it", file=sys.stderr)
            return 130
        print(json.dumps(metrics.get("final", {})))
        return 0
    job = api.train(cfg, args.store, run_dir, time_min=args.time)
    print(f"submitted {cfg.cluster.executor} job {job.job_id}")
    print(f"  run folder: {run_dir.resolve()}")
    print(f"  stdout:     {job.paths.stdout}")
    print(f"  stderr:     {job.paths.stderr}")
    print(f"  progress:   hpc-retrain status {run_dir}")
    wait = args.wait if args.wait is not None else cfg.cluster.executor == "local"
    if not wait:
        return 0
    try:
        metrics = job.result(echo=lambda text: print(text, end="", flush=True))
    except JobFailed as e:
        print(f"hpc-retrain train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stop = f"scancel {job.job_id}" if cfg.cluster.executor == "slurm" else f"kill -TERM {job.job_id}"
        print(f"\nhpc-retrain train: stopped waiting; {cfg.cluster.executor} job {job.job_id} goes on training "
              f"{run_dir} (`hpc-retrain status {run_dir}`); to stop it (it saves a checkpoint first): {stop}",
              file=sys.stderr)
        return 130
    print(json.dumps(metrics.get("final", {})))
    return 0


STATUS_EXIT_CODES = """exit status:
  0  finished, running, or pending (submitted; interrupted with its state saved, to resume)
  1  failed, or stopped (the training process died without reporting: killed, out of memory)
  2  not a training run (no config.yaml/status.json/job.json), or bad usage"""


def status_arguments(p: argparse.ArgumentParser, name: str = "status") -> None:
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = STATUS_EXIT_CODES


def status_command(args: argparse.Namespace) -> int:
    """Print the run's state; exit 0 (finished, running, pending), 1 (failed, stopped), 2 (not a run)."""
    s = api.status(args.run)
    print(json.dumps(s, indent=1) if args.json else api.status_text(s))
    return 1 if s["state"] in ("failed", "stopped") else 0


# ------------------------------------------------------------------------------------------ segment
def segment_arguments(p: argparse.ArgumentParser, name: str = "segment") -> None:
    p.add_argument("--model", metavar="RUN_OR_MODEL",
                   help="a training run folder or a .keras/.h5 model (default: infer.model, else MISIC's "
                        "pretrained model)")
    p.add_argument("--plate", metavar="PATH", help="TIFF folder or OME-Zarr plate (default: plate.path)")
    p.add_argument("--out", metavar="PATH",
                   help="OME-Zarr plate to write (default: into an OME-Zarr input plate itself; "
                        "<folder>.ome.zarr next to a TIFF plate)")
    p.add_argument("--name", help="label image name under each field's labels/ (default: infer.name)")
    p.add_argument("--channel", choices=[*CHANNELS, *TRANSMITTED], default="brightfield",
                   help="which plate channel to segment, with its preprocessing (default: brightfield, the "
                   "transmitted light: plate.brightfield, which may be phase contrast; phase and transmitted "
                   "are other names for it)")
    p.add_argument("--mode", choices=MODES, help="crop-and-stitch (MISIC) or blended tiles (default: infer.mode)")
    p.add_argument("--batch-size", type=int, help="tiles per model call (default: compute.batch_size)")
    p.add_argument("--chunk", type=int, help="fields larger than this (px) are processed in chunks")
    p.add_argument("--tiff", nargs="?", const="", metavar="DIR",
                   help="also write TIFFs {well}_s{field}_{name}.tif (labels) and _prob.tif (default DIR: "
                        "<plate>_<name>_tiff next to the plate)")
    p.add_argument("--overwrite", action="store_true", help="replace results of the same name")
    p.add_argument("--wells", metavar="A1,B2", help="segment only these wells (e.g. one per Slurm array task)")
    p.add_argument("--list-wells", action="store_true", help="print the plate's wells, one a line, and exit")


def segment_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, infer__mode=args.mode, compute__batch_size=args.batch_size,
                           infer__name=args.name, compute__chunk=args.chunk, infer__model=args.model,
                           plate__path=args.plate)
    if args.list_wells:
        print("\n".join(api.plate_wells(cfg)))
        return 0
    wells = [w.strip() for w in args.wells.split(",") if w.strip()] if args.wells else None
    channel = "brightfield" if args.channel in TRANSMITTED else args.channel
    done = api.segment(cfg, args.out, channel=channel, wells=wells, tiff=args.tiff,
                       overwrite=args.overwrite, overrides=args.overrides)
    print(done.text())
    if done.failed:
        print(f"hpc-retrain segment: no field was segmented: all {len(done.skipped)} field(s) skipped "
              f"(see above)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ evaluate
def evaluate_arguments(p: argparse.ArgumentParser, name: str = "evaluate") -> None:
    p.add_argument("--pred", required=True, metavar="PLATE", help="OME-Zarr plate holding the segmentation")
    p.add_argument("--name", help="label image to score (default: infer.name)")
    p.add_argument("--ref", required=True, metavar="NAME",
                   help="reference masks: a label image of the same plate (e.g. truth), or with --ref-plate "
                        "a channel of that plate (e.g. masks, binary)")
    p.add_argument("--ref-plate", metavar="PATH", help="TIFF folder or OME-Zarr plate holding the reference")
    p.add_argument("--out", metavar="DIR", help="where scores_<name>.json, overlay PNGs and contact_<name>.png go")
    p.add_argument("--overlays", type=int, default=3,
                   help="overlay PNGs for this many fields (default 3), plus a contact sheet of all fields; "
                        "0 draws no pictures")
    p.add_argument("--channel", default=None, help="image channel under the overlays (default: brightfield)")


def evaluate_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, infer__name=args.name)
    result = api.evaluate(cfg, args.pred, args.ref, args.ref_plate, args.out, args.overlays, args.channel)
    print(result["table"])
    if args.out:
        print(f"scores: {Path(args.out) / f'scores_{cfg.infer.name}.json'}")
    return 0


# ------------------------------------------------------------------------------------------ crossval
def crossval_arguments(p: argparse.ArgumentParser, name: str = "crossval") -> None:
    p.add_argument("--plate", metavar="PATH", help="TIFF folder or OME-Zarr plate (default: plate.path)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for each fold's store, run and the scores")
    p.add_argument("--folds", type=int, default=3, help="number of folds (default 3; fields are interleaved)")
    p.add_argument("--mean-width", metavar="PX|auto", help="cell width in pixels (default: preprocess.mean_width)")
    p.add_argument("--reference", metavar="CHANNEL", help="a channel of reference masks to report recall against")


def crossval_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, plate__path=args.plate, plate__reference=args.reference,
                           preprocess__mean_width=args.mean_width)
    if cfg.plate.path is None:
        raise CliError("no plate: pass --plate PATH (or set plate.path)")
    res = api.crossval(cfg, args.out, args.folds)
    print(res["table"], end="")
    return 0

