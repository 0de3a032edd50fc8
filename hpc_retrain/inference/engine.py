"""Which engine runs the model: OpenVINO on a CPU, TensorFlow on a GPU (``compute.engine``).

OpenVINO converts TensorFlow graphs, so it runs only with the TensorFlow Keras backend (``compute.backend``):
under JAX or PyTorch ``auto`` (and ``keras``) picks the Keras predictor on that backend, and ``openvino`` or
``tensorflow`` is refused in one line. ``keras``: the Keras predictor on whichever backend is in use.

``auto`` (the default) picks TensorFlow when it sees a GPU or OpenVINO is not installed, and otherwise the
engine that is faster on this CPU, timed once per machine and cached per user (``engine_choice``);
``tensorflow`` and ``openvino`` force one. The choice is logged once per process. OpenVINO converts the
loaded Keras model object itself (any MISIC-style model: pretrained, retrained, a checkpoint), once per
model per process, with a dynamic batch and nearest ``UpSampling2D`` as an equal resize (``nearest_as_resize``),
splits each batch over its throughput streams, and runs it in float32: OpenVINO's CPU default on CPUs with
bfloat16 support (AVX512_BF16, AMX) is bfloat16, which moves MISIC's probabilities by up to ~0.03; in
float32 they equal TensorFlow's to ~1e-5. Its threads follow TensorFlow's intra-op limit when the caller set
one (``labels.get_model(threads=...)``), else OpenVINO's default (all cores).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import numpy as np

from hpc_retrain.errors import HpcRetrainError

log = logging.getLogger(__name__)

ENGINES = ("auto", "keras", "tensorflow", "openvino")

_RESOLVED: dict[Any, tuple[str, str]] = {}  # requested (auto: with tile, threads) -> (engine, why)
_LOGGED: set[tuple[str, str]] = set()
_COMPILED: dict[tuple, tuple[Any, OpenVINOModel]] = {}  # (id(model), tile, threads) -> (model ref, runner)
_FAILED: dict[tuple, str] = {}  # conversions that failed (auto falls back to TensorFlow, once)
_LOCK = threading.Lock()


class EngineError(HpcRetrainError, ValueError):
    """An engine that cannot run as asked (unknown, or OpenVINO forced but not installed/convertible)."""


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (or does not import)."""
    try:
        import openvino as ov
    except Exception:  # not installed, or its native libraries do not load here
        return None
    return str(getattr(ov, "__version__", None) or ov.get_version())


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_visible() -> bool:
    from hpc_retrain.inference import backend

    return backend.gpu_visible()


def resolve(engine: str = "auto", model=None, tile: int = 256, threads: int | None = None) -> str:
    """``openvino`` or the Keras backend (``tensorflow``, ``jax``, ``torch``) for a ``compute.engine`` value;
    logged once per process. ``auto`` on a CPU with the TensorFlow backend times ``model`` (None: the
    pretrained MISIC) on both engines the first time this machine and ``tile`` size are seen
    (``engine_choice``)."""
    from hpc_retrain.inference import backend

    if engine not in ENGINES:
        raise EngineError(f"unknown inference engine {engine!r}; use one of {ENGINES}")
    active = backend.current()
    key = engine if engine != "auto" else (engine, int(tile), threads)
    if key not in _RESOLVED and active != "tensorflow":
        if engine in ("openvino", "tensorflow"):
            raise EngineError(f"compute.engine={engine} needs the TensorFlow backend (OpenVINO converts TensorFlow "
                              f"models), but compute.backend is {active}: use compute.engine=auto (the Keras "
                              f"predictor on {active}) or compute.backend=tensorflow")
        _RESOLVED[key] = (active, f"compute.engine={engine}: the Keras predictor on the {active} backend")
    if key not in _RESOLVED:
        ov = openvino_version()
        if engine in ("tensorflow", "keras"):
            _RESOLVED[key] = ("tensorflow", f"compute.engine={engine}")
        elif engine == "openvino":
            if ov is None:
                raise EngineError("compute.engine=openvino, but OpenVINO is not installed here "
                                  "(pip install openvino, or use compute.engine=auto)")
            _RESOLVED[key] = ("openvino", f"OpenVINO {ov} on CPU, compute.engine=openvino")
        elif gpu_visible():
            _RESOLVED[key] = ("tensorflow", "compute.engine=auto: a GPU is visible to TensorFlow")
        elif ov is None:
            _RESOLVED[key] = ("tensorflow", "compute.engine=auto: CPU only, OpenVINO not installed")
        else:  # CPU flags do not tell which is faster (benchmarks/RESULTS.md section 7): measured, cached
            from hpc_retrain.inference import engine_choice

            _RESOLVED[key] = engine_choice.choose(model, tile, threads, compile_openvino=openvino_model)
    name, why = _RESOLVED[key]
    _log_once(name, why)
    return name


def _log_once(name: str, why: str) -> None:
    if (name, why) not in _LOGGED:
        _LOGGED.add((name, why))
        log.info("inference engine: %s (%s)", name, why)


def tensorflow_threads() -> int | None:
    """TensorFlow's intra-op thread limit when one was set in this process, else None (its default)."""
    try:
        import tensorflow as tf

        return int(tf.config.threading.get_intra_op_parallelism_threads()) or None
    except Exception:
        return None


class OpenVINOModel:
    """A Keras model compiled by OpenVINO for the CPU: ``(N, S, S, 3) float32 -> (N, S, S, C) float32`` for
    any N. A batch is split over the compiled model's streams (THROUGHPUT hint: on 2 cores, 2 streams of one
    thread each), run at once. Each thread gets its own infer requests, so threads may share one compiled
    model."""

    def __init__(self, model, tile: int = 256, threads: int | None = None):
        import openvino as ov

        self.tile, self.threads = int(tile), threads
        converted = ov.convert_model(nearest_as_resize(model), input=[(-1, self.tile, self.tile, 3)])
        # Streams of one thread each need no barrier between threads, which loaded cores made costly
        # (benchmarks/RESULTS.md section 7); unpinned threads can yield to the pipeline's helper thread.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
                                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(converted, "CPU", config)
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.channels = self.compiled.output(0).get_partial_shape()[-1].get_length()
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = self._local.requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        batch = np.ascontiguousarray(batch, np.float32)
        if not len(batch):
            return np.empty((0, self.tile, self.tile, self.channels), np.float32)
        step = -(-len(batch) // self.requests)
        parts = [(req, i) for req, i in zip(reqs, range(0, len(batch), step))]
        for req, i in parts:
            req.start_async({0: batch[i:i + step]}, share_inputs=True)
        out = np.empty((len(batch), self.tile, self.tile, self.channels), np.float32)
        for req, i in parts:
            req.wait()
            out[i:i + step] = req.get_output_tensor(0).data  # a copy: the request reuses its buffer
        return out


def nearest_as_resize(model):
    """``model`` with each nearest ``UpSampling2D`` as a nearest resize, the same values (an integer factor
    copies pixels): Keras 3 writes UpSampling2D as repeat ops that OpenVINO runs as reference Tile and
    Transpose kernels (~10% of MISIC's time on CPU); a resize becomes its JIT Interpolate. Other layers are
    fresh copies with the same weights, so ``model`` itself is untouched. ``model`` unchanged when it has no
    such layer or cannot be cloned (not functional, custom layers, unknown tile size)."""
    import keras

    class NearestResize(keras.layers.Layer):
        def __init__(self, size, **kw):
            super().__init__(**kw)
            self.size = tuple(size)

        def call(self, x):
            h, w = x.shape[1], x.shape[2]
            if h is None or w is None:
                raise ValueError("needs a static height and width")
            return keras.ops.image.resize(x, (h * self.size[0], w * self.size[1]), interpolation="nearest")

    def clone(layer):
        if (isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation == "nearest"
                and layer.data_format == "channels_last"):
            return NearestResize(layer.size, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    if not any(isinstance(layer, keras.layers.UpSampling2D) for layer in getattr(model, "layers", ())):
        return model
    try:
        out = keras.models.clone_model(model, clone_function=clone)
        out.set_weights(model.get_weights())
        return out
    except Exception as e:  # keep the repeat ops: slower, same values
        log.debug("OpenVINO: UpSampling2D kept (%s: %s)", type(e).__name__, e)
        return model


def openvino_model(model, tile: int = 256, threads: int | None = None) -> OpenVINOModel:
    """``model`` compiled by OpenVINO, once per model (and tile size, thread limit) per process.

    ``threads``: None follows TensorFlow's intra-op limit if one was set (``tensorflow_threads``)."""
    if threads is None:
        threads = tensorflow_threads()
    key = (id(model), int(tile), threads)
    with _LOCK:
        hit = _COMPILED.get(key)
        if hit is not None and hit[0]() is model:
            return hit[1]
        if key in _FAILED and _FAILED[key][0]() is model:
            raise EngineError(_FAILED[key][1])
        try:
            runner = OpenVINOModel(model, tile, threads)
        except Exception as e:
            msg = f"OpenVINO could not convert {getattr(model, 'name', 'the model')}: {type(e).__name__}: {e}"
            _FAILED[key] = (_ref(model), msg)
            raise EngineError(msg) from e
        _COMPILED[key] = (_ref(model), runner)
        return runner


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weakly referenceable: keep it alive, so its id is never reused
        return lambda: obj


def for_model(model, engine: str = "auto", tile: int = 256, threads: int | None = None
              ) -> tuple[str, OpenVINOModel | None]:
    """(engine name, the OpenVINO model or None for the Keras predictor) to run ``model`` with.

    ``auto`` falls back to TensorFlow (one warning) if OpenVINO cannot convert this model; a forced
    ``openvino`` raises ``EngineError`` then."""
    if threads is None:
        threads = tensorflow_threads()
    name = resolve(engine, model, tile, threads)
    if name != "openvino":
        return name, None
    try:
        return name, openvino_model(model, tile, threads)
    except EngineError as e:
        if engine == "openvino":
            raise
        key = ("tensorflow", f"compute.engine=auto: {e}")
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning("inference engine: tensorflow (%s)", key[1])
        return "tensorflow", None


# Engine preference per model, for callers that hold only the model (labels.predict_tiles).
_PREFERRED: dict[int, tuple[Any, str]] = {}


def prefer(model, engine: str) -> None:
    """Remember ``engine`` as the one to run ``model`` with where no engine is passed."""
    if engine not in ENGINES:
        raise EngineError(f"unknown inference engine {engine!r}; use one of {ENGINES}")
    _PREFERRED[id(model)] = (_ref(model), engine)


def preferred(model) -> str:
    hit = _PREFERRED.get(id(model))
    return hit[1] if hit is not None and hit[0]() is model else "auto"
