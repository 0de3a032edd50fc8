"""Where ``segment`` writes: the output OME-Zarr plate, the state of each field's result, temporary folders.

Results of a field are ``labels/<name>`` (instance labels) and ``probabilities/<name>`` (the (body, contour)
maps as an NGFF image). The completion marker is the label group's ``hpc_retrain`` attributes: set to
``{"complete": false}`` before any array of the result changes (:func:`begin_result`), and replaced, as the
field's very last write, by the provenance (model, its sha256, mode, channel, config), the ``cells`` count
and ``"complete": true`` (:func:`finish_result`; the probabilities get their provenance just before). Zarr
writes a group's attributes in one atomic file replacement, so a field is either marked finished or it is
not; :func:`result_state` reads the marker.

A TIFF plate's output OME-Zarr plate is made once, for every field, atomically (built under a temporary
name, renamed into place under a lock of its folder). Temporary folders are named
``hpc-retrain-infer-<pid>@<host>-*``; a later run removes those whose process is dead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain.config import MOVED
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.io import ngff
from hpc_retrain.io.atomic import pid_alive

log = logging.getLogger(__name__)

PROB_GROUP = "probabilities"  # <field>/probabilities/<name>: the (body, contour) maps as an NGFF image
PROB_CHANNELS = ("body", "contour")


class OutputError(HpcRetrainError, ValueError):
    """An output plate that cannot take the results; the message names it and what to do."""


def write_probabilities(field_group, name: str, shape: tuple[int, int], chunk: int, overwrite: bool, **attrs: Any):
    """Create ``<field>/probabilities/<name>``: a (c, y, x) float32 NGFF image of the (body, contour) maps on
    the field image's pixel grid (``ngff.spatial``), listed in ``<field>/probabilities``' ``images``."""
    probs = field_group.require_group(PROB_GROUP)
    grp = probs.require_group(name)
    window = {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}
    arr = ngff.create_image(grp, ngff.spatial(field_group), f"{name} probabilities", (2,) + tuple(shape),
                            np.float32, (1, min(chunk, shape[0]), min(chunk, shape[1])), overwrite=overwrite,
                            omero={"channels": [{"label": c, "window": window} for c in PROB_CHANNELS]})
    ngff.list_result(probs, name)
    if attrs:
        grp.attrs.update(attrs)
    return arr


def existing_results(field_group, name: str) -> list[str]:
    """What of result ``name`` a field holds, finished or not: ``labels/<name>``, ``probabilities/<name>``."""
    found = []
    labels = field_group.get("labels")
    if labels is not None and name in labels:
        found.append("labels/" + name)
    probs = field_group.get(PROB_GROUP)
    if probs is not None and name in probs:
        found.append(f"{PROB_GROUP}/{name}")
    return found


def result_state(field_group, name: str) -> str | None:
    """``"complete"``, ``"incomplete"`` (a segment stopped before its last write: the field is redone) or
    None (nothing of that name). The completion marker is the label group's ``hpc_retrain`` attributes
    (``ngff.is_complete``)."""
    found = existing_results(field_group, name)
    if not found:
        return None
    if "labels/" + name in found and ngff.is_complete(field_group["labels"][name]):
        return "complete"
    return "incomplete"


def foreign_result(field_group, name: str) -> str | None:
    """``labels/<name>`` or ``probabilities/<name>`` of a field when hpc_retrain did not write it (no
    ``hpc_retrain`` attributes: hand-made masks, another tool's): such results are never replaced."""
    for parent in ("labels", PROB_GROUP):
        grp = field_group.get(parent)
        if grp is not None and name in grp and not isinstance(grp[name].attrs.get(ngff.PROVENANCE), dict):
            return f"{parent}/{name}"
    return None


def check_inside(plate_path: Path, group_path: str, name: str) -> None:
    """Refuse to write a field's results through a symbolic link that leads out of the plate (a field group,
    its ``labels``/``probabilities`` or the result itself linked elsewhere): the results would land outside."""
    root = Path(plate_path).resolve()
    for rel in (group_path, f"{group_path}/labels", f"{group_path}/labels/{name}", f"{group_path}/{PROB_GROUP}",
                f"{group_path}/{PROB_GROUP}/{name}"):
        p = Path(plate_path) / rel
        if not (p.exists() or p.is_symlink()):
            continue
        real = p.resolve()
        if real != root and root not in real.parents:
            raise OutputError(f"{p}: is a link to {real}, outside the plate {plate_path}; results are never written "
                              f"through it: replace the link with the folder itself, or pass --out PATH to write "
                              f"a new plate")


def begin_result(field_group, name: str) -> None:
    """Mark ``labels/<name>`` then ``probabilities/<name>`` unfinished before any of their arrays changes (a
    new group is created with the mark in one metadata write)."""
    mark = {"complete": False}
    for parent in ("labels", PROB_GROUP):
        grp = field_group.require_group(parent)
        if name in grp:
            grp[name].attrs[ngff.PROVENANCE] = mark
        else:
            grp.create_group(name, attributes={ngff.PROVENANCE: mark})


def finish_result(field_group, name: str, provenance: dict, cells: int) -> None:
    """Provenance of the probabilities, then of the labels with the cell count and ``complete``: the last write."""
    field_group[PROB_GROUP][name].attrs[ngff.PROVENANCE] = {**provenance, "complete": True}
    field_group["labels"][name].attrs[ngff.PROVENANCE] = {**provenance, "cells": int(cells), "complete": True}


def remove_result(field_group, name: str) -> None:
    """Remove result ``name`` of a field (a skipped field keeps nothing of it)."""
    labels = field_group.get("labels")
    if labels is not None:
        ome = dict(labels.attrs.get("ome", {}))
        if name in ome.get("labels", []):
            ome["labels"] = [n for n in ome["labels"] if n != name]
            labels.attrs["ome"] = ome
        if name in labels:
            del labels[name]
    probs = field_group.get(PROB_GROUP)
    if probs is not None:
        if name in probs.attrs.get("images", []):  # the listing that makes it discoverable (ngff.list_result)
            probs.attrs["images"] = [n for n in probs.attrs["images"] if n != name]
        if name in probs:
            del probs[name]


# Settings that do not change a result: a rerun with other values of these still finds its fields done.
# The compute section is not read at all (the engine neither: OpenVINO and TensorFlow agree within 1e-5,
# tests/integration/test_engine.py); outputs written before it existed list those settings under infer.
_NOT_RESULT_SETTINGS = ("infer.model", "infer.name", *MOVED)


def result_settings(prov) -> dict[str, Any]:
    """What a result depends on, flattened: the model's weights, mode, channel, preprocessing, tiling and the
    post-processing thresholds."""
    out = {k: prov.get(k) for k in ("model_sha256", "channel")}  # the mode: infer.mode

    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                flat(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in _NOT_RESULT_SETTINGS:
                out[f"{prefix}{k}"] = v

    cfg = prov.get("config") or {}
    for sec in ("preprocess", "tiling", "infer"):
        flat(cfg.get(sec) or {}, f"{sec}.")
    return json.loads(json.dumps(out, default=str))


def settings_differ(old_prov, new: dict[str, Any]) -> list[str]:
    if not isinstance(old_prov, dict) or "config" not in old_prov:
        return ["not written by hpc-retrain segment"]
    old = result_settings(old_prov)
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------ temporary data
# Temporary folders of a segment (a large field's features and scaled probabilities; an output plate being
# built) are named hpc-retrain-infer-<pid>@<host>-<random> beside the output, so a later run can tell that
# their owner died (kill -9, out of memory, a node lost) and remove them.
TEMP_PREFIX = "hpc-retrain-infer-"
_TEMP_OWNER = re.compile(r"^hpc-retrain-infer-(\d+)@(.+)-[A-Za-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def temp_folder(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}@{_host()}-", dir=parent))


def remove_stale_temp(parent: Path) -> tuple[list[Path], list[Path]]:
    """Remove ``hpc-retrain-infer-*`` folders in ``parent`` whose owner, a process on this host, is dead.

    Returns (removed, unknown): ``unknown`` are folders of processes on other hosts, or of versions that did
    not record their owner; those are left alone (their owner may still run)."""
    removed, unknown = [], []
    try:
        entries = sorted(p for p in Path(parent).iterdir() if p.name.startswith(TEMP_PREFIX) and p.is_dir())
    except OSError:
        return removed, unknown
    for p in entries:
        m = _TEMP_OWNER.match(p.name)
        if not m or m.group(2) != _host():
            unknown.append(p)
            continue
        if pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        (unknown if p.exists() else removed).append(p)
    return removed, unknown


# ------------------------------------------------------------------------------------------ output plate
def default_output(plate_path: Path) -> Path:
    return Path(str(plate_path).rstrip("/") + ".ome.zarr")


def output_plate(plate, out: Path | None, fields, chunk: int):
    """The Zarr plate results go into, and the group of each of ``fields`` in it.

    An OME-Zarr input without ``--out`` is written in place. Otherwise the output plate holds every field of
    the plate (images copied), whichever fields this run segments, so that tasks of a job array given one
    well each all find their fields in it. It is created by the first task (see :func:`_create_output`).
    """
    import zarr

    if out is None and plate.layout == "ome-zarr":
        root = zarr.open_group(str(plate.path), mode="r+")
        groups = {(w, str(i)): g for w, i, g in ngff.plate_fields(root)}
        return plate.path, [root[groups[(f.well, f.field)]] for f in fields]
    out = Path(out) if out else default_output(plate.path)
    if not out.exists():
        _create_output(plate, out, chunk)
    try:
        root = zarr.open_group(str(out), mode="r+")
        listed = {(w, i): g for w, i, g in ngff.plate_fields(root)}
    except Exception as e:
        raise OutputError(f"{out}: exists and is not an OME-Zarr plate ({e}); choose another --out") from None
    position = _positions(plate.fields)
    groups = []
    for f in fields:
        gpath = listed.get(position[(f.well, f.field)])
        if gpath is None:
            raise OutputError(f"{out}: exists but holds no field {f.key}; choose another --out")
        try:
            grp = root[gpath]
        except KeyError:
            raise OutputError(f"{out}: lists field {gpath} but it was never written (left by a segment that "
                             f"failed while creating the plate); remove {out} and run again") from None
        src = grp.attrs.get("hpc_retrain_source")
        if isinstance(src, dict) and (src.get("well"), str(src.get("field"))) != (f.well, f.field):
            raise OutputError(f"{out}: field {gpath} holds {src.get('well')}/{src.get('field')} of another plate, "
                             f"not {f.key}; choose another --out")
        groups.append(grp)
    return out, groups


def _positions(fields) -> dict[tuple[str, str], tuple[str, int]]:
    """(well, field) -> (NGFF well, field index) in the output plate: fields numbered in plate order per well."""
    count: dict[str, int] = {}
    pos = {}
    for f in fields:
        well = "".join(ngff.split_well(f.well))
        pos[(f.well, f.field)] = (well, count.get(well, 0))
        count[well] = count.get(well, 0) + 1
    return pos


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on ``folder`` (no lock file left behind); a no-op where the file system has none."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock here (some network file systems): the atomic rename alone keeps creation safe
        yield
    finally:
        os.close(fd)


def _create_output(plate, out: Path, chunk: int) -> None:
    """Build the output plate of every field of ``plate`` under a temporary name and rename it into place.

    The plate appears whole or not at all: reading every image while copying validates the inputs first (an
    unreadable file stops the run with nothing created, and the rerun starts afresh), and of tasks racing to
    create it (a job array) one renames its copy into place while the others, waiting on a lock of the
    parent folder, then find it made.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out.parent):
        if out.exists():
            return
        tmp = temp_folder(out.parent)
        try:
            log.info("copying %d field(s) of %s into %s", len(plate.fields), plate.path, out)
            _copy_plate(plate, tmp, chunk)
            try:
                os.rename(tmp, out)
            except OSError:
                if not out.exists():
                    raise  # else another task (without a lock) made it first: use its plate
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _copy_plate(plate, path: Path, chunk: int) -> None:
    import dask.array as da

    per_well: dict[str, list] = {}
    for f in plate.fields:
        per_well.setdefault(f.well, []).append(f)
    root = ngff.create_plate(path, list(per_well), max(len(v) for v in per_well.values()),
                             name=Path(plate.path).name)
    for well, fs in per_well.items():
        r, c = ngff.split_well(well)
        root[f"{r}/{c}"].attrs["ome"] = {"version": ngff.NGFF_VERSION,
                                         "well": {"images": [{"path": str(i)} for i in range(len(fs))]}}
        for i, f in enumerate(fs):
            names = sorted(f.channels)
            img = da.stack([f.channels[n] for n in names])
            if max(f.shape) <= chunk:
                img = np.asarray(img)  # read now: an unreadable file stops here, naming itself
            grp = ngff.write_field(root, well, i, img, names, chunk=chunk)
            grp.attrs["hpc_retrain_source"] = {"well": f.well, "field": f.field, "source": f.source}


# ------------------------------------------------------------------------------------------ file system faults
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def fs_problem(e: OSError, where: Path, out_given: bool) -> str | None:
    """One line for a read-only or full output, or None for other errors."""
    detail = f" ({e.filename}: {e.strerror})" if e.filename else f" ({e.strerror})"
    elsewhere = "choose another --out" if out_given else "pass --out PATH to write the results elsewhere"
    if e.errno in _READ_ONLY:
        return f"{where} is read-only{detail}: {elsewhere}"
    if e.errno in _FULL:
        return (f"{where}: no space left on the device{detail}; free space there or "
                f"{'choose an --out' if out_given else 'pass --out PATH'} on another file system, then run the "
                f"same command again (finished fields are kept)")
    return None


def probe_writable(folder: Path) -> OSError | None:
    """Create and remove a file in ``folder``: the error a write there gives, if any (root ignores permission
    bits, so asking os.access would not do)."""
    probe = folder / f".hpc-retrain-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return OSError(e.errno, e.strerror)  # without the probe's own name
    return None

