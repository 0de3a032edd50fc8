"""Faults and bad input, round 3 (issue 26), reproduced with real files and real processes.

Each test names the issue's item it covers; pure-function cases are in ``tests/unit/test_faults_round3.py``.
Plates are tiny synthetic ones (``hpc-retrain synth``, 128 px), so each case takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _cli(*args, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_retrain", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The one error line the CLI printed (other stderr lines are logging); exit status 2, no traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"hpc-retrain {command}:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    return lines[0]


def _synth(out: Path, *extra) -> Path:
    r = _cli("synth", "--out", out, "--wells", "A1", "--fields", "2", "--size", "128", "--density", "0.2", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 1: binary masks
@pytest.mark.parametrize("kind", ["0/255", "0.0/1.0"])
def test_evaluate_splits_binary_reference_masks_into_cells_and_says_so(tmp_path, kind):
    pred = _synth(tmp_path / "p.zarr")  # label image "truth" = the synthetic cells
    ref = _synth(tmp_path / "ref")  # the same cells as masks, rewritten as binary masks
    for f in ref.glob("*_masks.tif"):
        m = tifffile.imread(f) > 0
        tifffile.imwrite(f, (m * 255).astype(np.uint8) if kind == "0/255" else m.astype(np.float32))
    out = _cli("evaluate", "--pred", pred, "--name", "truth", "--ref", "masks", "--ref-plate", ref,
               "--out", tmp_path / "eval", "--overlays", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "read as binary masks" in out.stderr
    scores = json.loads((tmp_path / "eval" / "scores_truth.json").read_text())
    # Touching cells merge in a binary mask, so not every cell matches; one object per field scored 0.
    assert scores["overall"][0]["recall"] > 0.5 and scores["overall"][0]["f1"] > 0.3


# ------------------------------------------------------------------------------------------ 2: crossval's plate
def test_crossval_refuses_an_out_folder_of_another_plate(tmp_path):
    from hpc_retrain import crossval
    from hpc_retrain.config import PlateConfig
    from hpc_retrain.plate import open_plate

    a = _synth(tmp_path / "a")
    b = _synth(tmp_path / "b", "--seed", "5")
    out = tmp_path / "cv"
    out.mkdir()
    crossval.claim_out(out, open_plate(PlateConfig(path=a)))  # what a crossval of plate a records first
    r = _cli("crossval", "--plate", b, "--out", out, "--mean-width", "7", timeout=120)
    line = _error_line(r, "crossval")
    assert str(a) in line and str(b) in line and "choose another --out" in line
    # the same path rewritten with other images is another plate too
    r = _cli("synth", "--out", a, "--wells", "A1", "--fields", "2", "--size", "128", "--seed", "9", "--overwrite")
    assert r.returncode == 0, r.stderr
    line = _error_line(_cli("crossval", "--plate", a, "--out", out, "--mean-width", "7", timeout=120), "crossval")
    assert "an earlier version of" in line
    # folds of a crossval that recorded no plate (an earlier version of the tool) are not reused either
    old = tmp_path / "old"
    (old / "fold1" / "train_plate").mkdir(parents=True)
    line = _error_line(_cli("crossval", "--plate", b, "--out", old, "--mean-width", "7", timeout=120), "crossval")
    assert "fold1" in line and "choose another --out" in line


def test_crossval_on_a_one_field_plate_says_it_needs_two_fields(tmp_path):
    plate = tmp_path / "one"
    r = _cli("synth", "--out", plate, "--wells", "A1", "--fields", "1", "--size", "128")
    assert r.returncode == 0, r.stderr
    line = _error_line(_cli("crossval", "--plate", plate, "--out", tmp_path / "cv", "--mean-width", "7",
                            timeout=120), "crossval")
    assert "at least 2 fields" in line and "not found" not in line
