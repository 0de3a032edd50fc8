"""The MISIC model: the pinned pretrained file from the installed misic wheel, or a user's own.

``misic.misic`` is never imported: it tries to download the weights from the network first.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

# The 2-output (body, contour) U-Net shipped in misic==1.1.2. Pinned by name and content.
PRETRAINED_NAME = "MiSiDC04082020.h5"
PRETRAINED_SHA256 = "c4248e3233b593a22220ed9a035d3c3559b2a4921c0581e2eb2e1c2ea698f176"


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
    """Load a MISIC-style Keras model (uncompiled) and check it maps (tile, tile, 3) -> (tile, tile, C).

    ``path=None`` loads the pinned pretrained model; a run folder loads its ``model.keras``.
    """
    import keras

    if path is None:
        path = pretrained_path()
    path = Path(path)
    if path.is_dir():
        for name in ("model.keras", "model.h5"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ModelError(f"{path}: folder holds no model.keras or model.h5 (is the training finished?)")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        model = keras.models.load_model(str(path), compile=False)
    except Exception as e:  # Keras raises many types for a bad file; the user needs the file name.
        raise ModelError(f"{path}: not a loadable Keras model ({type(e).__name__}: {e})") from None
    check_io(model, tile, source=str(path))
    return model


def check_io(model, tile: int = 256, source: str = "model") -> None:
    ins, outs = model.input_shape, model.output_shape
    if isinstance(ins, list) or isinstance(outs, list):
        raise ModelError(f"{source}: expected one input and one output, got {ins} -> {outs}")
    ok_in = len(ins) == 4 and ins[-1] == 3 and all(d in (None, tile) for d in ins[1:3])
    ok_out = len(outs) == 4 and all(d in (None, tile) for d in outs[1:3]) and outs[-1] >= 1
    if not (ok_in and ok_out):
        raise ModelError(
            f"{source}: input/output shapes {ins} -> {outs} do not fit MISIC tiles "
            f"(expected (None, {tile}, {tile}, 3) -> (None, {tile}, {tile}, C))"
        )


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
