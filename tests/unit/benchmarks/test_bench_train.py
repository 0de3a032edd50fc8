"""The training benchmark's arithmetic (efficiency, where the time goes) and its synthetic store; no training."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import train_bench as tb
from hpc_retrain.prepare import store as st


def _raw(rates: dict[str, float], cpu_factor: float = 0.5) -> dict:
    return {k: [{"wall": v * 0.9, "cpu": v * cpu_factor}, {"wall": v, "cpu": v * cpu_factor},
                {"wall": v * 1.5, "cpu": v * cpu_factor}] for k, v in rates.items()}


def test_summarize_efficiency_and_breakdown():
    rates = {"inference_b8": 4.0, "forward_train": 3.2, "forward_loss": 3.0, "gradients": 1.2,
             "train_device": 1.1, "train_zarr": 1.0, "step_xla": 0.5}
    res = tb.summarize(_raw(rates), batch=8, infer_batch=8, xla=True)
    assert res["efficiency"] == pytest.approx(3 * 1.0 / 4.0)  # medians: the middle repetition
    assert res["efficiency_device"] == pytest.approx(3 * 1.1 / 4.0)
    assert res["efficiency_cpu"] == pytest.approx(0.75)  # the CPU clock, same ratio here
    assert res["xla_speedup_device"] == pytest.approx(0.5 / 1.1)
    assert res["inference_tiles_s"] == {"batch 8": 4.0}
    assert res["train_tiles_s"] == {"zarr": 1.0, "device": 1.1}
    for clock in ("wall", "cpu"):
        parts = res[clock]["seconds_per_tile"]
        step = 1 / res[clock]["tiles_s" if clock == "wall" else "tiles_per_cpu_s"]["train_zarr"]
        assert sum(parts.values()) == pytest.approx(step)  # the cuts add up to the whole step
        assert sum(res[clock]["share_of_step"].values()) == pytest.approx(1.0)
    assert res["wall"]["seconds_per_tile"]["backward"] == pytest.approx(1 / 1.2 - 1 / 3.0)
    assert res["cores_busy"]["train_zarr"] == pytest.approx(2.0)
    assert "XLA step" in tb.efficiency_table({**res, "tiles": 16, "reps": 3, "steps": 2})


def test_summarize_two_inference_batches():
    rates = {"inference_b2": 3.0, "inference_b8": 4.0, "forward_train": 3.2, "forward_loss": 3.0, "gradients": 1.2,
             "train_device": 1.1, "train_zarr": 1.0}
    res = tb.summarize(_raw(rates), batch=2, infer_batch=8, xla=False)
    assert res["efficiency"] == pytest.approx(1.0)  # against inference at the training batch
    assert res["efficiency_vs_infer_default_batch"] == pytest.approx(0.75)
    assert set(res["inference_tiles_s"]) == {"batch 2", "batch 8"}
    text = tb.efficiency_table({**res, "tiles": 4, "reps": 3, "steps": 2})
    assert "efficiency = 3 x train / inference" in text and "XLA" not in text


def test_synthetic_store_with_default_config(tmp_path):
    path = tb.synthetic_store(tmp_path / "s.zarr", 2)
    root = st.open_store(path)
    assert root["targets"].shape[0] >= 2 and root["targets"].shape[1:] == (256, 256, 3)
    assert np.all(np.asarray(root["field_done"][:]) == 1)
