"""Shared fixtures. Real data lives beside the project (../shared/data/colicoords) and is never copied in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# submitit configures logging when first imported; if that happens after TensorFlow (absl) has set up its
# handler inside a test, it closes a stream pytest's capture still owns. Importing it first avoids that.
import submitit  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
COLICOORDS = Path(os.environ.get("HPC_RETRAIN_COLICOORDS", ROOT.parent / "shared" / "data" / "colicoords"))

# Quiet TensorFlow's start-up chatter in test logs; it does not change results.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def colicoords() -> Path:
    if not (COLICOORDS / "ds1" / "brightfield").is_dir():
        pytest.skip(f"ColiCoords test data not found at {COLICOORDS} (it lives in ../shared beside the project)")
    return COLICOORDS


@pytest.fixture(scope="session")
def pretrained_model():
    from hpc_retrain.inference import model

    return model.load()


@pytest.fixture(autouse=True)
def _logging_handlers_stay_with_their_test():
    # cli.main's logging.basicConfig binds a handler to the stderr capsys lends a test; once that stream
    # is closed, later log records (TensorFlow's included) would write to it and break pytest's capture.
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in root.handlers[:]:
        if h not in before:
            root.removeHandler(h)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # `make test` runs two pytest-xdist workers (--dist loadgroup): on two cores one test's single-threaded
    # stretches (importing TensorFlow, tracing a step, writing Zarr, waiting on a subprocess) leave the other core
    # idle. A group runs on one worker: a module keeps its module-scoped fixtures (built once, not per worker),
    # and every test on the one-node Slurm cluster runs one after the other, as they assume an idle cluster.
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
