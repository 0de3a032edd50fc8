"""The network being trained: the weighted loss, precision policy, encoder freezing and compiled steps.

The encoder (frozen by ``init: finetune-decoder``) is every layer of the MISIC U-Net up to and including the
conv block after the deepest MaxPooling (the bottleneck), i.e. everything before the first UpSampling layer;
frozen BatchNorm layers run in inference mode, so their statistics stay pretrained.
"""

from __future__ import annotations

import logging

import numpy as np

from hpc_retrain.config import RunConfig
from hpc_retrain.training.data import TrainingError

log = logging.getLogger("hpc_retrain.training.loop")  # the run's train.log collects this logger's records

EPS = 1e-7



def weighted_bce(y_true, y_prob, pos_weight, eps: float = EPS):
    """Mean of -(w_c y log p + (1 - y) log(1 - p)) on probabilities (MISIC ends in a sigmoid); keras.ops, so
    the same expression runs on every backend (and inside each backend's compiled step)."""
    from keras import ops

    y = ops.cast(y_true, "float32")
    p = ops.clip(ops.cast(y_prob, "float32"), eps, 1.0 - eps)
    w = ops.cast(pos_weight, "float32")
    return ops.mean(-(w * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p)))


def _weighted_bce_np(y: np.ndarray, p: np.ndarray, w: np.ndarray, eps: float = EPS) -> float:
    """:func:`weighted_bce` in NumPy (float32, as it), for validation sums computed on the host."""
    p = np.clip(p.astype(np.float32, copy=False), np.float32(eps), np.float32(1.0 - eps))
    return float(np.mean(-(w * y * np.log(p) + (1.0 - y) * np.log(1.0 - p)), dtype=np.float64))


def encoder_layers(model) -> list:
    """Layers before the first UpSampling that follows the deepest MaxPooling (see the module docstring)."""
    import keras

    layers = model.layers
    pools = [i for i, l in enumerate(layers) if isinstance(l, keras.layers.MaxPooling2D)]
    if not pools:
        raise TrainingError(f"{model.name}: no MaxPooling layer, cannot tell the encoder for finetune-decoder")
    ups = [i for i, l in enumerate(layers) if i > pools[-1] and isinstance(l, keras.layers.UpSampling2D)]
    if not ups:
        raise TrainingError(f"{model.name}: no UpSampling after the deepest MaxPooling; not a U-Net")
    return layers[:ups[0]]


def with_policy(model, policy: str):
    """The same network with ``policy`` on every layer but the output (kept float32), same weights."""
    import keras

    cfg = model.get_config()
    outputs = {o[0] for o in cfg["output_layers"]}
    for layer in cfg["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = "float32" if layer["name"] in outputs else policy
    new = keras.Model.from_config(cfg)
    new.set_weights(model.get_weights())
    return new


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX), where oneDNN runs it natively;
    elsewhere TensorFlow emulates it and is slower than float32. Unknown (not Linux): no."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open(cpuinfo) if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_policy(setting: str) -> str:
    """The Keras dtype policy for training. ``auto``: float16 on a GPU, float32 on a CPU; ``on``: float16 on a
    GPU, bfloat16 on a CPU (a training step 1.48x faster on a 2-core AMD EPYC with AVX512_BF16; emulated and
    slower on CPUs without it). bfloat16 is not the CPU default: on the ColiCoords cross-validation it gave the
    same F1 (0.824 vs 0.830) but recalled fewer ilastik cells (0.738 vs 0.923; benchmarks/RESULTS.md, 5c)."""
    from hpc_retrain.inference import backend

    if setting == "off":
        return "float32"
    if backend.gpu_visible():
        return "mixed_float16"
    if setting == "auto":
        return "float32"
    if not cpu_has_native_bfloat16():
        log.warning("mixed precision on a CPU without native bfloat16 (AVX512_BF16/AMX): bfloat16 is emulated "
                    "there and slower than float32")
    return "mixed_bfloat16"


def make_optimizer(learning_rate: float, policy: str):
    """Adam, with loss scaling under float16 (its narrow range needs it; bfloat16 has float32's)."""
    import keras

    opt = keras.optimizers.Adam(learning_rate)
    return keras.optimizers.LossScaleOptimizer(opt) if policy == "mixed_float16" else opt


def build_model(cfg: RunConfig, policy: str = "float32"):
    """(model to train, float32 model to export). Both share one architecture; weights are copied over."""
    from hpc_retrain.inference import model as M

    base = M.load(cfg.train.base_model, tile=cfg.tiling.size)
    if cfg.train.init == "reinit":
        M.reinitialize(base, seed=cfg.seed)
    net = base if policy == "float32" else with_policy(base, policy)
    if cfg.train.init == "finetune-decoder":
        frozen = encoder_layers(net)
        for layer in frozen:
            layer.trainable = False
        log.info("finetune-decoder: froze %d encoder layers (through %s)", len(frozen), frozen[-1].name)
    return net, base


def make_steps(net, opt, pos_w, size: int):
    """Training and validation steps for (batch, size, size, 3) -> (batch, size, size, 2).

    ``train_step(x, y) -> (loss, accuracy)``: the loss and accuracy are written once here with keras.ops;
    only the gradient step is per backend (``backend.make_train_step``, which says why).
    ``val_step`` returns sums (loss * n, accuracy * n, n, body intersection, predicted, true) so metrics
    over the whole validation set do not depend on the batch size, and the batch's probabilities (for
    the instance F1 of :mod:`validation`); the model runs compiled (``backend.predict_function``), the sums on
    the host in NumPy.
    """
    from keras import ops

    from hpc_retrain.inference import backend

    w = np.asarray(pos_w, np.float32)

    def compute(y, p):
        p = ops.cast(p, "float32")
        acc = ops.mean(ops.cast(ops.equal(p >= 0.5, y >= 0.5), "float32"))
        return weighted_bce(y, p, w), acc

    train_step = backend.make_train_step(net, opt, compute)
    predict = backend.predict_function(net)

    def val_step(x, y):
        p = predict(np.asarray(x, np.float32))
        y = np.asarray(y, np.float32)
        n = float(len(x))
        hit = np.mean((p >= 0.5) == (y >= 0.5), dtype=np.float64)
        pb, yb = (p[..., 0] >= 0.5).astype(np.float64), y[..., 0].astype(np.float64)
        inter, sp, sy = float((pb * yb).sum()), float(pb.sum()), float(yb.sum())
        return np.array([_weighted_bce_np(y, p, w) * n, hit * n, n, inter, sp, sy]), p[..., :2]

    return train_step, val_step
