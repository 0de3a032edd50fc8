"""Faults and bad input, round 3 (issue 26): pure functions, no subprocess, no training.

Each test names the issue's item it covers; the subprocess cases are in
``tests/integration/test_faults_round3.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpc_retrain import evaluation as E


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
    ref, reading = E.reference_instances(make(lab))
    assert reading == E.BINARY
    assert len(np.unique(ref)) == 3
    assert E.match(ref, lab, (0.5,))[0].f1 == 1.0


def test_label_references_keep_their_ids_and_bad_values_are_refused():
    lab = _two_cells() * 1000  # large, sparse ids
    ref, reading = E.reference_instances(lab.astype(np.float64))
    assert reading == E.LABELS and E.match(ref, _two_cells(), (0.5,))[0].f1 == 1.0
    with pytest.raises(E.EvaluateError, match="fractional"):
        E.reference_instances(np.full((4, 4), 0.3))
    with pytest.raises(E.EvaluateError, match="negative"):
        E.reference_instances(-_two_cells())
