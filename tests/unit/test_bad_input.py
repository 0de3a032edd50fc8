"""Faults and bad input, round 3 (issue 26): pure functions, no subprocess, no training.

Each test names the issue's item it covers; the subprocess cases are in
``tests/integration/test_faults_round3.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpc_retrain.evaluate import scoring
from hpc_retrain.imaging import metrics


# ------------------------------------------------------------------------------------------ 1: binary masks
def _two_cells() -> np.ndarray:
    lab = np.zeros((32, 32), np.int32)
    lab[2:8, 2:12] = 1
    lab[20:28, 15:20] = 2
    return lab


@pytest.mark.parametrize("make", [
    lambda lab: (lab > 0).astype(np.uint8) * 255,  # ImageJ/Fiji's binary export
    lambda lab: (lab > 0).astype(np.float32),  # 0.0/1.0
    lambda lab: (lab > 0).astype(np.uint16) * 7,
    lambda lab: lab > 0,
])
def test_binary_reference_masks_are_split_into_cells_whatever_their_values(make):
    lab = _two_cells()
    ref, reading = scoring.reference_instances(make(lab))
    assert reading == scoring.BINARY
    assert len(np.unique(ref)) == 3
    assert metrics.match(ref, lab, (0.5,))[0].f1 == 1.0


def test_label_references_keep_their_ids_and_bad_values_are_refused():
    lab = _two_cells() * 1000  # large, sparse ids
    ref, reading = scoring.reference_instances(lab.astype(np.float64))
    assert reading == scoring.LABELS and metrics.match(ref, _two_cells(), (0.5,))[0].f1 == 1.0
    with pytest.raises(scoring.EvaluateError, match="fractional"):
        scoring.reference_instances(np.full((4, 4), 0.3))
    with pytest.raises(scoring.EvaluateError, match="negative"):
        scoring.reference_instances(-_two_cells())


# ------------------------------------------------------------------------------------------ 7, 10, 11: settings
@pytest.mark.parametrize("name", ["", "../../../x", "a/b", ".hidden", "a b", "x" * 101, "é"])
def test_result_names_follow_one_rule(name):
    from hpc_retrain.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="infer.name") as e:
        RunConfig().updated(infer__name=name)
    assert "letters, digits" in str(e.value)


def test_good_names_pass():
    from hpc_retrain.config import RunConfig

    for name in ("misic", "r1", "run-2.best", "A_b"):
        assert RunConfig().updated(infer__name=name).infer.name == name


@pytest.mark.parametrize("width", [0.01, 1.5, 201, 500, 1e6])
def test_extreme_mean_widths_are_refused_with_the_reason(width):
    from hpc_retrain.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="preprocess.mean_width") as e:
        RunConfig.load(overrides=[f"preprocess.mean_width={width}"])
    assert "10/mean_width" in str(e.value)


def test_a_resize_that_needs_more_memory_than_there_is_is_refused_before_allocating(monkeypatch):
    from hpc_retrain.config import ChannelPrep
    from hpc_retrain.imaging import preprocess as P

    monkeypatch.setattr(P, "available_memory", lambda: 64 * 2**20)  # 64 MiB
    im = np.random.default_rng(0).integers(0, 1000, (1024, 1024)).astype(np.uint16)
    with pytest.raises(P.ImageError, match="GiB") as e:
        P.prepare_np(im, ChannelPrep(), 5.0, source="f.tif")
    assert "f.tif" in str(e.value) and "mean_width" in str(e.value)
    with pytest.raises(P.ImageError, match="too small"):
        P.prepare_np(im[:64, :64], ChannelPrep(), 0.05, source="f.tif")


def test_seed_true_is_not_one_and_a_pattern_placeholder_twice_is_refused():
    from hpc_retrain.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="seed"):
        RunConfig.load(overrides=["seed=true"])
    with pytest.raises(ConfigError, match="plate.pattern") as e:
        RunConfig.load(overrides=["plate.pattern={well}_{field}_{field}_{channel}.tif"])
    assert "more than once" in str(e.value)


# ------------------------------------------------------------------------------------------ misleading errors
def test_an_unreadable_chunk_for_permissions_is_not_called_corrupt(tmp_path):
    import errno
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainstore import build_store

    from hpc_retrain.config import RunConfig
    from hpc_retrain.training import data as td

    store = build_store(tmp_path / "s.zarr", n_fields=2, cfg=RunConfig().updated(preprocess__mean_width=7.0))
    reader = td.TileReader(store)
    chunk = store / "targets" / "c" / "1" / "0" / "0" / "0"
    line = td._unreadable_tile(reader, 1, PermissionError(errno.EACCES, "Permission denied", str(chunk)))
    assert "permission denied" in line and str(chunk) in line and "fix the permissions" in line
    assert "delete" not in line and "corrupt" not in line
    line = td._unreadable_tile(reader, 1, ValueError("bad data"))
    assert "truncated or corrupt" in line  # real damage still says so
