"""Faults and bad input, round 3 (issue 26), reproduced with real files and real processes.

Each test names the issue's item it covers; pure-function cases are in ``tests/unit/test_faults_round3.py``.
Plates are tiny synthetic ones (``hpc-retrain synth``, 128 px), so each case takes seconds: two are made once per
module (a TIFF and an OME-Zarr plate) and each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from procs import interrupt_when, reaped, wait_for

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


@pytest.fixture(scope="module")
def shared_plates(tmp_path_factory) -> dict[str, Path]:
    """``hpc-retrain synth`` run once per format; tests take copies (``tiff_plate``, ``zarr_plate``)."""
    root = tmp_path_factory.mktemp("plates")
    return {"tiff": _synth(root / "plate"), "zarr": _synth(root / "p.zarr")}


@pytest.fixture
def tiff_plate(shared_plates, tmp_path) -> Path:
    """A copy of the module's synthetic TIFF plate (1 well, 2 fields of 128 px) at ``tmp_path / "plate"``."""
    return Path(shutil.copytree(shared_plates["tiff"], tmp_path / "plate", symlinks=True))


@pytest.fixture
def zarr_plate(shared_plates, tmp_path) -> Path:
    """A copy of the module's synthetic OME-Zarr plate at ``tmp_path / "p.zarr"``."""
    return Path(shutil.copytree(shared_plates["zarr"], tmp_path / "p.zarr", symlinks=True))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 1: binary masks
@pytest.mark.parametrize("kind", ["0/255", "0.0/1.0"])
def test_evaluate_splits_binary_reference_masks_into_cells_and_says_so(tmp_path, zarr_plate, tiff_plate, kind):
    pred = zarr_plate  # label image "truth" = the synthetic cells
    ref = tiff_plate  # the same cells as masks, rewritten as binary masks
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
def test_crossval_refuses_an_out_folder_of_another_plate(tmp_path, shared_plates):
    from hpc_retrain.config import PlateConfig
    from hpc_retrain.evaluate import crossval
    from hpc_retrain.io.plate import open_plate

    a = Path(shutil.copytree(shared_plates["tiff"], tmp_path / "a"))
    b = shared_plates["tiff"]  # another plate: another path (refused before crossval reads or writes anything)
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


# ------------------------------------------------------------------------------------------ 3, 4: the run's store
QUICK = ["--executor", "inline", "--batch-size", "2", "--set", "train.steps_per_epoch=2"]


def _store(path: Path, seed: int = 0) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainstore import build_store

    from hpc_retrain.config import RunConfig

    return build_store(path, n_fields=4, seed=seed, cfg=RunConfig().updated(preprocess__mean_width=7.0))


def test_a_store_being_trained_on_cannot_be_rebuilt_and_a_rebuild_elsewhere_stops_the_run(tmp_path, tiff_plate):
    from hpc_retrain.prepare import store as st

    store = _store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpc_retrain", "train", "--store", store, "--run", run,
                             "--epochs", "200", *QUICK], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        wait_for(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("ckpt-e*")), proc)
        before = st.generation(store)
        out = _cli("prepare", "--plate", tiff_plate, "--out", store, "--overwrite", "--mean-width", "9", timeout=120)
        line = _error_line(out, "prepare")
        assert str(store) in line and "a training is reading this store" in line
        assert st.generation(store) == before  # not rebuilt
        # Where flock does not reach (another node's NFS client), a rebuild still changes the generation id:
        import zarr

        zarr.open_group(str(store), mode="r+").attrs[st.GENERATION] = "rebuilt-elsewhere"
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "was rebuilt" in err and "while this run trained" in err
    status = _cli("status", run)
    assert status.returncode == 1 and "was rebuilt" in status.stdout, status.stdout


def test_resuming_on_another_store_or_from_non_numeric_checkpoint_variables_is_refused(tmp_path, tiff_plate):
    """One 1-epoch run serves both: resuming it on another store is refused naming both; a copy of it whose
    checkpoint holds strings is refused by ``train`` (resume) and by ``segment --model CKPT``."""
    a, b = _store(tmp_path / "a.zarr"), _store(tmp_path / "b.zarr", seed=3)
    run = tmp_path / "run"
    first = _cli("train", "--store", a, "--run", run, "--epochs", "1", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    line = _error_line(_cli("train", "--store", b, "--run", run, "--epochs", "2", *QUICK), "train")
    assert str(b) in line and str(a) in line and "new run folder" in line
    assert _snapshot(run) == before

    # a checkpoint whose variables.npz holds strings (on a copy of the run; its store a is unchanged so far)
    odd = Path(shutil.copytree(run, tmp_path / "odd-run", symlinks=True))
    ckpt = sorted((odd / "checkpoints").glob("ckpt-e*"))[-1]
    with np.load(ckpt / "variables.npz") as z:
        arrays = dict(z)
    arrays["m0000"] = np.full(arrays["m0000"].shape, "x")
    np.savez(ckpt / "variables.npz", **arrays)
    out = _cli("train", "--run", odd, "--epochs", "2", *QUICK)
    line = _error_line(out, "train")
    assert "variables.npz" in line and "not numbers" in line
    out = _cli("segment", "--plate", tiff_plate, "--model", ckpt, "--name", "c")
    line = _error_line(out, "segment")
    assert "variables.npz" in line and "not numbers" in line

    _store(a, seed=4)  # the same path rebuilt: another store
    line = _error_line(_cli("train", "--run", run, "--epochs", "2", *QUICK), "train")
    assert str(a) in line and "rebuilt" in line
    assert _snapshot(run) == before


# ------------------------------------------------------------------------------------------ 5, 9: synth --out
def test_synth_overwrite_replaces_only_a_plate_synth_wrote(tmp_path, tiff_plate, zarr_plate):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    for out, cwd in ((mine, REPO), (".", work), (work, REPO)):
        r = _cli("synth", "--out", out, "--overwrite", "--size", "64", cwd=cwd)
        line = _error_line(r, "synth")
        assert "choose another --out" in line
    assert (work / "notes.txt").read_text() == "mine" and (mine / "data.csv").read_text() == "1,2"
    plate = tiff_plate
    (plate / "my_notes.txt").write_text("mine")  # a file the user put in a synthetic plate
    line = _error_line(_cli("synth", "--out", plate, "--overwrite", "--size", "64"), "synth")
    assert "my_notes.txt" in line and (plate / "my_notes.txt").is_file()
    (plate / "my_notes.txt").unlink()
    for p in (plate, zarr_plate):  # plates synth wrote are replaced
        r = _cli("synth", "--out", p, "--overwrite", "--size", "64", "--wells", "B2", "--fields", "1")
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((p / "synth.json").read_text())["fields"][0]["well"] == "B2"


@pytest.mark.parametrize("bad, words", [
    (["--wells", "A1,A01"], ["'A1' and 'A01' are the same well"]),
    (["--wells", "A1,Z"], ["'Z'"]),
    (["--size", "0"], ["shape"]),
    (["--fields", "0"], ["one field per well"]),
    (["--density", "3"], ["density"]),
    (["--mean-width", "1"], ["mean_width"]),
])
def test_synth_bad_parameters_are_one_line_and_leave_nothing(tmp_path, bad, words):
    out = tmp_path / "plate"
    line = _error_line(_cli("synth", "--out", out, "--size", "64", *bad), "synth")
    assert all(w in line for w in words), line
    assert sorted(tmp_path.iterdir()) == []  # no partial plate to block the rerun
    if bad == ["--size", "0"]:  # the rerun itself, once (each case asserts that nothing was left)
        _synth(out)


def test_synth_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _error_line(_cli("synth", "--out", tmp_path / "afile" / "plate", "--size", "64"), "synth")
    assert str(tmp_path / "afile" / "plate") in line and "synth-tmp" not in line


# ------------------------------------------------------------------------------------------ 6, 7, 8: where segment writes
def test_labels_not_written_by_the_tool_are_never_replaced(tmp_path, zarr_plate):
    plate = zarr_plate  # its labels/truth: masks, not hpc-retrain segment results
    truth = plate / "A" / "1" / "0" / "labels" / "truth"
    before = _snapshot(truth)
    for extra in ((), ("--overwrite",)):
        out = _cli("segment", "--plate", plate, "--name", "truth", "--set", "preprocess.mean_width=7", *extra)
        line = _error_line(out, "segment")
        assert "labels/truth" in line and "never replaced" in line and "--name" in line
    assert _snapshot(truth) == before


@pytest.mark.parametrize("name", ["../../../x", "", "a/b", ".hidden"])
def test_bad_result_names_are_refused_before_any_work(tmp_path, tiff_plate, name):
    plate = tiff_plate
    before = sorted(p.name for p in tmp_path.iterdir())
    out = _cli("segment", "--plate", plate, "--name", name, "--tiff", "--set", "preprocess.mean_width=7")
    _error_line(out, "segment")
    assert "infer.name" in out.stderr and "letters, digits" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output plate, no TIFF folder
    assert not (tmp_path.parent / "x").exists()
    _error_line(_cli("evaluate", "--pred", plate, "--name", name, "--ref", "truth"), "evaluate")


def test_segment_never_writes_through_a_link_that_leaves_the_plate(tmp_path, zarr_plate):
    plate = zarr_plate
    outside = tmp_path / "outside"
    (plate / "A" / "1" / "1").rename(outside)
    (plate / "A" / "1" / "1").symlink_to(outside)
    out = _cli("segment", "--plate", plate, "--set", "preprocess.mean_width=7")
    line = _error_line(out, "segment")
    assert str(outside) in line and "outside the plate" in line
    assert not (outside / "labels" / "misic").exists() and not (outside / "probabilities").exists()


# ------------------------------------------------------------------------------------------ 9: one well, two spellings
def test_a_tiff_plate_spelling_one_well_two_ways_is_refused_naming_the_files(tmp_path, tiff_plate):
    plate = tiff_plate
    for f in plate.glob("A1_s1_*.tif"):
        f.rename(plate / f.name.replace("A1_", "a1_"))
    out = _cli("segment", "--plate", plate, "--set", "preprocess.mean_width=7")
    line = _error_line(out, "segment")
    assert "A1_s0_" in line and "a1_s1_" in line and "same well" in line and "--out" not in line
    assert not (tmp_path / "plate.ome.zarr").exists()
    line = _error_line(_cli("prepare", "--plate", plate, "--mean-width", "7", "--out", tmp_path / "s.zarr"), "prepare")
    assert "same well" in line


# ------------------------------------------------------------------------------------------ 11: evaluate, status
def test_evaluate_refuses_a_channel_the_plate_lacks_and_an_out_that_is_a_file(tmp_path, zarr_plate):
    plate = zarr_plate
    out = _cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out", tmp_path / "e",
               "--channel", "nosuch")
    line = _error_line(out, "evaluate")
    assert "'nosuch'" in line and "brightfield" in line and "--channel" in line
    assert not list((tmp_path / "e").glob("*.png"))
    (tmp_path / "afile").write_text("x")
    line = _error_line(_cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out",
                            tmp_path / "afile"), "evaluate")
    assert str(tmp_path / "afile") in line and "is a file" in line
    ok = _cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out", tmp_path / "e",
              "--channel", "fluorescence", "--overlays", "1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "contact_truth.png", "overlay_truth_A1_0.png", "scores_truth.json"]  # no temporary files left


def _run_folder(tmp_path: Path, **files) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name, text in files.items():
        (run / name.replace("_", ".", 1)).write_text(text)
    return run


def test_status_of_odd_run_folders_is_one_line(tmp_path):
    run = _run_folder(tmp_path, config_yaml="seed: 0\n")  # a config.yaml only
    line = _error_line(_cli("status", run), "status")
    assert "no training was started here" in line
    (run / "status.json").mkdir()
    line = _error_line(_cli("status", run), "status")
    assert "status.json is not a file" in line
    (run / "status.json").rmdir()
    (run / "status.json").write_text(json.dumps({"state": "finished", "epoch": 1, "epochs": 1}))
    for history in ("[{\"epoch\": 1, \"loss\": ", json.dumps([{"epoch": 1, "loss": "high", "val_iou": [1]}])):
        (run / "history.json").write_text(history)
        out = _cli("status", run)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert "state:  finished" in out.stdout


# ------------------------------------------------------------------------------------------ 12: the benchmarks run
@pytest.mark.parametrize("bench", ["train", "infer", "prepare"])
def test_every_benchmark_runs_to_its_end_at_tiny_sizes(tmp_path, bench):
    """``make bench`` stopped in train_bench (a setting that moved to compute.batch_size) and prepare_bench's
    throughput part (mean_width auto before measuring); ``--smoke`` runs every part once at tiny sizes, so the
    figures in benchmarks/RESULTS.md stay reproducible with the command beside them (~1.5-4.5 min each on 2
    busy cores; train_bench traces its model about ten times)."""
    env = {k: v for k, v in _env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as `make bench` runs them
    out = subprocess.run([sys.executable, "-m", "benchmarks", bench, "--smoke"], cwd=tmp_path,
                         env=dict(env, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])),
                         capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert "Traceback" not in text and f"=== {bench}: exit 0" in out.stdout
    for noise in ("cuInit", "cpu_feature_guard", "oneDNN custom operations"):  # TensorFlow's start-up lines
        assert noise not in text, noise


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_during_inline_training_checkpoints_like_sigterm_and_says_stopped(tmp_path):
    store = _store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpc_retrain", "train", "--store", store, "--run", run,
                             "--epochs", "200", *QUICK], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = interrupt_when(lambda: (run / "checkpoints" / "ckpt-e00001").is_dir(), proc, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped by SIGINT" in err and "run the same command to resume" in err
    status = _cli("status", run)
    assert status.returncode == 0 and "state:  interrupted" in status.stdout, status.stdout


# ------------------------------------------------------------------------------------------ tracebacks -> one line
def _zarr_meta(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage, words", [
    ("dotdot", ["'../../1/0'", "without '/', '.' or '..'"]),
    ("no_array", ["A/1/1", "no array '0'"]),
    ("missing_field", ["A/1/7", "not there"]),
])
def test_damaged_ome_zarr_plates_are_one_line(tmp_path, zarr_plate, damage, words):
    plate = zarr_plate
    well = plate / "A" / "1" / "zarr.json"
    if damage == "dotdot":
        _zarr_meta(well, lambda d: d["attributes"]["ome"]["well"]["images"][1].update(path="../../1/0"))
    elif damage == "no_array":
        shutil.rmtree(plate / "A" / "1" / "1" / "0")
    else:
        _zarr_meta(well, lambda d: d["attributes"]["ome"]["well"]["images"].append({"path": "7"}))
    line = _error_line(_cli("segment", "--plate", plate, "--set", "preprocess.mean_width=7"), "segment")
    assert all(w in line for w in words), line
    if damage != "no_array":  # evaluate reads labels only
        line = _error_line(_cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth"), "evaluate")
        assert all(w in line for w in words), line


def test_train_run_that_is_a_file_tile_sizes_and_non_utf8_paths_are_one_line(tmp_path):
    store = _store(tmp_path / "s.zarr")
    (tmp_path / "afile").write_text("x")
    line = _error_line(_cli("train", "--store", store, "--run", tmp_path / "afile", *QUICK, timeout=120), "train")
    assert "is a file" in line and "--run" in line
    out = _cli("train", "--store", store, "--run", tmp_path / "r", *QUICK, "--set", "tiling.size=100", timeout=120)
    _error_line(out, "train")
    assert "multiple of 8" in out.stderr
    odd = os.fsdecode(bytes(tmp_path) + b"/pl\xff")
    Path(odd).mkdir()
    for cmd in (["segment", "--plate", odd], ["prepare", "--plate", odd, "--out", tmp_path / "s2.zarr"]):
        out = _cli(*cmd, "--set", "preprocess.mean_width=7", timeout=120)
        _error_line(out, cmd[0])
        assert "not valid UTF-8" in out.stderr


def test_a_1x1_tiff_is_skipped_naming_it_and_the_plate_goes_on(tmp_path, tiff_plate):
    plate = tiff_plate
    for ch in ("brightfield", "fluorescence", "masks"):
        tifffile.imwrite(plate / f"A1_s1_{ch}.tif", np.zeros((1, 1), np.uint16))
    out = _cli("segment", "--plate", plate, "--set", "preprocess.mean_width=7")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped field A1/1" in out.stderr and "too small" in out.stderr and "segmented 1 field(s)" in out.stdout


def test_a_tiff_folder_that_cannot_be_written_is_named_not_the_output_plate(tmp_path, tiff_plate):
    plate = tiff_plate
    (tmp_path / "afile").write_text("x")
    line = _error_line(_cli("segment", "--plate", plate, "--tiff", tmp_path / "afile" / "tiffs", "--set",
                            "preprocess.mean_width=7"), "segment")
    assert str(tmp_path / "afile" / "tiffs") in line and "--tiff" in line and "--out" not in line


def test_an_unreachable_dask_scheduler_is_one_line_at_once(tmp_path, tiff_plate):
    import time

    plate = tiff_plate
    t = time.monotonic()
    line = _error_line(_cli("prepare", "--plate", plate, "--out", tmp_path / "s.zarr", "--mean-width", "7",
                            "--scheduler", "tcp://127.0.0.1:1", timeout=120), "prepare")
    assert "tcp://127.0.0.1:1" in line and "nothing answers" in line
    assert time.monotonic() - t < 60  # not distributed's 30 s timeout on top of the start-up
    assert not (tmp_path / "s.zarr").exists()


def test_ctrl_c_during_prepare_is_one_line_and_the_rerun_finishes(tmp_path, tiff_plate):
    plate = tiff_plate
    store = tmp_path / "s.zarr"
    args = [sys.executable, "-m", "hpc_retrain", "prepare", "--plate", plate, "--out", store, "--mean-width", "7"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = interrupt_when(lambda: (store / "zarr.json").is_file(), proc, signal.SIGINT, settle_s=1)
    if proc.returncode == 0:
        pytest.skip("prepare finished before Ctrl-C reached it")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by Ctrl-C" in err and "run the same command" in err
    again = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]


def _read_only_prefix(path: Path) -> list[str]:
    """A command prefix under which ``path`` is read-only: a read-only bind mount in a private mount namespace
    (root ignores permission bits), or ``chmod a-w`` for others."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        return []
    if not shutil.which("unshare"):
        pytest.skip("needs unshare to mount a read-only folder as root")
    prefix = ["unshare", "-m", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(path)]
    probe = subprocess.run([*prefix, "touch", str(path / "x")], capture_output=True, text=True)
    if probe.returncode == 0 or "mount" in probe.stderr:
        pytest.skip(f"cannot mount read-only here: {probe.stderr.strip()}")
    return prefix


def test_read_only_outputs_of_synth_evaluate_and_train_are_one_line(tmp_path, zarr_plate):
    plate = zarr_plate
    store = _store(tmp_path / "s.zarr")
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only_prefix(ro)
    try:
        for cmd, target in ((["synth", "--out", ro / "plate", "--size", "64"], ro / "plate"),
                            (["evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out", ro / "e"],
                             ro / "e"),
                            (["train", "--store", store, "--run", ro / "run", *QUICK], ro / "run")):
            out = subprocess.run([*prefix, sys.executable, "-m", "hpc_retrain", *map(str, cmd)], cwd=REPO,
                                 env=_env(), capture_output=True, text=True, timeout=300)
            line = _error_line(out, cmd[0])
            low = line.lower()
            assert str(target) in line and ("read-only" in low or "permission denied" in low), line
            if cmd[0] == "evaluate":
                assert "overall" not in out.stdout  # refused before scoring
    finally:
        if not prefix:
            subprocess.run(["chmod", "-R", "u+w", str(ro)], check=True)


def test_a_second_evaluate_into_the_same_out_is_refused_while_the_first_writes(tmp_path, zarr_plate):
    from hpc_retrain.evaluate import scoring

    plate = zarr_plate
    out = tmp_path / "e"
    out.mkdir()
    with scoring._OutLock(out):  # what an evaluate holds while it scores and draws into --out
        line = _error_line(_cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out", out),
                           "evaluate")
    assert str(out) in line and "another evaluate" in line
    assert not list(out.iterdir())
    ok = _cli("evaluate", "--pred", plate, "--name", "truth", "--ref", "truth", "--out", out)
    assert ok.returncode == 0, ok.stderr[-3000:]
