"""``hpc-retrain``: the command line, one subcommand per workflow stage, a few lines around the library each.

Each command has its options (``<name>_arguments(parser)``) and its entry point (``<name>_command(args)``),
in ``stages`` (and ``demo``); ``common`` holds the configuration options every command takes. The work is
the library's (``hpc_retrain.api`` and the stage modules), which never imports this package.
TensorFlow is imported only inside the stages, so ``--help`` and the data stages start fast. Options that
set configuration fields are applied on top of ``--config`` and ``--set`` and validated once, up front.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hpc_retrain import __version__, api
from hpc_retrain.commands import stages
from hpc_retrain.commands.common import add_config_arguments, add_verbosity
from hpc_retrain.commands.demo import demo_arguments, demo_command
from hpc_retrain.errors import HpcRetrainError

# ------------------------------------------------------------------------------------------ the parser
# name -> (one-line help, options, entry point); the order is the workflow's.
COMMANDS = {
    "synth": ("write a synthetic plate of paired brightfield/fluorescence images",
              stages.synth_arguments, stages.synth_command),
    "labels": ("training labels from fluorescence with the pretrained MISIC", stages.prepare_arguments, stages.prepare_command),
    "targets": ("training inputs (shape-index tiles) from brightfield", stages.prepare_arguments, stages.prepare_command),
    "prepare": ("labels and targets in one pass into the training store", stages.prepare_arguments, stages.prepare_command),
    "train": ("retrain MISIC on a training store, locally or as a Slurm job", stages.train_arguments, stages.train_command),
    "status": ("state and latest epoch metrics of a training run", stages.status_arguments, stages.status_command),
    "segment": ("segment a plate with a trained model into OME-Zarr labels",
                stages.segment_arguments, stages.segment_command),
    "evaluate": ("score segmentations against reference masks", stages.evaluate_arguments, stages.evaluate_command),
    "crossval": ("does retraining help on this plate? k-fold by field, scored on held-out fields",
                 stages.crossval_arguments, stages.crossval_command),
    # the demo runs the other commands through main(), handed to it rather than imported (no cycle)
    "demo": ("synthesize a small plate and run every stage on it", demo_arguments,
             lambda args: demo_command(args, main)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-retrain",
        description="Retrain the MISIC bacterial segmentation model on your own plates: labels from "
        "fluorescence, targets from brightfield, training, and tiled inference, locally or on Slurm.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-retrain {__version__}")
    add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, arguments, command) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_run=command)
        add_config_arguments(sp)
        arguments(sp, name)
    return parser


def _quiet_tensorflow(verbose: bool) -> None:
    """Less TensorFlow start-up chatter unless -v; must run before any stage imports TensorFlow.

    A TF_CPP_MIN_LOG_LEVEL the user exported is kept. TensorFlow 2.21 prints its native start-up lines
    (cuInit, oneDNN) before absl's logging is set up, whatever this level says (tensorflow#100442), so main
    routes TensorFlow's first import, whichever stage makes it, through ``model.quiet_tensorflow_import``,
    which drops them.
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


_ran: list[str] = []  # the command main() last ran, for entry()


def entry() -> None:
    """The console entry point (``hpc-retrain``, ``python -m hpc_retrain``): exits with ``main``'s status.

    A ``train`` that failed exits at once, without running destructors: TensorFlow's tf.data iterator can
    deadlock when it is destroyed while one of its Python map calls is still in flight (seen after a
    corrupt chunk stopped an epoch: the process hung at exit). The run's status and the error line are
    written by then.
    """
    rc = main()
    if rc and _ran and _ran[-1] == "train":
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    raise SystemExit(rc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _ran.append(str(args.command))
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    if verbose and quiet:
        parser.error("-v/--verbose and -q/--quiet are mutually exclusive")
    _quiet_tensorflow(verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return 2
    if not verbose:
        api.quiet_tensorflow_import()  # whenever a stage first imports it: not before (a refusal is instant)
    try:
        return int(args._run(args) or 0)
    except HpcRetrainError as e:
        # Every error a user can fix derives from it, and its message already names the file or setting and
        # the fix; anything else is a bug and keeps its traceback.
        return _report(args.command, e)
    except KeyboardInterrupt:
        # Ctrl-C: every stage keeps what it finished (prepare's and segment's fields, train's checkpoints)
        print(f"\nhpc-retrain {args.command}: stopped by Ctrl-C; what was finished is kept: run the same command "
              f"to continue", file=sys.stderr)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return 130


def _report(command: str, e: Exception) -> int:
    """The one line a failed command prints (exit status 2)."""
    print(f"hpc-retrain {command}: {e}", file=sys.stderr)
    # Writes zarr still had in flight on its own event loop (a full disk fails them all) are abandoned with
    # the command, and asyncio would log each one at exit, tracebacks included ("Task was destroyed but it
    # is pending", "Future exception was never retrieved"): noise after the line that says what to do.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return 2


if __name__ == "__main__":
    entry()
