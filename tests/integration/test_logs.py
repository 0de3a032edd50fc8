"""What a run prints where nobody watches a terminal (a Slurm log file): real subprocesses, stdout and stderr
pipes, so not a TTY. No progress-bar redraws (carriage returns), the per-field log lines instead, no
TensorFlow device-probing noise unless -v, and -q (after the subcommand too) keeps INFO lines out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_retrain.synth import plates as synth

ROOT = Path(__file__).resolve().parents[2]
W = "7"  # the synthetic cells' width, given: measuring it is tested elsewhere
INFO = re.compile(r"^\d\d:\d\d:\d\d INFO ", re.M)
# TensorFlow's native start-up lines on a CPU machine (device probing, build notes)
TF_NOISE = re.compile(r"absl::InitializeLog|cuInit|cudart_stub|cuda drivers|port\.cc|cpu_feature_guard")


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    return synth.write_plate(tmp_path_factory.mktemp("plate") / "P", fmt="tiff", wells=["A1"],
                             fields_per_well=1, shape=(256, 256), seed=5)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's default, not ours
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cli(cwd: Path, *args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "hpc_retrain", *map(str, args)], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def test_prepare_without_terminal_logs_lines_not_bars(plate, tmp_path):
    res = _cli(tmp_path, "prepare", "--plate", plate, "--out", tmp_path / "s.train.zarr", "--mean-width", W)
    assert "\r" not in res.stdout and "\r" not in res.stderr
    assert not TF_NOISE.search(res.stderr), res.stderr
    assert re.search(r"INFO hpc_retrain\.prepare\.pipeline: A1 0: labels ok", res.stderr), res.stderr
    assert re.search(r"INFO hpc_retrain\.prepare\.pipeline: A1 0: targets ok", res.stderr), res.stderr


def test_prepare_quiet_after_the_subcommand(plate, tmp_path):
    res = _cli(tmp_path, "prepare", "-q", "--plate", plate, "--out", tmp_path / "q.train.zarr", "--mean-width", W)
    assert not INFO.search(res.stderr), res.stderr
    assert "1 ok" in res.stdout  # the summary is output, not logging


def test_segment_logs_a_line_per_field_and_verbose_after_the_subcommand(plate, tmp_path):
    res = _cli(tmp_path, "segment", "--plate", plate, "--out", tmp_path / "o.ome.zarr",
               "--set", "preprocess.mean_width=7")
    assert "\r" not in res.stderr and "DEBUG" not in res.stderr
    assert not TF_NOISE.search(res.stderr), res.stderr
    assert re.search(r"INFO hpc_retrain\.segment\.pipeline: segment 1/1 ", res.stderr), res.stderr  # a line per field
    assert res.stderr.count("Keras backend: ") == 1, res.stderr  # named once, by the stage that loads the model
    verbose = _cli(tmp_path, "segment", "-v", "--plate", plate, "--out", tmp_path / "v.ome.zarr",
                   "--set", "preprocess.mean_width=7")
    assert "DEBUG" in verbose.stderr


def test_a_command_that_never_uses_keras_names_no_backend(tmp_path):
    res = _cli(tmp_path, "synth", "--out", tmp_path / "s.zarr", "--size", "64", "--wells", "A1", "--fields", "1")
    assert "Keras backend" not in res.stderr, res.stderr
