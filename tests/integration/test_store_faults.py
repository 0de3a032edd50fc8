"""Faults of the training store and the run folder from the project's faults issue, each reproduced with real
processes (``python -m hpc_retrain``), real files and, where root may mount one, a real small tmpfs.

3  a full disk during ``prepare`` flagged the field as a bad image, exited 0, and no rerun (nor --overwrite)
   ever rebuilt it: training silently used fewer fields. Now a fault of the machine stops the run with one
   line naming the store (exit 2), the field stays not done, and the same command completes it once there
   is space, giving the store an uninterrupted run gives.
5  chunk files missing from a training store read as zeros and ``train`` exited 0. Now ``train`` refuses,
   naming the store, the fields and tiles and the fix, and ``prepare`` redoes finished fields whose chunks
   are missing.
11 tracebacks instead of one line: a truncated or overwritten chunk, an array's deleted ``zarr.json``, a
   corrupt ``status.json``, a full disk during ``train`` (whose failure ``status`` must show). Now one line
   each, exit 2, and ``status`` says failed with that line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st
from hpc_retrain.synth import plates as synth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
W7 = ("--mean-width", "7")  # the synthetic cells' width: no measuring, fast and deterministic
QUICK = ("--executor", "inline", "--epochs", "1", "--batch-size", "2", "--set", "train.steps_per_epoch=2")
# Everything prepare writes per field (the *_written times aside: they record when).
COMPARED = ("targets", "labels", "probabilities", "tile_field", "tile_rc", "field_done", "field_status", "field_qc",
            "labels_done", "targets_done", "labels_error", "targets_error")


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_retrain", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The one error line the CLI printed (other stderr lines are logging), and no traceback."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"hpc-retrain {command}:")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def _chunk_files(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in COMPARED:
        if name == "probabilities":
            # TensorFlow's CPU kernels may sum in another order on a busy machine: "the same store" allows a few
            # float16 steps (as test_prepare's PROB_ATOL), and labels may differ only on the pixels at a threshold
            np.testing.assert_allclose(ga[name][:].astype(np.float32), gb[name][:].astype(np.float32), atol=2e-3)
        elif name == "labels":
            assert np.mean(ga[name][:] != gb[name][:]) < 1e-3, name
        else:
            np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["fields"] == gb.attrs["fields"]
    assert _chunk_files(a) == _chunk_files(b)


# ------------------------------------------------------------------------------------ a small disk
class SmallDisk:
    """A real tmpfs of a given size at ``path`` (root only), remountable bigger; unmounted at teardown."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a small tmpfs needs root (a full disk cannot be made otherwise)")
        self.path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}")
        self.mounted = True
        return self.path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.unmount()


# ------------------------------------------------------------------------------------ plate and store
@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> Path:
    # 256 px fields: 2 x 2 tiles each after the 10/7 rescale; 3 fields need about 7.5 MB of store.
    return synth.write_plate(tmp_path_factory.mktemp("plate") / "plate.zarr", wells=["A1"], fields_per_well=3,
                             shape=(256, 256), seed=3)


@pytest.fixture(scope="module")
def reference(plate, tmp_path_factory) -> Path:
    """The store one uninterrupted ``prepare`` makes."""
    out = tmp_path_factory.mktemp("ref") / "ref.train.zarr"
    res = _cli("prepare", "--plate", plate, "--out", out, *W7)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_every_tile_has_its_chunk_file(reference):
    """All-zero tiles too: a chunk file that is missing then always means damage (fault 5)."""
    root = st.open_store(reference)
    n = root["targets"].shape[0]
    assert root.attrs[layout.EVERY_CHUNK] is True
    for name in ("targets", "labels", "probabilities"):
        assert len([f for f in _chunk_files(reference) if f.startswith(f"{name}/")]) == n, name
    assert st.missing_tiles(root, range(len(root.attrs["fields"]))) == {}


# ------------------------------------------------------------------------------------ 3: disk full in prepare
def test_disk_full_during_prepare_stops_naming_the_store_and_the_rerun_completes_it(plate, reference,
                                                                                      small_disk):
    disk = small_disk.mount("3m")
    store = disk / "plate.train.zarr"
    out = _cli("prepare", "--plate", plate, "--out", store, *W7)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out, "prepare") == (f"hpc-retrain prepare: no space left on device writing {store}: "
                                           f"free space and rerun the same command")
    g = zarr.open_group(str(store), mode="r")
    done = g["field_done"][:]
    assert not done.all(), done  # the field being written is left not done ...
    for stage in ("labels", "targets"):  # ... and nothing is recorded as a bad image
        assert not any(str(e) for e in g[f"{stage}_error"][:]), g[f"{stage}_error"][:]
    assert layout.FLAGGED not in g["field_status"][:].tolist()

    small_disk.resize("30m")
    out = _cli("prepare", "--plate", plate, "--out", store, *W7)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 fields, 3 ok, 0 flagged" in out.stdout
    _assert_same_store(store, reference)


def test_fields_an_earlier_version_flagged_for_a_full_disk_are_redone(plate, reference, tmp_path):
    store = tmp_path / "poisoned.train.zarr"
    shutil.copytree(reference, store)
    g = zarr.open_group(str(store), mode="r+")
    g["labels_error"][1] = "[Errno 28] No space left on device"  # what the old prepare recorded
    g["field_status"][1] = layout.FLAGGED
    out = _cli("prepare", "--plate", plate, "--out", store, *W7)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "flagged for a fault of the machine" in out.stderr and "3 fields, 3 ok, 0 flagged" in out.stdout
    _assert_same_store(store, reference)


# ------------------------------------------------------------------------------------ 5: missing chunks
def test_missing_chunks_refuse_training_and_prepare_redoes_them(plate, reference, tmp_path):
    store = tmp_path / "holes.train.zarr"
    shutil.copytree(reference, store)
    g = zarr.open_group(str(store), mode="r")
    first = [f["first_tile"] for f in g.attrs["fields"]]
    (store / "targets" / "c" / str(first[1] + 1) / "0" / "0" / "0").unlink()  # A1/1, its second tile
    (store / "labels" / "c" / str(first[2]) / "0" / "0" / "0").unlink()  # A1/2, its first tile

    run = tmp_path / "run"
    out = _cli("train", "--store", store, "--run", run, *QUICK)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out, "train")
    assert line.startswith(f"hpc-retrain train: {store}: 2 tile chunk(s) of 2 finished field(s) are missing")
    assert f"A1/1: targets tile {first[1] + 1}" in line and f"A1/2: labels tile {first[2]}" in line
    assert f"hpc-retrain prepare --plate {plate} --out {store}" in line
    assert not (run / "checkpoints").exists()
    status = _cli("status", run)
    assert status.returncode == 1 and "state:  failed" in status.stdout and "are missing" in status.stdout, status.stdout

    out = _cli("prepare", "--plate", plate, "--out", store, *W7)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "redoing 2 finished field(s) whose tile chunks are missing" in out.stderr
    _assert_same_store(store, reference)
    from hpc_retrain.training.loop import TileReader

    TileReader(store)  # opens: nothing missing any more


# ------------------------------------------------------------------------------------ 11: one line each
@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("small") / "store.zarr", n_fields=4)


@pytest.mark.parametrize("damage", ["truncated targets chunk", "garbage labels chunks"])
def test_unreadable_chunk_is_one_line_naming_the_file(small_store, tmp_path, damage):
    """Read by TensorFlow's input pipeline (a training tile) or directly (the validation fields' labels):
    either way one line naming the chunk file, not a 400-line traceback, and status says failed."""
    store = tmp_path / "store.zarr"
    shutil.copytree(small_store, store)
    if damage.startswith("truncated"):
        bad = [store / "targets" / "c" / "2" / "0" / "0" / "0"]
        with open(bad[0], "r+b") as f:
            f.truncate(1000)
    else:
        bad = sorted((store / "labels" / "c").glob("*/0/0/0"))
        for p in bad:
            p.write_bytes(os.urandom(p.stat().st_size))
    run = tmp_path / "run"
    out = _cli("train", "--store", store, "--run", run, *QUICK)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out, "train")
    assert line.startswith(f"hpc-retrain train: {store}: ") and "truncated or corrupt" in line
    assert str(bad[0]) in line and "delete" in line and "hpc-retrain prepare" in line
    status = _cli("status", run)
    assert status.returncode == 1 and "state:  failed" in status.stdout, status.stdout
    assert f"error:  {line.removeprefix('hpc-retrain train: ')}\n" in status.stdout


def test_deleted_array_metadata_is_one_line_and_overwrite_rebuilds(plate, reference, tmp_path):
    store = tmp_path / "nometa.train.zarr"
    shutil.copytree(reference, store)
    (store / "labels" / "zarr.json").unlink()
    fix = f"hpc-retrain prepare --plate {plate} --out {store} --overwrite"

    out = _cli("train", "--store", store, "--run", tmp_path / "run", *QUICK)
    assert out.returncode == 2, out.stderr[-3000:]
    assert _error_line(out, "train") == (f"hpc-retrain train: {store}: the store is damaged: array labels is "
                                         f"missing (no {store / 'labels' / 'zarr.json'}); rebuild it with `{fix}`")
    out = _cli("prepare", "--plate", plate, "--out", store, *W7)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "the store is damaged: array labels is missing" in _error_line(out, "prepare")
    out = _cli("prepare", "--plate", plate, "--out", store, *W7, "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_store(store, reference)


@pytest.mark.parametrize("text", ['{"state": "runn', "", "[1, 2]", "\x00\xff\xfe garbage"])
def test_corrupt_status_json_is_one_line(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_bytes(text.encode("latin-1"))
    for extra in ((), ("--json",)):
        out = _cli("status", run, *extra)
        assert out.returncode == 2, (out.stdout, out.stderr[-3000:])
        line = _error_line(out, "status")
        assert line.startswith(f"hpc-retrain status: {run / 'status.json'} is corrupt: ")


def test_disk_full_during_train_is_one_line_recorded_as_failed_and_resumes(small_store, small_disk):
    """2 MB hold the run's small files but not the first checkpoint (weights and Adam moments)."""
    run = small_disk.mount("2m") / "run"
    cmd = ("train", "--store", small_store, "--run", run, *QUICK)
    out = _cli(*cmd)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out, "train")
    assert line == (f"hpc-retrain train: no space left on device writing {run}: free space there and rerun the "
                    f"same command to resume from the last checkpoint")
    status = _cli("status", run)
    assert status.returncode == 1, (status.stdout, status.stderr)
    assert "state:  failed" in status.stdout and f"error:  no space left on device writing {run}" in status.stdout
    doc = json.loads((run / "status.json").read_text())
    assert doc["state"] == "failed" and "\n" not in doc["error"]
    assert not list(run.rglob(".tmp-*")), list(run.rglob(".tmp-*"))  # the half-written checkpoint is gone

    small_disk.resize("400m")
    out = _cli(*cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    status = _cli("status", run)
    assert status.returncode == 0 and "state:  finished" in status.stdout, status.stdout
