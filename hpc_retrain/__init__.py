"""hpc_retrain: retrain the MISIC bacterial segmentation model on your own plates, locally or on Slurm.

The library: one function per stage, each taking a :class:`RunConfig` (``hpc_retrain.config``, the one run
configuration)::

    from hpc_retrain import RunConfig, evaluate, prepare, segment, train

They are ``hpc_retrain.api``'s. The stages live in ``preparation`` (with ``labels``, ``targets``, ``store``),
``training`` (launched by ``jobs``, its state in ``runstate``), ``segmentation`` (with ``infer`` and
``outputs``) and ``evaluation``; ``blocks`` is the one block engine under every large image; ``plate`` reads
plates, ``synth`` makes synthetic ones. The command line, ``hpc_retrain.commands``, is built on ``api``.

Nothing is imported until it is asked for, so ``import hpc_retrain`` stays fast and TensorFlow-free.
"""

__version__ = "0.1.0"

_LAZY = {"RunConfig": "hpc_retrain.config", "ConfigError": "hpc_retrain.config",
         **{stage: "hpc_retrain.api" for stage in ("prepare", "train", "segment", "evaluate")}}
__all__ = ["RunConfig", "ConfigError", "prepare", "train", "segment", "evaluate", "api", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "api":
        return importlib.import_module("hpc_retrain.api")
    raise AttributeError(f"module 'hpc_retrain' has no attribute {name!r}")
