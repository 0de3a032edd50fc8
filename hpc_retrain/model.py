"""The MISIC model: the pinned pretrained file from the installed misic wheel, or a user's own.

``misic.misic`` is never imported: it tries to download the weights from the network first.

A training run folder can be used at any time: once finished it holds ``model.keras``; while it is still
training, or after it was preempted, its checkpoints (``checkpoints/best``, else the latest) are loaded into
the run's base model architecture (see :func:`resolve`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    if "tensorflow" not in sys.modules:
        limit_malloc_arenas()
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = [ln for ln in lines if not any(n in ln for n in _TF_STARTUP_NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
    return tf


class ModelError(ValueError):
    """A model file that is missing, tampered with, or does not fit MISIC's input/output."""


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


@dataclass(frozen=True)
class ModelSource:
    """What a model path stands for: a model file, or a checkpoint folder of a training run.

    ``path`` is what provenance names (the model file, or the checkpoint folder); ``note`` is the line that
    says what was chosen and why (empty for a plain model file); ``checkpoint`` holds the checkpoint's
    epoch/step (None for a model file); ``sha256`` is filled in by :func:`load_with_source`, for the bytes
    actually loaded (a checkpoint's ``variables.npz``).
    """

    path: Path
    run: Path | None = None
    checkpoint: dict | None = None
    note: str = ""
    sha256: str | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.checkpoint is not None


MODEL_FILES = ("model.keras", "model.h5")


def _is_checkpoint(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "variables.npz").is_file()


def run_folder(path: str | Path | None) -> Path | None:
    """The training run folder ``path`` belongs to (the folder itself, or a checkpoint's run), else None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and _is_checkpoint(p) and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent
    return p if p.is_dir() and (p / "config.yaml").is_file() else None


def _state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except FileNotFoundError:
        raise  # pruned or replaced by the training in the meantime: the caller looks again
    except (OSError, ValueError) as e:
        raise ModelError(f"{ckpt}: unreadable checkpoint state.json ({e})") from None


def _describe(ckpt: Path, state: dict, epochs: int | None) -> dict:
    """{"name", "epoch", "step"} and a phrase for the line: "epoch 7 of 20", "1 step(s) into epoch 3 of 20"."""
    done, step = int(state.get("epoch", 0)), int(state.get("step", 0))
    info = {"name": ckpt.name, "epoch": done, "step": step}
    of = f" of {epochs}" if epochs else ""
    if step:
        info["phrase"] = f"{step} step(s) into epoch {done + 1}{of}"
    elif done == 0:  # the starting model, validated before training; no epoch has beaten it (yet)
        info["phrase"] = f"epoch 0{of}: the starting model"
    else:
        info["phrase"] = f"epoch {done}{of}"
    return info


def resolve(path: str | Path | None) -> ModelSource:
    """What ``load`` would read for ``path``, without loading it.

    A run folder: ``model.keras`` (or ``model.h5``) when the run finished; otherwise (still training,
    preempted, or trained on past its exported model) ``checkpoints/best`` if present, else the latest
    checkpoint. The source's ``note`` says which.
    """
    if path is None:
        return ModelSource(pretrained_path())
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        return ModelSource(path)
    if _is_checkpoint(path):
        run = run_folder(path)
        if run is None:
            raise ModelError(f"{path}: a checkpoint outside a run folder (no config.yaml two levels up); "
                             f"the run's config names the model architecture")
        info = _describe(path, _state(path), _epochs(run))
        return ModelSource(path, run, info, f"using checkpoint {path} ({info.pop('phrase')})")

    from hpc_retrain import training as tr

    if path.name == tr.CKPT_DIR and (path.parent / "config.yaml").is_file():
        return resolve(path.parent)  # the run's checkpoints folder stands for the run
    model_file = next((path / n for n in MODEL_FILES if (path / n).is_file()), None)
    has_config = (path / "config.yaml").is_file()
    if model_file is None and not has_config and (path / tr.CKPT_DIR).is_dir():
        raise ModelError(f"{path}: checkpoints but no config.yaml (it names the model architecture); "
                         f"not a complete run folder")
    latest = tr.latest_checkpoint(path) if has_config else None
    best = path / tr.CKPT_DIR / tr.BEST
    best = best if has_config and _is_checkpoint(best) else None
    if model_file is not None:
        exported = _exported_epoch(path)
        newer = latest is not None and exported is not None and _progress(_state(latest)) > (exported, 0)
        if not newer:
            return ModelSource(model_file, path if has_config else None)
        why = (f"run {path} has trained past its exported {model_file.name} (epoch {exported}; "
               f"pass --model {model_file} for that one)")
    elif latest is None and best is None:
        raise ModelError(f"{path}: no model.keras, model.h5 or checkpoints in this folder; train first "
                         f"(hpc-retrain train --run {path} --store STORE)")
    else:
        why = f"run {path} is not finished"
    ckpt = best or latest
    info = _describe(ckpt, _state(ckpt), _epochs(path))
    if ckpt == best:
        note = f"{why}: using checkpoint best ({info.pop('phrase')})"
    else:
        note = f"{why}: using the latest checkpoint {ckpt.name} ({info.pop('phrase')}; no best checkpoint yet)"
    return ModelSource(ckpt, path, info, note)


def _progress(state: dict) -> tuple[int, int]:
    return int(state.get("epoch", 0)), int(state.get("step", 0))


def _epochs(run: Path) -> int | None:
    try:
        from hpc_retrain.config import RunConfig

        return RunConfig.read_saved(run).train.epochs
    except Exception:  # only for the message
        return None


def _exported_epoch(run: Path) -> int | None:
    """Epochs behind the run's exported model (metrics.json, written with it); None when unknown."""
    try:
        return int(json.loads((run / "metrics.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    from hpc_retrain import backend as B

    B.apply()  # the backend this process was given (KERAS_BACKEND), checked before keras is imported
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
    state = _state(ckpt)
    data = (ckpt / "variables.npz").read_bytes()
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
        a = arrays[f"m{i:04d}"]
        if tuple(a.shape) != tuple(v.shape):
            raise ModelError(f"{ckpt}: variable m{i:04d} has shape {a.shape}, the model's is {tuple(v.shape)}")
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
