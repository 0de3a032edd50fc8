"""The ``hpc-retrain`` entry point named in ``[project.scripts]``; the command line is ``hpc_retrain.commands``."""

from hpc_retrain.commands import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]

if __name__ == "__main__":
    entry()
