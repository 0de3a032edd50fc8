"""Faults from the project's faults issue, each reproduced with real files and real processes.

8  a z-stack TIFF is refused (it was read as a 2-D image of the wrong shape)
12 channel folders and patterns match ``.TIF`` as well as ``.tif``; "no fields" says what was found
13 ``status`` exits 2 on a folder that is not a run and 1 on a failed run
10 a base model with one output channel is refused, naming the file
2  a refused resume leaves the run's files alone; preprocess/labels/tiling of an existing run cannot change
9  two ``train`` processes on one run folder: the second exits 2 ("already training (pid N on HOST)");
   a run killed with SIGKILL leaves no lock behind and resumes
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from procs import interrupt_when, log_has

from hpc_retrain.config import PlateConfig, RunConfig
from hpc_retrain.io.plate import PlateError, open_plate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--executor", "inline", "--epochs", "1", "--batch-size", "2", "--set", "train.steps_per_epoch=2"]


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_retrain", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The one error line the CLI printed (other stderr lines are logging)."""
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"hpc-retrain {command}:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 8: z-stacks
def _plate_with(root: Path, brightfield: np.ndarray) -> Path:
    root.mkdir(parents=True)
    tifffile.imwrite(root / "A1_s0_brightfield.tif", brightfield)
    tifffile.imwrite(root / "A1_s0_fluorescence.tif", np.zeros(brightfield.shape[-2:], np.uint16))
    return root


@pytest.mark.parametrize("planes", [20, 5])
def test_zstack_tiff_is_refused_naming_the_file(tmp_path, planes):
    stack = np.random.default_rng(0).integers(0, 4000, (planes, 256, 256), dtype=np.uint16)
    root = _plate_with(tmp_path / "plate", stack)
    with pytest.raises(PlateError) as e:
        open_plate(PlateConfig(path=root))
    msg = str(e.value)
    assert "\n" not in msg and str(root / "A1_s0_brightfield.tif") in msg
    assert f"{planes} planes" in msg and "single-plane 2-D" in msg and "max projection" in msg

    out = _cli("segment", "--plate", root, "--set", "preprocess.mean_width=7")
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out, "segment")
    assert "A1_s0_brightfield.tif" in line and "single-plane 2-D" in line
    assert "cells" not in out.stdout + out.stderr and "too small" not in out.stderr
    assert not (tmp_path / "plate.ome.zarr").exists()


def test_multipage_tiff_of_separate_pages_is_refused(tmp_path):
    root = tmp_path / "plate"
    root.mkdir()
    with tifffile.TiffWriter(root / "A1_s0_brightfield.tif") as w:  # pages written one by one, no metadata
        for _ in range(3):
            w.write(np.zeros((64, 64), np.uint16), contiguous=False, metadata=None)
    tifffile.imwrite(root / "A1_s0_fluorescence.tif", np.zeros((64, 64), np.uint16))
    with pytest.raises(PlateError, match=r"A1_s0_brightfield.tif: .*3 planes.*single-plane 2-D"):
        open_plate(PlateConfig(path=root))


def test_single_plane_and_rgb_tiffs_still_read(tmp_path):
    root = tmp_path / "plate"
    root.mkdir()
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    tifffile.imwrite(root / "A1_s0_brightfield.tif", rgb)
    tifffile.imwrite(root / "A1_s0_fluorescence.tif", np.ones((1, 40, 50), np.uint16))  # one plane, 3-D array
    f = open_plate(PlateConfig(path=root)).fields[0]
    assert f.shape == (40, 50)
    np.testing.assert_array_equal(f.channel("brightfield").compute(), rgb[..., 0])
    np.testing.assert_array_equal(f.channel("fluorescence").compute(), np.ones((40, 50)))


# ------------------------------------------------------------------------------- 12: upper-case names
def test_channel_folders_with_upper_case_extension(tmp_path):
    root = tmp_path / "ds"
    for c in ("brightfield", "fluorescence"):
        (root / c).mkdir(parents=True)
        for i in (1, 2):
            tifffile.imwrite(root / c / f"{i:05d}.TIF", np.full((32, 40), i, np.uint16))
    plate = open_plate(PlateConfig(path=root))
    assert [f.key for f in plate.fields] == ["A1/00001", "A1/00002"]
    assert plate.channel_names == ["brightfield", "fluorescence"]
    np.testing.assert_array_equal(plate.fields[1].channel("fluorescence").compute(), np.full((32, 40), 2))

    out = _cli("segment", "--plate", root, "--list-wells", "--set", "preprocess.mean_width=7")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["A1"]


def test_pattern_matches_upper_case_extension(tmp_path):
    root = tmp_path / "plate"
    root.mkdir()
    for c in ("brightfield", "fluorescence"):
        tifffile.imwrite(root / f"B2_s3_{c}.TIF", np.zeros((16, 16), np.uint16))
        tifffile.imwrite(root / f"B2_s4_{c}.Tiff", np.zeros((16, 16), np.uint16))
    plate = open_plate(PlateConfig(path=root, pattern="{well}_s{field}_{channel}.tif"))
    assert [f.key for f in plate.fields] == ["B2/3"]
    plate = open_plate(PlateConfig(path=root, pattern="{well}_s{field}_{channel}.tiff"))
    assert [f.key for f in plate.fields] == ["B2/4"]


def test_no_fields_message_says_what_was_found_and_what_is_expected(tmp_path):
    root = tmp_path / "plate"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "img_a.png").write_bytes(b"")
    (root / "notes.txt").write_text("x")
    tifffile.imwrite(root / "scan-1.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(PlateError) as e:
        open_plate(PlateConfig(path=root))
    msg = str(e.value)
    assert "\n" not in msg
    assert "{well}_s{field}_{channel}.tif" in msg  # what is expected: the pattern ...
    assert "brightfield/1.tif" in msg  # ... or numbered TIFFs in channel folders, any zero padding
    assert "raw/" in msg and "scan-1.tif" in msg and "notes.txt" in msg  # what was found
    assert "plate.pattern" in msg

    out = _cli("segment", "--plate", root, "--set", "preprocess.mean_width=7")
    assert out.returncode == 2 and "scan-1.tif" in _error_line(out, "segment")


# ------------------------------------------------------------------------------------------ 13: status
def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "plate").mkdir()
    (tmp_path / "plate" / "A1_s0_brightfield.tif").write_bytes(b"")
    for folder in (tmp_path / "plate", tmp_path / "empty"):
        folder.mkdir(exist_ok=True)
        for extra in ([], ["--json"]):
            out = _cli("status", folder, *extra)
            assert out.returncode == 2, (folder, out.stdout, out.stderr)
            line = _error_line(out, "status")
            assert f"{folder}: not a training run" in line and "config.yaml" in line and "train" in line
            assert "state:" not in out.stdout
    out = _cli("status", tmp_path / "missing")
    assert out.returncode == 2 and "no such run folder" in _error_line(out, "status")


def test_status_help_documents_exit_codes():
    out = _cli("status", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "exit status" in text and "0 " in text and "1 failed" in text and "2 not a training run" in text


# --------------------------------------------------------------------------- 10 (+13): 1-channel models
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = RunConfig().updated(preprocess__mean_width=7)
    return build_store(tmp_path_factory.mktemp("faults") / "store.zarr", n_fields=8, cfg=cfg)


def _model(path: Path, inputs: tuple, outputs: int) -> Path:
    import keras

    inp = keras.Input(inputs)
    keras.Model(inp, keras.layers.Conv2D(outputs, 1, activation="sigmoid")(inp)).save(path)
    return path


def test_one_output_channel_model_is_refused_naming_the_file(tmp_path):
    from hpc_retrain.inference import model

    one = _model(tmp_path / "one_out.keras", (256, 256, 3), 1)
    with pytest.raises(model.ModelError) as e:
        model.load(one)
    msg = str(e.value)
    assert msg.startswith(f"{one}:") and "1 channel" in msg and "functional" not in msg and "\n" not in msg

    # check_io as the segmenter calls it (with the Keras model's name) still names the file
    small = _model(tmp_path / "tile128.keras", (128, 128, 3), 2)
    m = model.load(small, tile=128)
    with pytest.raises(model.ModelError) as e:
        model.check_io(m, 256, source=m.name)
    assert str(e.value).startswith(f"{small}:") and m.name not in str(e.value)


def test_training_a_one_channel_base_model_fails_naming_the_file_and_status_says_failed(store, tmp_path):
    one = _model(tmp_path / "one_out.keras", (256, 256, 3), 1)
    run = tmp_path / "run"
    out = _cli("train", "--store", store, "--run", run, "--base-model", one, *QUICK)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out, "train")
    assert str(one) in line and "1 channel" in line and "functional" not in line
    assert not (run / "checkpoints").exists() and not (run / "model.keras").exists()

    st = _cli("status", run)
    assert st.returncode == 1, (st.stdout, st.stderr)  # 13: a failed run exits non-zero
    assert "state:  failed" in st.stdout and str(one) in st.stdout
    assert _cli("status", run, "--json").returncode == 1


# ---------------------------------------------------------------------- 2: refused resumes touch nothing
@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    out = _cli("train", "--store", store, "--run", run, *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    return run


@pytest.mark.parametrize("change, names", [
    (["--batch-size", "4"], ["batch_size", "4", "2"]),
    (["--lr", "0.01"], ["learning_rate"]),
    (["--set", "seed=3"], ["seed"]),
    (["--set", "preprocess.mean_width=20"], ["preprocess.mean_width", "20"]),
    (["--set", "tiling.margin=8"], ["tiling.margin"]),
    (["--set", "labels.body_threshold=0.6"], ["labels.body_threshold"]),
])
@pytest.mark.parametrize("executor", ["inline", "local"])
def test_refused_resume_changes_no_file(finished_run, store, change, names, executor):
    before = _snapshot(finished_run)
    t = time.monotonic()
    out = _cli("train", "--run", finished_run, "--executor", executor, *change)
    after = _snapshot(finished_run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, changed  # config.yaml, status.json, job.json, checkpoints: untouched
    assert out.returncode == 2, (out.stdout, out.stderr[-3000:])
    line = _error_line(out, "train")
    assert str(finished_run) in line and all(n in line for n in names), line
    assert "new run folder" in line
    assert time.monotonic() - t < 120  # refused up front, not after loading TensorFlow and the model


def test_run_still_resumes_after_refusals(finished_run, store):
    for change in (["--batch-size", "4"], ["--set", "preprocess.mean_width=20"]):
        assert _cli("train", "--run", finished_run, "--executor", "inline", *change).returncode == 2
    out = _cli("train", "--run", finished_run, "--executor", "inline", "--epochs", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [h["epoch"] for h in json.loads((finished_run / "history.json").read_text())] == [0, 1, 2]
    cfg = RunConfig.read_saved(finished_run)
    assert (cfg.train.batch_size, cfg.preprocess.mean_width, cfg.train.epochs) == (2, 7, 2)
    assert _cli("status", finished_run).returncode == 0


# -------------------------------------------------------------------------- 9: one training per folder
@pytest.mark.parametrize("delay", [0.5, 5.0])
def test_second_train_on_the_same_run_exits_2(store, tmp_path, delay):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc_retrain", "train", "--store", str(store), "--run", str(run), *QUICK]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    second = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = {first.pid: first, second.pid: second}
    results = {pid: (*p.communicate(timeout=600), p.returncode) for pid, p in procs.items()}
    codes = sorted(r[2] for r in results.values())
    assert codes == [0, 2], {pid: (r[2], r[1][-2000:]) for pid, r in results.items()}
    winner = next(pid for pid, r in results.items() if r[2] == 0)
    loser = next(pid for pid, r in results.items() if r[2] == 2)
    line = _error_line(subprocess.CompletedProcess([], 2, results[loser][0], results[loser][1]), "train")
    assert line == f"hpc-retrain train: {run}: already training (pid {winner} on {socket.gethostname()})"
    assert json.loads((run / "job.json").read_text())["job_id"] == str(winner)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/1 started") == 1  # only one process trained


def test_local_job_is_refused_while_an_inline_run_trains(store, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc_retrain", "train", "--store", str(store), "--run", str(run), *QUICK]
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "job.json").is_file():  # written once the lock is held
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        out = _cli("train", "--run", run, "--executor", "local", "--gpus", "0", "--epochs", "1")
        still = first.poll() is None
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    if still:  # the inline run held the lock for the whole time the second command ran
        assert out.returncode == 2, out.stderr[-3000:]
        assert f"already training (pid {first.pid} on" in _error_line(out, "train")
        assert not (run / "submitit").exists()


def test_train_killed_with_sigkill_resumes_and_its_lock_does_not_block(store, tmp_path):
    """kill -9 leaves status.json "running" and a .lock naming a dead process: status says "stopped" (exit 1),
    the kernel has released the lock, and the same command resumes from the last epoch-end checkpoint."""
    import signal

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpc_retrain", "train", "--store", str(store), "--run", str(run),
           "--executor", "inline", "--epochs", "3", "--batch-size", "2", "--set", "train.steps_per_epoch=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "train.log"
    interrupt_when(log_has(log, "epoch 2/3 started"), proc, signal.SIGKILL, timeout=300, poll_s=0.05,
                   what="epoch 2", wait_s=60)
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # it had no chance to report
    assert f'"pid": {proc.pid}' in (run / ".lock").read_text()  # stale holder, lock itself released

    st = _cli("status", run)
    assert st.returncode == 1 and "state:  stopped" in st.stdout, (st.stdout, st.stderr)

    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from ckpt-e00001" in log.read_text()
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0, 1, 2, 3]
    assert _cli("status", run).returncode == 0
