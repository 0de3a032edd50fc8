"""``compute.engine=auto`` on a CPU: the measured faster engine, cached per user (the timing is injected:
no model runs here)."""

import json
import logging

import pytest

from hpc_retrain.inference import engine as E
from hpc_retrain.inference import engine_choice as C


def timer(tf_s: float, ov_s: float, calls: list):
    """A fake ``time_engines``: each engine takes the given seconds per run of 4 tiles."""

    def fn(model, tile, threads, *rest):  # rest: tiles, pairs, the OpenVINO compiler
        calls.append((model, tile, threads))
        return {"tensorflow": [tf_s, tf_s * 1.1, tf_s], "openvino": [ov_s, ov_s * 1.1, ov_s], "tiles": 4}

    return fn


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def test_cache_lives_under_xdg_cache_home(cache_home, monkeypatch):
    assert C.cache_path() == cache_home / "hpc-retrain" / "engine.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert str(C.cache_path()) == "/home/someone/.cache/hpc-retrain/engine.json"


@pytest.mark.parametrize(("tf_s", "ov_s", "want"), [(1.2, 1.0, "openvino"), (1.0, 1.25, "tensorflow")])
def test_the_measured_faster_engine_is_chosen_cached_and_reused(tf_s, ov_s, want, caplog):
    calls = []
    with caplog.at_level(logging.INFO, logger="hpc_retrain.inference.engine_choice"):
        name, why = C.choose("model", 256, None, timer(tf_s, ov_s, calls))
    assert name == want and len(calls) == 1 and "measured now" in why
    assert f"OpenVINO / TensorFlow {tf_s / ov_s:.2f}" in why and "tiles/s" in why
    assert any("timing TensorFlow and OpenVINO" in r.getMessage() for r in caplog.records)
    doc = json.loads(C.cache_path().read_text())
    (key, rec), = doc["choices"].items()
    assert doc["version"] == C.CACHE_VERSION and key == C.machine_key(256)
    assert rec["engine"] == want and rec["tiles_s"]["tensorflow"] == pytest.approx(4 / tf_s, rel=1e-3)
    assert "tile 256" in key and "tensorflow" in key and "openvino" in key
    # the second resolution reads the cache: no timing
    name2, why2 = C.choose("model", 256, None, timer(9.0, 1.0, calls))
    assert name2 == want and len(calls) == 1 and "cached in" in why2
    # another tile size (or thread limit) is another machine key: timed once more, both kept
    C.choose("model", 128, None, timer(tf_s, ov_s, calls))
    C.choose("model", 256, 1, timer(tf_s, ov_s, calls))
    assert len(calls) == 3 and len(json.loads(C.cache_path().read_text())["choices"]) == 3


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 1, "choices": {"k": {"engine": "onnx"}}}',
                                     '{"version": 99, "choices": {}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(content, caplog):
    path = C.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    calls = []
    with caplog.at_level(logging.WARNING, logger="hpc_retrain.inference.engine_choice"):
        assert C.choose(None, 256, None, timer(1.0, 2.0, calls))[0] == "tensorflow"
    assert len(calls) == 1
    assert [r.levelname for r in caplog.records] == ["WARNING"] and str(path) in caplog.records[0].getMessage()
    doc = json.loads(path.read_text())  # rewritten whole, atomically (no temporary file left)
    assert doc["version"] == C.CACHE_VERSION and list(doc["choices"]) == [C.machine_key(256)]
    assert [p.name for p in path.parent.iterdir()] == ["engine.json"]
    assert C.choose(None, 256, None, timer(1.0, 2.0, calls))[0] == "tensorflow" and len(calls) == 1


def test_an_unwritable_cache_leaves_the_choice_to_this_process(cache_home, caplog):
    cache_home.mkdir()
    (cache_home / "hpc-retrain").write_text("a file where the folder should be")
    calls = []
    with caplog.at_level(logging.WARNING, logger="hpc_retrain.inference.engine_choice"):
        assert C.choose(None, 256, None, timer(2.0, 1.0, calls))[0] == "openvino"
    assert any("not cached" in r.getMessage() for r in caplog.records)


def test_a_failed_timing_falls_back_to_tensorflow_uncached(caplog):
    def broken(model, tile, threads):
        raise E.EngineError("OpenVINO could not convert the model")

    with caplog.at_level(logging.WARNING, logger="hpc_retrain.inference.engine_choice"):
        name, why = C.choose(None, 256, None, broken)
    assert name == "tensorflow" and "could not be timed" in why and not C.cache_path().exists()


def test_auto_resolves_by_the_measurement_and_forcing_still_works(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(E, "_RESOLVED", {})
    monkeypatch.setattr(E, "_LOGGED", set())
    monkeypatch.setattr(E, "gpu_visible", lambda: False)
    monkeypatch.setattr(E, "openvino_version", lambda: "2099.1")
    monkeypatch.setattr(C, "time_engines", timer(1.3, 1.0, calls))
    with caplog.at_level(logging.INFO, logger="hpc_retrain.inference.engine"):
        assert E.resolve("auto", "model", 256) == "openvino"
        assert E.resolve("auto", "model", 256) == "openvino"
    assert len(calls) == 1
    msgs = [r.getMessage() for r in caplog.records if r.name == "hpc_retrain.inference.engine"]
    assert len(msgs) == 1 and msgs[0].startswith("inference engine: openvino (compute.engine=auto: OpenVINO / "
                                                 "TensorFlow 1.30")
    assert E.resolve("tensorflow") == "tensorflow" and E.resolve("openvino") == "openvino"
    # a new process on the same machine reads the choice from the cache
    monkeypatch.setattr(E, "_RESOLVED", {})
    monkeypatch.setattr(C, "time_engines", timer(1.0, 9.0, calls))
    assert E.resolve("auto", "model", 256) == "openvino" and len(calls) == 1
    # no measurement where there is nothing to choose from
    monkeypatch.setattr(E, "_RESOLVED", {})
    monkeypatch.setattr(E, "openvino_version", lambda: None)
    assert E.resolve("auto", "model", 256) == "tensorflow" and len(calls) == 1
