"""What every command shares: the configuration options, their layering, and the error a user can fix."""

from __future__ import annotations

import argparse

from hpc_retrain.config import RunConfig
from hpc_retrain.errors import HpcRetrainError


class CliError(HpcRetrainError):
    """An error a user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------ shared options
def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run configuration (defaults apply to what it omits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one configuration field, e.g. --set train.epochs=5 (repeatable); "
                   "--set compute.backend=jax|torch|tensorflow runs Keras on that backend (default: KERAS_BACKEND, "
                   "else tensorflow); the OpenVINO engine (compute.engine=openvino) runs only on tensorflow")
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value when not given here.
    add_verbosity(p, default=argparse.SUPPRESS)


def add_verbosity(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging, TensorFlow's own messages included")
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def config_from_args(args: argparse.Namespace, **fields) -> RunConfig:
    """--config, then --set, then the stage's own options (those not None), validated once; its Keras backend
    applied (``backend.apply``: before keras is imported; a conflict or a missing backend is one line; the
    stage that uses Keras logs which)."""
    from hpc_retrain import api

    cfg = RunConfig.layered(file=args.config, overrides=list(args.overrides), options=fields)
    api.apply_backend(cfg, announce=False)
    return cfg
