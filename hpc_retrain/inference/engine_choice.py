"""``compute.engine=auto`` on a CPU: the faster engine here, by measurement, remembered per user.

The first time a machine (CPU model and cores, TensorFlow and OpenVINO versions, tile size) is seen, both
engines run the model on a few tiles, back to back in alternating pairs, and the median of the pairs'
TensorFlow / OpenVINO time ratios decides (OpenVINO when it is at least as fast). The figures go to the log
and, with the choice, to a JSON cache per user: ``$XDG_CACHE_HOME/hpc-retrain/engine.json`` (default
``~/.cache/hpc-retrain/engine.json``), written atomically; later runs read the choice from it without timing.
A cache that cannot be read or parsed is ignored with one warning and rewritten by the next measurement; one
that cannot be written leaves the choice to this process (a warning). Delete the file to measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TILES = 4  # tiles per timing (one OpenVINO call split over its streams; TensorFlow one tile per call)
PAIRS = 3  # alternating TensorFlow/OpenVINO pairs timed after one untimed warm-up call each

# A timer: (model, tile, threads) -> {"tensorflow": [s, ...], "openvino": [s, ...], "tiles": n}, the seconds
# of PAIRS alternating runs on the same tiles (tests inject their own).
Timer = Callable[[Any, int, "int | None"], dict]

_LOCK = threading.Lock()


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hpc-retrain" / "engine.json"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_key(tile: int, threads: int | None = None) -> str:
    """What the choice depends on: the CPU (model, cores usable, thread limit), the engines' versions, the
    tile size."""
    tf = _version("tensorflow") or _version("tensorflow-cpu")
    parts = [cpu_model(), f"{cores()} cores", f"tensorflow {tf}", f"openvino {_version('openvino')}", f"tile {tile}"]
    if threads:
        parts.append(f"{threads} threads")
    return " | ".join(parts)


def read_cache(path: Path | None = None) -> dict:
    """The cached choices (key -> record); {} when there is none, and {} with a warning when the file is
    unreadable or not a cache of this version (the next measurement rewrites it)."""
    path = path or cache_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("engine choice cache %s is unreadable (%s: %s); ignoring it, it will be rewritten",
                    path, type(e).__name__, e)
        return {}
    choices = doc.get("choices") if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION else None
    if not isinstance(choices, dict) or not all(isinstance(v, dict) and v.get("engine") in ("tensorflow", "openvino")
                                                for v in choices.values()):
        log.warning("engine choice cache %s is not a version-%d cache; ignoring it, it will be rewritten",
                    path, CACHE_VERSION)
        return {}
    return choices


def write_cache(choices: dict, path: Path | None = None) -> bool:
    from hpc_retrain.io import atomic

    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"version": CACHE_VERSION, "choices": choices})
        return True
    except OSError as e:
        log.warning("engine choice not cached: cannot write %s (%s)", path, e)
        return False


def time_engines(model, tile: int = 256, threads: int | None = None, tiles: int = TILES, pairs: int = PAIRS,
                 compile_openvino: Callable | None = None) -> dict:
    """Seconds of each engine on the same ``tiles`` random tiles, ``pairs`` times, alternating (the order
    flips each pair), after one untimed call each (TensorFlow's tracing, OpenVINO's first inference).
    TensorFlow runs one tile per call, as ``Predictor`` does on a CPU; OpenVINO the whole stack in one call.
    ``compile_openvino``: ``engine.openvino_model`` (passed in by the engine module, which imports this one)."""
    import tensorflow as tf

    if compile_openvino is None:
        raise ValueError("time_engines needs compile_openvino (engine.openvino_model)")

    if model is None:
        from hpc_retrain.inference import model as M

        model = M.load(None, tile)
    x = np.random.default_rng(0).random((tiles, tile, tile, 3), dtype=np.float32)
    fn = tf.function(lambda t: model(t, training=False),
                     input_signature=[tf.TensorSpec([None, tile, tile, 3], tf.float32)])
    ov = compile_openvino(model, tile, threads)

    def run_tf():
        for i in range(len(x)):
            fn(x[i:i + 1]).numpy()

    run = {"tensorflow": run_tf, "openvino": lambda: ov(x)}
    for f in run.values():
        f()
    out: dict[str, Any] = {"tensorflow": [], "openvino": [], "tiles": tiles}
    for i in range(pairs):
        for e in (("tensorflow", "openvino") if i % 2 == 0 else ("openvino", "tensorflow")):
            t = time.perf_counter()
            run[e]()
            out[e].append(time.perf_counter() - t)
    return out


def _measure(model, tile: int, threads: int | None, timer: Timer) -> dict:
    t = timer(model, tile, threads)
    ratios = [a / b for a, b in zip(t["tensorflow"], t["openvino"])]
    speedup = float(np.median(ratios))
    n = t["tiles"]
    return {"engine": "openvino" if speedup >= 1.0 else "tensorflow", "openvino_over_tensorflow": round(speedup, 3),
            "ratios": [round(r, 3) for r in ratios], "tiles": n,
            "tiles_s": {e: round(n / float(np.median(t[e])), 3) for e in ("tensorflow", "openvino")},
            "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(rec: dict, cached: bool, path: Path) -> str:
    r = rec["tiles_s"]
    how = f"cached in {path}, measured {rec['measured']}" if cached else f"measured now, cached in {path}"
    return (f"compute.engine=auto: OpenVINO / TensorFlow {rec['openvino_over_tensorflow']:.2f} on this CPU "
            f"(TensorFlow {r['tensorflow']:.2f}, OpenVINO {r['openvino']:.2f} tiles/s, median of "
            f"{len(rec['ratios'])} pairs on {rec['tiles']} tiles at load {rec['load']}; {how}; delete it to "
            f"measure again, compute.engine=tensorflow|openvino forces one)")


def choose(model=None, tile: int = 256, threads: int | None = None, timer: Timer | None = None,
           compile_openvino: Callable | None = None) -> tuple[str, str]:
    """(engine, why) for ``compute.engine=auto`` on a CPU with both engines: the cached choice for this
    machine, else measured now (``timer``, default ``time_engines``; ``model`` None: the pretrained MISIC)
    and cached."""
    path, key = cache_path(), machine_key(int(tile), threads)
    with _LOCK:
        choices = read_cache(path)
        rec = choices.get(key)
        if rec is not None and isinstance(rec.get("tiles_s"), dict):
            try:
                return rec["engine"], describe(rec, True, path)
            except (KeyError, TypeError, ValueError):
                log.warning("engine choice cache %s: the entry for this machine is damaged; measuring again", path)
        log.info("compute.engine=auto: timing TensorFlow and OpenVINO on this CPU (once per machine; %s)", key)
        try:
            # positional: a timer is called as (model, tile, threads, ...)
            rec = _measure(model, int(tile), threads,
                           timer or (lambda m, t, th: time_engines(m, t, th, TILES, PAIRS, compile_openvino)))
        except Exception as e:  # OpenVINO cannot convert this model, say: TensorFlow, nothing cached
            log.warning("compute.engine=auto: the engines could not be timed (%s: %s); using TensorFlow",
                        type(e).__name__, e)
            return "tensorflow", f"compute.engine=auto: the engines could not be timed ({type(e).__name__}: {e})"
        rec["key"] = key
        choices[key] = rec
        write_cache(choices, path)
        return rec["engine"], describe(rec, False, path)
