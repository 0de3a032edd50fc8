"""The MISIC model: the pinned pretrained file from the installed misic wheel, or a user's own.

``misic.misic`` is never imported: it tries to download the weights from the network first.

A training run folder can be used at any time: once finished it holds ``model.keras``; while it is still
training, or after it was preempted, its checkpoints (``checkpoints/best``, else the latest) are loaded into
the run's base model architecture (see :func:`resolve`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.resources
import importlib.util
import io
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from hpc_retrain.errors import ModelError
from hpc_retrain.io import runfolder
from hpc_retrain.io.runfolder import ModelSource

log = logging.getLogger(__name__)

# The 2-output (body, contour) U-Net shipped in misic==1.1.2. Pinned by name and content.
PRETRAINED_NAME = "MiSiDC04082020.h5"
PRETRAINED_SHA256 = "c4248e3233b593a22220ed9a035d3c3559b2a4921c0581e2eb2e1c2ea698f176"


# TensorFlow's native start-up lines on a machine without a GPU (device probing, CPU build notes). They are
# written by C++ before absl's logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot silence them
# (tensorflow#100442); a Slurm log of a CPU job would start with them.
_TF_STARTUP_NOISE = ("before absl::InitializeLog", "port.cc:", "cudart_stub.cc:", "cpu_feature_guard.cc:",
                     "To enable the following instructions", "cuda_platform.cc:", "cuInit",
                     "Could not find cuda drivers")


def limit_malloc_arenas(n: int = 2) -> bool:
    """``mallopt(M_ARENA_MAX, n)`` (``MALLOC_ARENA_MAX``, set at run time) before TensorFlow starts its threads:
    glibc gives each thread its own arena, up to 8 per core, each keeping its own freed activation memory, so
    RSS grew with the core count. A user's MALLOC_ARENA_MAX wins; False where there is no glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, int(n)))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # musl or another libc
        return False


def import_tensorflow():
    """``import tensorflow``, dropping its native start-up lines unless TF_CPP_MIN_LOG_LEVEL is 0 (``-v``).

    Standard error is captured at the file-descriptor level for the import only; every other line it wrote
    (a real error, a warning) is written back unchanged. glibc's malloc arenas are capped first
    (``limit_malloc_arenas``)."""
    quiet_tensorflow_import()
    import tensorflow as tf

    return tf


def quiet_tensorflow_import() -> None:
    """Route this process's first import of TensorFlow, wherever it happens (``import keras`` too), through
    ``import_tensorflow``'s capture, without importing it now: a command refused for its input answers in
    about a second instead of after TensorFlow's start (~8 s on 2 cores), and one that never needs it
    (another backend, a job submitted) never pays for it."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, with its loader wrapped in the capture. It stays in
    ``sys.meta_path``: a lookup without an import (``importlib.util.find_spec``) also asks it."""

    def __init__(self):
        self._asking = threading.local()

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or getattr(self._asking, "now", False):
            return None
        self._asking.now = True
        try:
            spec = importlib.util.find_spec(name)  # the finders after this one
        finally:
            self._asking.now = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _CapturedLoader):
            spec.loader = _CapturedLoader(spec.loader)
        return spec


class _CapturedLoader:
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, attr):  # resources, get_data, ...: the real loader's
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _startup_lines_dropped():
            self._loader.exec_module(module)


@contextlib.contextmanager
def _startup_lines_dropped():
    limit_malloc_arenas()
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = [ln for ln in lines if not any(n in ln for n in _TF_STARTUP_NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrained_path(verify: bool = True) -> Path:
    """Path of the pretrained weights inside the installed misic package, checked against the pin."""
    try:
        res = importlib.resources.files("misic") / PRETRAINED_NAME
    except ModuleNotFoundError:
        raise ModelError("the misic package is not installed: pip install misic==1.1.2") from None
    path = Path(str(res))
    if not path.is_file():
        raise ModelError(f"{path}: the installed misic has no {PRETRAINED_NAME}; install misic==1.1.2")
    if verify:
        verify_sha256(path, PRETRAINED_SHA256)
    return path


def verify_sha256(path: str | Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise ModelError(
            f"{path}: sha256 {got} does not match the pinned {expected}; the file is damaged or not "
            f"the MISIC release this tool was validated with. Reinstall misic==1.1.2."
        )


def load(path: str | Path | None = None, tile: int = 256):
    """Load a MISIC-style Keras model (uncompiled) and check it maps (tile, tile, 3) -> (tile, tile, C >= 2).

    ``path=None`` loads the pinned pretrained model; a run folder loads its ``model.keras``, or, when the
    run is not finished, its best (else latest) checkpoint; a checkpoint folder loads that checkpoint.
    """
    return load_with_source(path, tile)[0]


def resolve(path: str | Path | None) -> ModelSource:
    """What ``load`` would read for ``path``, without loading it: the pinned pretrained file for None, else
    what the run folder format says the path stands for (:func:`hpc_retrain.io.runfolder.resolve_model`)."""
    return ModelSource(pretrained_path()) if path is None else runfolder.resolve_model(path)


def load_with_source(path: str | Path | None = None, tile: int = 256):
    """(model, :class:`ModelSource` with the sha256 of what was loaded); see :func:`load`.

    A run that is not finished logs one line saying which checkpoint it gives.
    """
    for attempt in range(3):
        try:
            src = resolve(path)
            if src.is_checkpoint:
                model, sha = _load_checkpoint(src, tile)
            break
        except FileNotFoundError:
            # The training pruned or replaced the checkpoint while we read it (it runs on): look again.
            if attempt == 2:
                raise ModelError(f"{path}: its checkpoints kept changing while being read; try again") from None
    if src.is_checkpoint:
        chosen = path is not None and Path(path).resolve() == src.path.resolve()
        log.log(logging.INFO if chosen else logging.WARNING, "%s", src.note)
        return model, ModelSource(src.path, src.run, src.checkpoint, src.note, sha)
    file = src.path
    from hpc_retrain.inference import backend

    backend.apply()  # the backend this process was given (KERAS_BACKEND), checked before keras is imported
    try:
        import keras

        model = keras.models.load_model(str(file), compile=False)
    except Exception as e:  # Keras raises many types for a bad file; the user needs the file name.
        raise ModelError(f"{file}: not a loadable Keras model ({type(e).__name__}: {e})") from None
    _remember_source(model, file)
    check_io(model, tile, source=str(file))
    return model, ModelSource(file, src.run, None, src.note, sha256(file))


def _load_checkpoint(src: ModelSource, tile: int):
    """The run's base model with the checkpoint's model variables; and the sha256 of its variables.npz."""
    import numpy as np

    from hpc_retrain.config import RunConfig

    ckpt, run = src.path, src.run
    before = os.stat(ckpt).st_ino
    state = runfolder.read_state(ckpt)
    data = (ckpt / runfolder.VARIABLES_FILE).read_bytes()
    if os.stat(ckpt).st_ino != before:  # ``best`` is replaced by a rename: state and arrays must match
        raise FileNotFoundError(ckpt)
    cfg = RunConfig.read_saved(run)
    try:
        model = load(cfg.train.base_model, tile=tile)
    except ModelError as e:
        raise ModelError(f"{run}: cannot build the run's base model ({e})") from None
    try:
        arrays = np.load(io.BytesIO(data))
        names = sorted(k for k in arrays.files if k.startswith("m"))
    except Exception as e:
        raise ModelError(f"{ckpt}: unreadable variables.npz ({type(e).__name__}: {e})") from None
    saved = [str(s).rsplit(" ", 1)[0] for s in state.get("model_variables", [])]  # "(3, 3, 3, 32) float32"
    ours = [str(tuple(v.shape)) for v in model.variables]
    # Shapes, not dtypes or names: under mixed precision the trained net's variables are the float32
    # model's, in the same order (the layers' compute dtype differs, not their weights).
    if saved != ours or len(names) != len(ours):
        diff = next((i for i, (a, b) in enumerate(zip(saved, ours)) if a != b), min(len(saved), len(ours)))
        raise ModelError(
            f"{ckpt}: checkpoint weights do not fit the run's base model "
            f"({cfg.train.base_model or 'MISIC pretrained'}): {len(saved)} variables vs {len(ours)}, first "
            f"difference at #{diff}; was train.base_model in {run / 'config.yaml'} changed?")
    for i, v in enumerate(model.variables):
        try:
            a = arrays[f"m{i:04d}"]
        except Exception as e:  # an object array (allow_pickle is off), a damaged member
            raise ModelError(f"{ckpt}: variable m{i:04d} of variables.npz is unreadable ({type(e).__name__}: "
                             f"{e}); use another checkpoint (--model RUN/checkpoints/...)") from None
        if tuple(a.shape) != tuple(v.shape):
            raise ModelError(f"{ckpt}: variable m{i:04d} has shape {a.shape}, the model's is {tuple(v.shape)}")
        if a.dtype.kind not in "fiub":
            raise ModelError(f"{ckpt}: variable m{i:04d} of variables.npz holds {a.dtype} values, not numbers; "
                             f"use another checkpoint (--model RUN/checkpoints/...)")
        v.assign(a.astype(np.dtype(str(v.dtype)), copy=False))
    _remember_source(model, ckpt)
    check_io(model, tile, source=str(ckpt))
    return model, hashlib.sha256(data).hexdigest()


# Where a model was loaded from, kept on the model object: an error found later (check_io called with the
# Keras model's name, e.g. "functional_1") still names the file the user gave.
_SOURCE_ATTR = "_hpc_retrain_source"
OUTPUT_CHANNELS = ("cell body", "contour")


def _remember_source(model, source: str | Path) -> None:
    try:
        object.__setattr__(model, _SOURCE_ATTR, str(source))
    except Exception:  # only for messages
        pass


def source_of(model, source: str | None = None) -> str:
    """The file (or checkpoint) a message should name: ``source`` when it is a path, else the file the model
    was loaded from, else the model's name."""
    name = getattr(model, "name", None)
    if source and source not in ("model", name):
        return str(source)
    return getattr(model, _SOURCE_ATTR, None) or source or name or "model"


def check_io(model, tile: int = 256, source: str | None = None) -> None:
    """Refuse a model that does not map (tile, tile, 3) -> (tile, tile, C >= 2); the message names the file."""
    where = source_of(model, source)
    ins, outs = model.input_shape, model.output_shape
    if isinstance(ins, list) or isinstance(outs, list):
        raise ModelError(f"{where}: expected one input and one output, got {ins} -> {outs}")
    ok_in = len(ins) == 4 and ins[-1] == 3 and all(d in (None, tile) for d in ins[1:3])
    ok_out = len(outs) == 4 and all(d in (None, tile) for d in outs[1:3]) and outs[-1] is not None
    if not (ok_in and ok_out):
        raise ModelError(
            f"{where}: input/output shapes {ins} -> {outs} do not fit MISIC tiles "
            f"(expected (None, {tile}, {tile}, 3) -> (None, {tile}, {tile}, C))"
        )
    if outs[-1] < len(OUTPUT_CHANNELS):
        raise ModelError(
            f"{where}: the model outputs {outs[-1]} channel(s) ({ins} -> {outs}); a MISIC model outputs "
            f"{len(OUTPUT_CHANNELS)} ({' and '.join(OUTPUT_CHANNELS)} probabilities): use a model with 2 outputs")


def reinitialize(model, seed: int = 0) -> None:
    """Re-draw every kernel and bias from its layer's initializer and reset BatchNorm completely.

    The original workflow re-drew conv weights but left BatchNorm's moving statistics (and gamma/beta)
    from pretraining, so the "blank" model was not blank.
    """
    import keras

    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.gamma is not None:
                layer.gamma.assign(keras.ops.ones_like(layer.gamma))
            if layer.beta is not None:
                layer.beta.assign(keras.ops.zeros_like(layer.beta))
            layer.moving_mean.assign(keras.ops.zeros_like(layer.moving_mean))
            layer.moving_variance.assign(keras.ops.ones_like(layer.moving_variance))
            continue
        for attr, init_attr in (("kernel", "kernel_initializer"), ("bias", "bias_initializer")):
            var = getattr(layer, attr, None)
            init = getattr(layer, init_attr, None)
            if var is None or init is None:
                continue
            cfg = keras.initializers.serialize(init)
            if isinstance(cfg, dict) and "config" in cfg and "seed" in cfg["config"]:
                cfg["config"]["seed"] = seed * 1000 + i  # distinct, reproducible draws per layer
            fresh = keras.initializers.deserialize(cfg)
            var.assign(fresh(tuple(var.shape), dtype=var.dtype))
