"""Container health check: load the pinned MISIC model, run one tile through it, report the GPUs.

    [KERAS_BACKEND=jax] python -m hpc_retrain.inference.healthcheck [--require-gpu]

Prints one JSON object ``{"model", "sha256", "backend", "gpus", "output_shape", "ok"}`` (plus ``"error"`` on failure)
and exits 0 only when the model loaded, matched its pinned checksum and produced finite output. Used by
the Dockerfile's HEALTHCHECK and the Apptainer image's %test, so a broken image fails at build/start, not
hours into a queued job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def check(require_gpu: bool = False) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter would bury the JSON
    report: dict = {"model": None, "sha256": None, "backend": None, "gpus": [], "output_shape": None, "ok": False}
    try:
        import numpy as np

        from hpc_retrain.inference import backend
        from hpc_retrain.inference import model as M

        report["backend"] = backend.apply()  # KERAS_BACKEND, else tensorflow
        if report["backend"] == "tensorflow":
            M.import_tensorflow()
        report["gpus"] = backend.gpu_names()
        path = M.pretrained_path(verify=False)
        report["model"] = str(path)
        report["sha256"] = M.sha256(path)
        net = M.load(None)  # verifies the checksum against the pin and the tile input/output shapes
        # A list, as the model was saved with list-structured inputs (else Keras warns on every call).
        out = np.asarray(net([np.zeros((1, 256, 256, 3), dtype="float32")], training=False))
        report["output_shape"] = list(out.shape)
        if not np.isfinite(out).all():
            raise RuntimeError("the model's output on a zero tile is not finite")
        if require_gpu and not report["gpus"]:
            raise RuntimeError(
                f"no GPU visible to {report['backend']} (--require-gpu): check the driver, `--gpus all` (Docker) "
                "or `--nv` (Apptainer), and CUDA_VISIBLE_DEVICES"
            )
        report["ok"] = True
    except Exception as e:  # the report must name any failure, whatever raised it
        report["error"] = f"{type(e).__name__}: {e}"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_retrain.inference.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--require-gpu", action="store_true", help="fail when the Keras backend sees no GPU")
    args = parser.parse_args(argv)
    report = check(require_gpu=args.require_gpu)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
