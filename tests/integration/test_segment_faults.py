"""Faults of ``segment`` from the project's faults issue, each reproduced with real processes (``python -m
hpc_retrain segment``), real kill -9 and real files on synthetic plates.

4  ``--wells``, one well per job-array task: every task after the first failed (the clash check covered the
   whole output plate; a TIFF plate's output held only the first task's wells). Now the check covers only the
   fields asked for and the output plate is made once, for every field, atomically, also when tasks race.
6  a killed ``segment`` left fields that looked finished (all-zero labels with full provenance); ``evaluate``
   scored them and a rerun called them results. Now a completion marker is the field's last write; reruns
   redo unfinished fields, ``evaluate`` refuses them.
7  a ``segment`` that failed while building its output (a truncated TIFF) blocked every rerun with
   ``KeyError: 'A/1/1'``. Now the output plate appears whole or not at all.
14 temporary ``hpc-retrain-infer-*`` folders stayed after kill -9. Now they carry their pid; reruns remove
   those of dead processes.
-  one NaN or all-zero field stopped the whole plate. Now it is skipped with one line, like ``prepare``.
-  a read-only or full output gave a traceback. Now one line naming the path and the fix (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import zarr

from hpc_retrain.io import ngff
from hpc_retrain.synth import plates as synth

REPO = Path(__file__).resolve().parents[2]
W7 = ("--set", "preprocess.mean_width=7")  # the synthetic cells' width: no measuring, fast and deterministic


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "hpc_retrain", *map(str, args)]


def _cli(*args, prefix=(), timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, prefix), *_cmd(*args)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _lines(out: subprocess.CompletedProcess, command: str = "segment") -> list[str]:
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return [ln for ln in out.stderr.splitlines() if ln.startswith(f"hpc-retrain {command}:")]


def _error_line(out: subprocess.CompletedProcess, command: str = "segment") -> str:
    lines = _lines(out, command)
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def _marker(field_dir: Path, name: str = "misic"):
    """The label group's hpc_retrain attributes as the file holds them; None when there is no label group."""
    try:
        meta = json.loads((field_dir / "labels" / name / "zarr.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta.get("attributes", {}).get("hpc_retrain", {})


def _assert_complete(field: zarr.Group, name: str = "misic") -> int:
    prov = field["labels"][name].attrs["hpc_retrain"]
    labels = field["labels"][name]["0"][...]
    assert prov["complete"] is True and prov["cells"] == labels.max() > 0, prov.get("cells")
    assert prov["model_sha256"] and field["probabilities"][name].attrs["hpc_retrain"]["complete"] is True
    assert name in field["labels"].attrs["ome"]["labels"]
    return int(prov["cells"])


def _temp_folders(folder: Path) -> list[Path]:
    return sorted(folder.glob("hpc-retrain-infer-*"))


def _temp_size(folder: Path) -> int:
    """Bytes in the hpc-retrain-infer-* folders of ``folder`` (or in ``folder``, one of them)."""
    tops = [folder] if folder.name.startswith("hpc-retrain-infer-") else _temp_folders(folder)
    size = 0
    for top in tops:
        try:
            size += sum(q.stat().st_size for q in top.rglob("*") if q.is_file())
        except OSError:  # removed while we looked
            pass
    return size


# ----------------------------------------------------------------------- 4: one well per job-array task
@pytest.mark.parametrize("fmt", ["tiff", "ome-zarr"])
def test_one_well_per_task_one_after_the_other_and_at_once(tmp_path, fmt):
    """Two tasks (A1, A2) as slurm/segment.sbatch runs them: first one after the other, then both at once
    on a fresh copy (a TIFF plate's tasks race to create the output plate). Both exit 0 either way."""
    src = synth.write_plate(tmp_path / ("src.ome.zarr" if fmt == "ome-zarr" else "src"), fmt=fmt,
                            wells=["A1", "A2"], fields_per_well=2, shape=(160, 160), seed=3)
    for how in ("one after the other", "at once"):
        folder = tmp_path / how.replace(" ", "_")
        plate = folder / src.name
        shutil.copytree(src, plate)
        cmds = [_cmd("segment", "--plate", plate, "--wells", w, *W7) for w in ("A1", "A2")]
        if how == "at once":
            procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for c in cmds]
            outs = []
            for p in procs:
                stdout, stderr = p.communicate(timeout=600)
                outs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        else:
            outs = [subprocess.run(c, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
                    for c in cmds]
        for o in outs:
            assert o.returncode == 0, (how, o.stderr[-3000:])
            assert "segmented 2 field(s)" in o.stdout, o.stdout
        out = plate if fmt == "ome-zarr" else folder / f"{src.name}.ome.zarr"
        root = zarr.open_group(str(out), mode="r")
        assert len(ngff.plate_fields(root)) == 4
        for well in ("A/1", "A/2"):
            for i in (0, 1):
                _assert_complete(root[f"{well}/{i}"])
        if fmt == "tiff":  # every field's images copied once, each field where its source says
            for w, i, g in ngff.plate_fields(root):
                src_attrs = root[g].attrs["hpc_retrain_source"]
                assert (src_attrs["well"], src_attrs["field"]) == (w, str(i))
                bf = tifffile.imread(plate / f"{w}_s{i}_brightfield.tif")
                assert np.array_equal(root[g]["0"][0], bf)
        assert not _temp_folders(folder)


# ------------------------------------------------------------------ 6, 14: segment killed with kill -9
@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A segment of 3 large fields (450 px, chunk 256: the chunked path) killed with SIGKILL once one field
    is finished and the next one is being written; then evaluate, a plain rerun, evaluate again."""
    root = tmp_path_factory.mktemp("killed")
    plate = synth.write_plate(root / "plate.ome.zarr", wells=["A1"], fields_per_well=3, shape=(450, 450), seed=5)
    fields = [plate / "A" / "1" / str(i) for i in range(3)]
    args = ("segment", "--plate", plate, "--chunk", 256, *W7)
    proc = subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while True:
        marks = [_marker(f) for f in fields]
        # one field finished (it has its cell count), another one being written (a label group, no count
        # yet: how the fault looked before the completion marker too), in the middle of its scan
        if (any(m and "cells" in m for m in marks) and any(m is not None and "cells" not in m for m in marks)
                and _temp_size(root) > 1_000_000):
            break
        assert proc.poll() is None, f"segment ended before it could be killed: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no field finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    marks = [_marker(f) for f in fields]
    temps = {p.name: _temp_size(p) for p in _temp_folders(root)}
    done = [i for i, m in enumerate(marks) if m and "cells" in m]
    before = {i: zarr.open_group(str(plate), mode="r")[f"A/1/{i}/labels/misic/0"][...] for i in done}
    evaluate = ("evaluate", "--pred", plate, "--ref", "truth", "--overlays", "0")
    ev_killed = _cli(*evaluate)
    rerun = _cli(*args)
    return SimpleNamespace(plate=plate, root=root, pid=proc.pid, marks=marks, done=done, before=before,
                           temps=temps, ev_killed=ev_killed, rerun=rerun, ev_after=_cli(*evaluate))


def test_killed_segment_leaves_incomplete_fields_that_evaluate_refuses_and_a_rerun_redoes(killed):
    # At the kill: finished fields carry the marker with the provenance; the field being written carries
    # only {"complete": false} (it used to carry the full provenance over all-zero labels).
    incomplete = [i for i, m in enumerate(killed.marks) if m is not None and "cells" not in m]
    assert killed.done and incomplete, killed.marks
    for i in incomplete:
        assert killed.marks[i] == {"complete": False}
    for i in killed.done:
        assert killed.marks[i]["complete"] is True and killed.marks[i]["cells"] > 0 and killed.marks[i]["model_sha256"]

    # evaluate refuses, naming the unfinished fields (it used to score them: recall 0, exit 0)
    assert killed.ev_killed.returncode == 2, killed.ev_killed.stderr[-3000:]
    line = _error_line(killed.ev_killed, "evaluate")
    assert "incomplete" in line and all(f"A1/{i}" in line for i in incomplete)
    assert "overall" not in killed.ev_killed.stdout

    # a plain rerun (no --overwrite) redoes them and keeps the finished ones, untouched
    assert killed.rerun.returncode == 0, killed.rerun.stderr[-3000:]
    assert f"redoing {len(incomplete)} incomplete field(s)" in killed.rerun.stdout, killed.rerun.stdout
    assert f"{len(killed.done)} field(s) already segmented with these settings, kept" in killed.rerun.stdout
    root = zarr.open_group(str(killed.plate), mode="r")
    for i in range(3):
        _assert_complete(root[f"A/1/{i}"])
    for i, labels in killed.before.items():
        assert np.array_equal(root[f"A/1/{i}/labels/misic/0"][...], labels)
    assert killed.ev_after.returncode == 0, killed.ev_after.stderr[-3000:]
    assert "overall" in killed.ev_after.stdout


def test_killed_segment_temporary_folders_are_removed_by_the_rerun(killed):
    # kill -9 during a large field leaves its temporary data (features, scaled probabilities) behind ...
    assert len(killed.temps) == 1, killed.temps
    (name, size), = killed.temps.items()
    assert size > 1_000_000
    # ... and the next segment beside it removes it, saying so, since its process (pid in the name) is dead
    assert not _temp_folders(killed.root)
    assert name.startswith(f"hpc-retrain-infer-{killed.pid}@")
    assert f"removed 1 stale temporary folder(s) of killed segment runs: {name}" in killed.rerun.stdout


# ------------------------------------------------------------ 7: a failure while building the output
def test_truncated_tiff_stops_before_any_output_and_the_fixed_plate_segments(tmp_path):
    plate = synth.write_plate(tmp_path / "tiffs", fmt="tiff", wells=["A1"], fields_per_well=3, shape=(160, 160),
                              seed=9)
    bad = plate / "A1_s1_brightfield.tif"
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    out = _cli("segment", "--plate", plate, *W7)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert str(bad) in line and "unreadable TIFF" in line
    assert not (tmp_path / "tiffs.ome.zarr").exists() and not _temp_folders(tmp_path)

    bad.write_bytes(good)  # fixed: the rerun is not blocked by anything the failed run left
    out = _cli("segment", "--plate", plate, *W7)
    assert out.returncode == 0, out.stderr[-3000:]
    root = zarr.open_group(str(tmp_path / "tiffs.ome.zarr"), mode="r")
    for i in range(3):
        _assert_complete(root[f"A/1/{i}"])


# ------------------------------------------------------------------- bad fields: skipped, not fatal
def test_all_zero_and_nan_fields_are_skipped_naming_them(tmp_path):
    plate = synth.write_plate(tmp_path / "plate.ome.zarr", wells=["A1"], fields_per_well=3, shape=(300, 300),
                              seed=6)
    root = zarr.open_group(str(plate), mode="r+")
    assert ngff.channel_names(root["A/1/1"])[0] == "brightfield"
    img = root["A/1/1/0"][...]
    img[0] = 0  # an all-zero brightfield
    root["A/1/1/0"][...] = img
    img = root["A/1/2/0"][...].astype(np.float32)
    img[0, 10:20, 10:20] = np.nan  # NaN pixels
    ngff.write_field(root, "A1", 2, img, ngff.channel_names(root["A/1/2"]))

    for extra, name in (((), "misic"), (("--chunk", 256, "--name", "big"), "big")):  # in memory; chunked
        out = _cli("segment", "--plate", plate, *extra, *W7)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = _lines(out)
        assert len(lines) == 2, out.stderr[-3000:]
        assert lines[0].startswith("hpc-retrain segment: skipped field A1/1: ") and "constant image" in lines[0]
        assert lines[1].startswith("hpc-retrain segment: skipped field A1/2: ") and "NaN" in lines[1]
        assert "segmented 1 field(s)" in out.stdout and "skipped 2 field(s): A1/1, A1/2" in out.stdout
        root = zarr.open_group(str(plate), mode="r")
        _assert_complete(root["A/1/0"], name)
        for i in (1, 2):  # nothing written for a skipped field
            fld = root[f"A/1/{i}"]
            assert name not in fld.get("labels", {}) and name not in fld.get("probabilities", {})
            assert name not in fld["labels"].attrs["ome"]["labels"]

    one = synth.write_plate(tmp_path / "one.ome.zarr", wells=["A1"], fields_per_well=1, shape=(64, 64), seed=1)
    r1 = zarr.open_group(str(one), mode="r+")
    r1["A/1/0/0"][0] = 0
    out = _cli("segment", "--plate", one, *W7)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = _lines(out)
    assert len(lines) == 2 and "skipped field A1/0" in lines[0] and "no field was segmented" in lines[1]


# ------------------------------------------------------------------------ read-only and full outputs
def _mounted(script: str, path: Path) -> list[str]:
    """A command prefix running the command in a private mount namespace after ``script`` (about "$0")."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount (as root, permission bits do not stop writes)")
    prefix = ["unshare", "-m", "sh", "-c", f'{script} && exec "$@"', str(path)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount here: {probe.stderr.strip()}")
    return prefix


def _read_only(path: Path) -> list[str]:
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        return []
    prefix = _mounted('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0"', path)
    assert subprocess.run([*prefix, "touch", str(path / "x")], capture_output=True).returncode != 0
    return prefix


def test_read_only_plate_is_one_line_naming_it_and_out_elsewhere_works(tmp_path):
    plate = synth.write_plate(tmp_path / "plate.ome.zarr", wells=["A1"], fields_per_well=1, shape=(160, 160),
                              seed=8)
    prefix = _read_only(plate)
    try:
        out = _cli("segment", "--plate", plate, *W7, prefix=prefix)
        assert out.returncode == 2, out.stderr[-3000:]
        line = _error_line(out)
        assert line.startswith(f"hpc-retrain segment: {plate} is read-only")
        assert line.endswith("pass --out PATH to write the results elsewhere")

        elsewhere = tmp_path / "results.ome.zarr"
        out = _cli("segment", "--plate", plate, "--out", elsewhere, *W7, prefix=prefix)
        assert out.returncode == 0, out.stderr[-3000:]
        _assert_complete(zarr.open_group(str(elsewhere), mode="r")["A/1/0"])
    finally:
        if not prefix:
            subprocess.run(["chmod", "-R", "u+w", str(plate)], check=True)


def test_full_disk_is_one_line_naming_the_output(tmp_path):
    plate = synth.write_plate(tmp_path / "tiffs", fmt="tiff", wells=["A1"], fields_per_well=2, shape=(300, 300),
                              seed=2)
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = _mounted('mount -t tmpfs -o size=64k tmpfs "$0"', disk)
    out = _cli("segment", "--plate", plate, "--out", disk / "out.ome.zarr", *W7, prefix=prefix)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert line.startswith(f"hpc-retrain segment: {disk / 'out.ome.zarr'}: no space left on the device")
    assert "free space" in line
