"""Which Keras 3 backend runs the model (``compute.backend``: tensorflow, jax or torch), and the few pieces
of the network that Keras has no backend-neutral form for.

Keras fixes its backend when it is first imported, from ``KERAS_BACKEND``, once per process. :func:`apply`
therefore runs before anything imports keras (the library's entry points and ``training.train`` call it):
it resolves ``compute.backend`` against ``KERAS_BACKEND`` (the variable is honoured when the setting is not
given; the two disagreeing is refused in one line), checks that the backend's package is installed (else one
line naming the extra: ``pip install 'hpc-retrain[jax]'``), exports ``KERAS_BACKEND`` (so Dask workers and
local jobs started from this process use the same backend) and logs the choice once.

Everything else about the network is written once with ``keras.ops`` and Keras APIs (``network``,
``infer``). What stays per backend here, and why:

* :func:`make_train_step`: the gradient. Keras 3 has no neutral "gradient of this loss" call: TensorFlow
  records a ``GradientTape``, JAX differentiates a pure function of the variables' values
  (``stateless_call`` under ``jax.value_and_grad``), PyTorch runs ``loss.backward()`` on its autograd graph.
  ``model.fit``/``train_on_batch`` hide the same three branches (keras/src/backend/*/trainer.py), but the
  training loop needs every step's loss, a checkpoint after any step and an exact resume, so it keeps its
  own loop and this one function mirrors Keras's own three train steps.
* :func:`predict_function`: a compiled forward pass. ``model(x)`` is neutral but runs eagerly, op by op (on
  JAX 2.5x slower than TensorFlow's traced function); each backend compiles differently
  (``tf.function``, ``jax.jit`` of ``stateless_call``, PyTorch eager under ``no_grad``).
* :func:`gpu_visible`, :func:`limit_threads`, :func:`enable_determinism`: device, thread and determinism
  controls, which each framework exposes in its own way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import numpy as np

from hpc_retrain.errors import HpcRetrainError

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")
_PACKAGE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
_LOGGED: set[str] = set()  # the backend line is logged once per process
_WHY: dict[str, str] = {}  # why each backend was chosen, as first resolved (later calls see KERAS_BACKEND)


class BackendError(HpcRetrainError, ValueError):
    """A backend that cannot run as asked; one line naming the setting and the fix."""


def requested(setting: str | None = None, environ=None) -> tuple[str, str]:
    """(backend, why) for a ``compute.backend`` value (None: not given) and ``KERAS_BACKEND``."""
    environ = os.environ if environ is None else environ
    env = (environ.get("KERAS_BACKEND") or "").strip() or None
    if env is not None and env not in BACKENDS:
        raise BackendError(f"KERAS_BACKEND={env}: hpc-retrain runs on {', '.join(BACKENDS)}; set KERAS_BACKEND to "
                           f"one of them, or unset it and set compute.backend")
    if setting is None:
        return (env, "KERAS_BACKEND") if env else ("tensorflow", "the default")
    if setting not in BACKENDS:
        raise BackendError(f"compute.backend={setting}: use one of {', '.join(BACKENDS)}")
    if env is not None and env != setting:
        raise BackendError(f"compute.backend={setting} but KERAS_BACKEND={env}: they disagree; unset KERAS_BACKEND "
                           f"or give --set compute.backend={env}")
    return setting, "compute.backend"


def keras_imported() -> str | None:
    """The backend Keras was imported with in this process, or None when it was not imported yet."""
    if "keras" not in sys.modules:
        return None
    import keras

    return keras.backend.backend()


def installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[name]) is not None


def apply(setting: str | None = None, announce: bool = True) -> str:
    """Resolve and fix the backend for this process (before Keras is imported); the backend's name.

    ``setting``: ``compute.backend`` (a RunConfig's, or None: not given). Called again with the same
    answer it does nothing; a different one after Keras was imported is refused (Keras cannot switch).
    ``announce``: log which backend and why (once per process). A command resolves it up front without
    the line (a bad backend is refused before any work); the stage that loads a model says it, so a command
    that never uses Keras (``synth``, ``evaluate``) does not name one."""
    if setting is not None and not isinstance(setting, str):  # a RunConfig or its compute section
        setting = getattr(getattr(setting, "compute", setting), "backend", None)
    name, why = requested(setting)
    active = keras_imported()
    if active is not None and setting is None and not os.environ.get("KERAS_BACKEND"):
        name, why = active, "Keras was imported with it (keras.json)"  # nothing asked: keep what runs
    if active is not None and active != name:
        raise BackendError(f"compute.backend={name} ({why}), but Keras was already imported in this process with "
                           f"the {active} backend and cannot switch: set compute.backend or KERAS_BACKEND before "
                           f"the first import of keras")
    if active is None:
        if not installed(name):
            extra = "" if name == "tensorflow" else f"[{name}]"
            raise BackendError(f"compute.backend={name} ({why}): {name} is not installed here; "
                               f"pip install 'hpc-retrain{extra}' (or choose another compute.backend)")
        os.environ["KERAS_BACKEND"] = name  # Keras reads it at import; child processes inherit it
    why = _WHY.setdefault(name, why)
    if announce and name not in _LOGGED:
        _LOGGED.add(name)
        log.info("Keras backend: %s (%s)", name, why)
    return name


def current() -> str:
    """The backend in use (Keras imported), or the one that will be (from the environment)."""
    return keras_imported() or requested(None)[0]


# ------------------------------------------------------------------------------------------ devices
def gpu_visible() -> bool:
    """Whether the backend sees a GPU (each framework has its own device probe)."""
    name = current()
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return jax.default_backend() in ("gpu", "cuda", "rocm")
    import torch

    return bool(torch.cuda.is_available())


def gpu_names() -> list[str]:
    """The GPUs the backend sees, by name (for the health check and the GPU benchmark)."""
    name = current()
    if name == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices("GPU")]
    if name == "jax":
        import jax

        return [str(getattr(d, "device_kind", d)) for d in jax.devices() if d.platform != "cpu"]
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def gpu_memory_peak() -> int | None:
    """Bytes of GPU memory at its peak in this process, where the backend reports it; else None."""
    if not gpu_visible():
        return None
    name = current()
    try:
        if name == "tensorflow":
            import tensorflow as tf

            return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
        if name == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return int(stats.get("peak_bytes_in_use", 0)) or None
        import torch

        return int(torch.cuda.max_memory_allocated())
    except Exception:  # only reported, never decisive
        return None


def limit_threads(threads: int) -> bool:
    """Cap the backend's intra-op threads (several worker processes on one machine split the cores);
    False where it cannot be done any more in this process (TensorFlow after it started; JAX, whose XLA CPU
    client fixes its thread pool at start-up and offers no call to change it)."""
    name = current()
    if name == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(1)
            return True
        except RuntimeError:  # TF already initialised in this process; keep its settings
            return False
    if name == "torch":
        import torch

        torch.set_num_threads(int(threads))
        return True
    return False


def enable_determinism() -> None:
    """Deterministic kernels, so a resumed run repeats the interrupted one bit for bit. TensorFlow needs op
    determinism switched on; PyTorch its deterministic algorithms; XLA (JAX) is deterministic on CPU, and on
    GPU with ``--xla_gpu_deterministic_ops`` (set here if JAX is not running yet)."""
    name = current()
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif name == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    elif "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_deterministic_ops" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()


# ------------------------------------------------------------------------------------------ the model
def predict_function(model):
    """``f(batch: ndarray (N, S, S, 3) float32) -> ndarray (N, S, S, C) float32``: the model in inference mode,
    compiled once, reading the model's current weights at every call (validation during training sees each
    epoch's weights)."""
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        # One traced function with a dynamic batch: no retracing, none of ``predict``'s per-call set-up.
        shape = [None] + [int(d) for d in model.input_shape[1:]]
        fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec(shape, tf.float32)])
        return lambda batch: np.asarray(fn(batch).numpy(), np.float32)
    if name == "jax":
        import jax

        # The weights go in as arguments (not constants baked into the compiled function), so an update of
        # the model is seen without recompiling; each batch shape compiles once.
        @jax.jit
        def fn(tv, ntv, x):
            return model.stateless_call(tv, ntv, x, training=False)[0]

        def run(batch):
            tv = [v.value for v in model.trainable_variables]
            ntv = [v.value for v in model.non_trainable_variables]
            return np.asarray(fn(tv, ntv, batch), np.float32)

        return run
    import torch

    def run_torch(batch):
        with torch.no_grad():
            return keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(batch), training=False)
                                              ).astype(np.float32, copy=False)

    return run_torch


def make_train_step(net, opt, compute):
    """``step(x, y) -> (loss, accuracy)`` as Python floats: one optimizer update of ``net``'s trainable
    variables. ``compute(y, p) -> (loss, accuracy)`` is the backend-neutral loss (keras.ops); the loss is
    scaled by ``opt.scale_loss`` (a LossScaleOptimizer under float16; a no-op otherwise) and ``opt.apply``
    unscales the gradients. The variables are updated in place after every step, so a checkpoint may be
    written between any two steps."""
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        return _tf_step(net, opt, compute)
    if name == "jax":
        return _jax_step(net, opt, compute)
    return _torch_step(net, opt, compute)


def _tf_step(net, opt, compute):
    import tensorflow as tf

    shape_x = [None] + [int(d) for d in net.input_shape[1:]]
    shape_y = [None] + [int(d) for d in net.output_shape[1:-1]] + [None]
    spec = (tf.TensorSpec(shape_x, tf.float32), tf.TensorSpec(shape_y, tf.float32))

    @tf.function(input_signature=spec)
    def step(x, y):
        with tf.GradientTape() as tape:
            p = net(x, training=True)
            loss, acc = compute(y, p)
            scaled = opt.scale_loss(loss)
        grads = tape.gradient(scaled, net.trainable_variables)
        opt.apply(grads, net.trainable_variables)
        return loss, acc

    def run(x, y):
        loss, acc = step(x, y)
        return float(loss), float(acc)

    return run


def _jax_step(net, opt, compute):
    import jax
    import keras

    tvars, ntvars = net.trainable_variables, net.non_trainable_variables

    def loss_fn(tv, ntv, ov, x, y):
        # ntv carries BatchNorm statistics and the Dropout layers' seed states, returned updated.
        p, ntv = net.stateless_call(tv, ntv, x, training=True)
        loss, acc = compute(y, p)
        with keras.StatelessScope(state_mapping=list(zip(opt.variables, ov))):
            scaled = opt.scale_loss(loss)  # reads the loss scale from ov, not the (stale) variable
        return scaled, (loss, acc, ntv)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(tv, ntv, ov, x, y):
        (_, (loss, acc, ntv)), grads = grad_fn(tv, ntv, ov, x, y)
        tv, ov = opt.stateless_apply(ov, grads, tv)
        return loss, acc, tv, ntv, ov

    def run(x, y):
        loss, acc, tv, ntv, ov = step([v.value for v in tvars], [v.value for v in ntvars],
                                      [v.value for v in opt.variables], x, y)
        for group, values in ((tvars, tv), (ntvars, ntv), (opt.variables, ov)):
            for v, a in zip(group, values):
                v.assign(a)
        return float(loss), float(acc)

    return run


def _torch_step(net, opt, compute):
    import keras
    import torch

    tvars = net.trainable_variables

    def run(x, y):
        x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        for v in tvars:
            v.value.grad = None
        p = net(x, training=True)
        loss, acc = compute(y, p)
        opt.scale_loss(loss).backward()
        grads = [v.value.grad for v in tvars]
        with torch.no_grad():
            opt.apply(grads, tvars)
        return float(loss.detach()), float(acc.detach())

    return run
