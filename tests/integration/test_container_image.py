"""The Docker image, built for real and run: container/Dockerfile on a local Debian base, offline, with podman.

``container/build-local.sh`` builds it from a clean context (the files git knows, filtered by .dockerignore,
plus a wheelhouse `pip download`ed with container/constraints.txt), with no network, as an air-gapped site
would. Inside the image: the health check its HEALTHCHECK runs (the pinned weights load, TensorFlow runs a
tile), and a small ``synth`` + ``segment`` into a mounted folder, whose arrays must equal those of the same
commands run outside it with this checkout's environment.

Needs root (rootful podman; debootstrap makes the base once) on Debian/Ubuntu; the script installs podman,
runc and debootstrap with apt-get when they are missing. Elsewhere the tests skip, except in CI (CI=true),
where they fail: CI's verdict includes the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import zarr

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "container" / "build-local.sh"
TAG = os.environ.get("HPC_RETRAIN_TEST_IMAGE", "localhost/hpc-retrain:test")
PODMAN = ["podman", "--runtime", "runc"]
# runc refuses this kind of host's hard limits (note: /work/shared/notes/containers-local.md)
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# The same tolerance as "the same store" (tests/integration/test_store_faults.py::_assert_same_store):
# TensorFlow's CPU kernels may sum in another order when the thread count differs.
PROB_ATOL = 2e-3

SYNTH = ["synth", "--wells", "A1", "--fields", "2", "--size", "300", "--seed", "5"]

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; in CI the image is built and run (tests marked 'container'), see .ci/run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        _unavailable("building the image needs root (rootful podman; debootstrap makes the base)")
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        _unavailable("podman is not installed and there is no apt-get to install it")
    if shutil.which("podman") is not None:
        probe = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            _unavailable(f"podman does not work here: {probe.stderr.strip()[-500:]}")
    proc = subprocess.run(["bash", str(BUILD), TAG], capture_output=True, text=True, timeout=2000)
    assert proc.returncode == 0, f"container/build-local.sh failed:\n{proc.stderr[-6000:]}"
    assert proc.stdout.strip().splitlines()[-1] == TAG
    return TAG


def podman_run(image: str, *args: str, mounts: dict[Path, str] | None = None, entrypoint: str | None = None,
               options: tuple[str, ...] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [*PODMAN, "run", "--rm", "--network", "none", *LIMITS, *options]
    for host, inside in (mounts or {}).items():
        cmd += ["-v", f"{host}:{inside}"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=timeout)


def inspect(image: str) -> dict:
    out = subprocess.run([*PODMAN, "image", "inspect", image], capture_output=True, text=True, check=True)
    (info,) = json.loads(out.stdout)
    return info


def healthcheck(image: str) -> list[str]:
    """The image's HEALTHCHECK command (podman reports it beside Config, Docker inside it)."""
    info = inspect(image)
    return (info.get("Healthcheck") or info["Config"]["Healthcheck"])["Test"]


def test_image_is_built_on_the_local_base_with_its_metadata(image):
    info = inspect(image)
    cfg = info["Config"]
    assert cfg["User"] == "hpc" and cfg["Entrypoint"] == ["hpc-retrain"]
    assert healthcheck(image) == ["CMD", "python3", "-m", "hpc_retrain.inference.healthcheck"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cfg["Labels"]["org.opencontainers.image.version"] == version
    # Runs as uid 1000, not root; no wheel and no copy of the source stayed in the image; pip finds every
    # dependency of what it installed.
    proc = podman_run(image, "-c", "id -u; ls -A /tmp /opt/hpc-retrain | tr '\\n' ' '; echo; python3 -m pip check",
                      entrypoint="/bin/sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uid, listing, pip_check = proc.stdout.splitlines()
    assert uid == "1000"
    assert listing.split() == ["/opt/hpc-retrain:", "constraints.txt", "/tmp:"], listing
    assert pip_check.startswith("No broken requirements"), pip_check


def test_healthcheck_in_the_image(image):
    """The image's own HEALTHCHECK command, run read-only (as an Apptainer .sif is) and offline."""
    from hpc_retrain.inference.model import PRETRAINED_SHA256

    test = healthcheck(image)
    assert test[0] == "CMD"
    proc = podman_run(image, *test[2:], entrypoint=test[1], options=("--read-only",))
    assert proc.returncode == 0, f"healthcheck failed in the image:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] is True, report
    assert report["sha256"] == PRETRAINED_SHA256
    assert Path(report["model"]).name == "MiSiDC04082020.h5"
    assert report["output_shape"] == [1, 256, 256, 2]
    assert report["gpus"] == []  # a CPU machine; on a GPU node it would list them (--require-gpu)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():  # synth.json beside the plate's groups is not a Zarr node; that is fine
        warnings.filterwarnings("ignore", "Object at .* is not recognized as a component of a Zarr hierarchy")
        group = zarr.open_group(str(path), mode="r")
        return {name: node[...] for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def _host_cli() -> list[str]:
    script = Path(sys.executable).with_name("hpc-retrain")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hpc_retrain"]


def test_synth_and_segment_in_the_image_equal_the_same_commands_outside(image, tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    inside.chmod(0o777)  # the image's user (uid 1000) and an arbitrary one write there

    # In the image: synth as its own user, segment as an arbitrary uid on a read-only root (as Apptainer runs a
    # .sif: the calling user, nothing writable but the mounts and /tmp).
    proc = podman_run(image, *SYNTH, "--out", "/data/plate.ome.zarr", mounts={inside: "/data"})
    assert proc.returncode == 0, f"synth in the image:\n{proc.stderr[-3000:]}"
    proc = podman_run(image, "segment", "--plate", "/data/plate.ome.zarr", "--out", "/data/seg.ome.zarr",
                      mounts={inside: "/data"}, options=("--user", "4321:4321", "--read-only"))
    assert proc.returncode == 0, f"segment in the image:\n{proc.stderr[-3000:]}"

    # Outside: the same commands with this checkout's environment.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for argv in (SYNTH + ["--out", str(outside / "plate.ome.zarr")],
                 ["segment", "--plate", str(outside / "plate.ome.zarr"), "--out", str(outside / "seg.ome.zarr")]):
        proc = subprocess.run([*_host_cli(), *argv], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{argv[0]} outside the image:\n{proc.stderr[-3000:]}"

    # The synthetic plate: bit-identical (numpy and scikit-image at the pinned versions, no TensorFlow).
    a, b = _arrays(inside / "plate.ome.zarr"), _arrays(outside / "plate.ome.zarr")
    assert sorted(a) == sorted(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"plate.ome.zarr/{name}")

    # The segmentation: the images it copies bit-identical; probabilities within PROB_ATOL; labels identical
    # whenever the probabilities are (the post-processing is deterministic), else different on < 0.1 % of pixels.
    a, b = _arrays(inside / "seg.ome.zarr"), _arrays(outside / "seg.ome.zarr")
    assert sorted(a) == sorted(b)
    labels = [n for n in a if "/labels/misic/" in n]
    probs = [n for n in a if "/probabilities/misic/" in n]
    assert len(labels) == len(probs) == 2, sorted(a)
    same_probs = True
    for name in probs:
        assert a[name].shape == b[name].shape
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=PROB_ATOL, err_msg=name)
        same_probs &= bool(np.array_equal(a[name], b[name]))
    for name in labels:
        assert a[name].max() > 20, f"{name}: too few cells to compare ({a[name].max()})"
        if same_probs:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert np.mean(a[name] != b[name]) < 1e-3, name
    for name in set(a) - set(labels) - set(probs):
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"seg.ome.zarr/{name}")
    # Same model, engine and settings recorded in both (the plate's path aside: /data/... inside).
    for field in ("A/1/0", "A/1/1"):
        pa = zarr.open_group(str(inside / "seg.ome.zarr"), mode="r")[f"{field}/labels/misic"].attrs["hpc_retrain"]
        pb = zarr.open_group(str(outside / "seg.ome.zarr"), mode="r")[f"{field}/labels/misic"].attrs["hpc_retrain"]
        for key in ("version", "model_sha256", "engine", "mode", "cells", "complete"):
            assert pa[key] == pb[key], (field, key, pa[key], pb[key])
        for prov in (pa, pb):
            prov["config"]["plate"].pop("path")
        assert pa["config"] == pb["config"], field
