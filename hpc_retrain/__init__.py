"""hpc_retrain: retrain the MISIC bacterial segmentation model on your own plates, locally or on Slurm.

The library: ``hpc_retrain.api`` has one function per stage (``prepare``, ``train``, ``segment``,
``evaluate``), each taking a :class:`RunConfig` (``hpc_retrain.config``, the one run configuration). The
stages live in ``prepare`` (with ``labels``, ``targets``, ``store``), ``train`` (launched by ``jobs``, its
state in ``runstate``), ``segment`` (with ``infer`` and ``outputs``) and ``evaluate``; ``plate`` reads
plates, ``synth`` makes synthetic ones. The command line, ``hpc_retrain.commands``, is built on ``api``.

``RunConfig`` and ``api`` are importable from here; this module imports nothing until they are asked for,
so ``import hpc_retrain`` stays fast and TensorFlow-free. (``prepare``, ``train`` and ``evaluate`` are also
the names of stage modules, so the stage functions are imported from ``hpc_retrain.api``.)
"""

__version__ = "0.1.0"

_LAZY = {"RunConfig": "hpc_retrain.config", "ConfigError": "hpc_retrain.config"}
__all__ = ["RunConfig", "ConfigError", "api", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "api":
        return importlib.import_module("hpc_retrain.api")
    raise AttributeError(f"module 'hpc_retrain' has no attribute {name!r}")
