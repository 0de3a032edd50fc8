"""The prepare benchmark's model clock (the labels pass's fraction of time in the model); no model runs."""

import time

import numpy as np

from benchmarks import prepare_bench as pb
from hpc_retrain.inference import predictor as infer


def test_model_clock_sums_the_time_inside_model_calls_and_restores_the_predictor(monkeypatch):
    def call(self, tiles):
        time.sleep(0.01)
        return np.zeros(tiles.shape[:3] + (2,), np.float32)

    monkeypatch.setattr(infer.Predictor, "__call__", call)
    p = object.__new__(infer.Predictor)
    with pb.ModelClock() as clock:
        p(np.zeros((3, 8, 8, 3), np.float32))
        p(np.zeros((2, 8, 8, 3), np.float32))
    assert clock.calls == 2 and clock.tiles == 5 and 0.02 <= clock.seconds < 1
    assert infer.Predictor.__call__ is call
    p(np.zeros((1, 8, 8, 3), np.float32))
    assert clock.calls == 2
