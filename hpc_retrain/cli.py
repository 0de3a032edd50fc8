"""``hpc-retrain``: one subcommand per workflow stage.

Every stage module keeps its own options (``add_arguments(parser)``) and entry point (``main(args)``), and
imports TensorFlow only inside functions, so ``--help`` and the data stages start fast. Options that set
configuration fields are applied on top of ``--config`` and ``--set`` and validated once, up front.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from hpc_retrain import __version__
from hpc_retrain.config import ConfigError, RunConfig

# name -> (module, one-line help); the order is the workflow's.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("hpc_retrain.synth", "write a synthetic plate of paired brightfield/fluorescence images"),
    "labels": ("hpc_retrain.prepare", "training labels from fluorescence with the pretrained MISIC"),
    "targets": ("hpc_retrain.prepare", "training inputs (shape-index tiles) from brightfield"),
    "prepare": ("hpc_retrain.prepare", "labels and targets in one pass into the training store"),
    "train": ("hpc_retrain.jobs", "retrain MISIC on a training store, locally or as a Slurm job"),
    "status": ("hpc_retrain.jobs", "state and latest epoch metrics of a training run"),
    "segment": ("hpc_retrain.infer", "segment a plate with a trained model into OME-Zarr labels"),
    "evaluate": ("hpc_retrain.evaluate", "score segmentations against reference masks"),
    "crossval": ("hpc_retrain.crossval", "does retraining help on this plate? k-fold by field, scored on held-out fields"),
    "demo": ("hpc_retrain.demo", "synthesize a small plate and run every stage on it"),
}


# Commands that never load TensorFlow (so they start in a second)
NO_TENSORFLOW = {"synth", "targets", "status", "evaluate"}


class CliError(Exception):
    """An error a user can fix; printed as one line, exit status 2."""


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run configuration (defaults apply to what it omits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one configuration field, e.g. --set train.epochs=5 (repeatable)")
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value when not given here.
    _add_verbosity(p, default=argparse.SUPPRESS)


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging, TensorFlow's own messages included")
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def config_from_args(args: argparse.Namespace, **fields) -> RunConfig:
    """--config, then --set, then the stage's own options (those not None), validated once."""
    overrides = {k.replace("__", "."): v for k, v in fields.items() if v is not None}
    cfg = RunConfig.load(args.config, list(args.overrides))
    return cfg.updated(**{k.replace(".", "__"): v for k, v in overrides.items()}) if overrides else cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-retrain",
        description="Retrain the MISIC bacterial segmentation model on your own plates: labels from "
        "fluorescence, targets from brightfield, training, and tiled inference, locally or on Slurm.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-retrain {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=modname)
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            sp.set_defaults(_missing=True)
            continue
        add_config_arguments(sp)
        mod.add_arguments(sp, name) if _takes_name(mod.add_arguments) else mod.add_arguments(sp)
    return parser


def _takes_name(fn) -> bool:
    return fn.__code__.co_argcount >= 2


def _quiet_tensorflow(verbose: bool) -> None:
    """Less TensorFlow start-up chatter unless -v; must run before any stage imports TensorFlow.

    A TF_CPP_MIN_LOG_LEVEL the user exported is kept. TensorFlow 2.21 prints its native start-up lines
    (cuInit, oneDNN) before absl's logging is set up, whatever this level says (tensorflow#100442), so the
    stages that use TensorFlow import it through ``model.import_tensorflow``, which drops them.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    if verbose and quiet:
        parser.error("-v/--verbose and -q/--quiet are mutually exclusive")
    _quiet_tensorflow(verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"hpc-retrain {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    if not verbose and args.command not in NO_TENSORFLOW:
        from hpc_retrain.model import import_tensorflow

        import_tensorflow()  # first, so no later import prints TensorFlow's start-up lines
    mod = importlib.import_module(args._module)
    try:
        return int(mod.main(args) or 0)
    except (CliError, ConfigError) as e:
        print(f"hpc-retrain {args.command}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Our own input errors (PlateError, ImageError, ModelError, StoreError...) are ValueErrors whose
        # message already names the file and the problem; anything else is a bug and keeps its traceback.
        if type(e).__module__.startswith("hpc_retrain"):
            print(f"hpc-retrain {args.command}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
