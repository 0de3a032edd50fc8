"""The training store: one Zarr (v3) group of aligned (target, label) tiles, readable with plain zarr.

Layout (N tiles from F fields; every field's tiles are a contiguous block fixed when the store is created):

    targets        (N, S, S, 3) float32   shape-index features of brightfield
    labels         (N, S, S, 2) uint8     body, contour (0/1) from MISIC on fluorescence
    probabilities  (N, S, S, 2) float16   MISIC's probabilities the labels were cut from
    tile_field     (N,)  int32            index of the tile's field in attrs["fields"]
    tile_rc        (N, 2) int32           tile row/column in its field's grid
    field_done     (F,)  uint8            1 once a field's tiles AND its QC are fully written
    field_qc       (F, K) float32         per-field label statistics (columns: attrs["qc_columns"])
    field_status   (F,)  uint8            0 pending, 1 ok, 2 flagged (attrs["fields"][i]["error"] says why)

and, per ``prepare`` stage (``labels``, ``targets``; :func:`ensure_stage_arrays`), ``<stage>_done`` (F,) uint8,
``<stage>_error`` (F,) str and ``<stage>_written`` (F,) float64 (seconds since the epoch).

The store describes itself: every array carries Zarr v3 ``dimension_names`` and attributes saying what it
holds (``description``; ``channel_names`` / ``column_names`` for its last axis, ``codes``, ``units``: see
:func:`array_layout`). The settings it was prepared with are the root attribute ``config``
(:func:`stored_config` reads them; ``prepare`` also writes a copy for people beside the store as
``<store>.config.yaml``). Older stores kept that copy as ``config.yaml`` inside the hierarchy, which plain zarr
warns about; they still read, and a ``prepare`` rerun moves the file out (:func:`save_config`).

Chunks hold one tile, so fields never share a chunk: parallel writers cannot race, and a field killed
half-way is simply rewritten because ``field_done`` is set last.

Every tile of ``targets``, ``labels`` and ``probabilities`` has its chunk file, even an all-zero one (stores
carrying ``attrs["every_tile_chunk"]``; ``prepare`` writes inside :func:`writing_every_chunk`), so a chunk
file that is missing means damage, not zeros: :func:`missing_tiles` finds them from a listing of the chunk
keys, without reading a chunk. Older stores skipped all-zero chunks; for them only ``targets`` is checked.
"""

from __future__ import annotations

import os
import shutil
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpc_retrain import __version__, atomic
from hpc_retrain.tiling import TileGrid

LABEL_CHANNELS = ("body", "contour")
# "dropped": objects of MISIC's fluorescence segmentation taken out of the labels (specks, dim blobs).
QC_COLUMNS = ("body_q1", "body_q2", "body_q3", "body_q4", "positive_body", "positive_contour", "cells", "dropped",
              "target_mean", "target_std")
PENDING, OK, FLAGGED = 0, 1, 2
EVERY_CHUNK = "every_tile_chunk"  # attrs flag: all-zero tiles have chunk files too (a missing one is damage)
# Arrays a training store cannot do without (``probabilities`` is optional: validation falls back to labels).
REQUIRED_ARRAYS = ("targets", "labels", "tile_field", "tile_rc", "field_done", "field_status", "field_qc")
# The tile arrays of each prepare stage.
STAGE_TILES = {"labels": ("labels", "probabilities"), "targets": ("targets",)}
CONFIG_ATTR = "config"  # root attribute: the settings the store was prepared with (RunConfig.to_dict())
OLD_CONFIG_FILE = "config.yaml"  # where older stores kept them, inside the hierarchy (plain zarr warns)
TIME_UNITS = "seconds since 1970-01-01T00:00:00Z"
STATUS_CODES = {str(PENDING): "pending: not processed (yet)", str(OK): "ok: used for training",
                str(FLAGGED): "flagged: not used; attrs['fields'][i]['error'] of the root group says why"}


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names it and what to do."""


class DamagedStore(StoreError):
    """A training store whose own metadata is missing or unreadable; ``prepare --overwrite`` rebuilds it."""


# Errors of the machine, not of the data (never a reason to flag a field): what happened, what to do.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or raise the quota)"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "fix the permissions"),
    errno.EIO: ("input/output error", "check the disk"),
}


def environment_error(e: BaseException | None) -> OSError | None:
    """The OSError of :data:`ENVIRONMENT_ERRORS` behind ``e``: ``e`` itself, or what it was raised from or
    while handling (a PlateError raised from a "permission denied")."""
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRORS:
            return e
        e = e.__cause__ or e.__context__
    return None


@dataclass(frozen=True)
class FieldEntry:
    index: int
    well: str
    field: str
    source: str
    shape: tuple[int, int]  # original image
    scaled_shape: tuple[int, int]  # after rescale to the 10 px cell width
    first_tile: int
    n_tiles: int

    @property
    def tiles(self) -> slice:
        return slice(self.first_tile, self.first_tile + self.n_tiles)


def plan_fields(fields, scale: float, size: int, margin: int) -> list[FieldEntry]:
    """Tile offsets for every field, from image shapes alone (no pixels read)."""
    from hpc_retrain.preprocess import rescaled_shape

    out, offset = [], 0
    for i, f in enumerate(fields):
        scaled = rescaled_shape(f.shape, scale)
        n = len(TileGrid(scaled, size, margin))
        out.append(FieldEntry(i, f.well, f.field, f.source, tuple(f.shape), scaled, offset, n))
        offset += n
    return out


def create(path: str | Path, entries: list[FieldEntry], config: dict[str, Any], size: int) -> zarr.Group:
    """A new, empty store at ``path`` (replacing whatever is there).

    Built under a temporary name beside ``path`` and renamed into place once complete, so a store that was
    being created when the disk filled up (or the process died) is either whole or absent.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _create(tmp, entries, config, size)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return zarr.open_group(str(path), mode="r+")


def _create(path: Path, entries: list[FieldEntry], config: dict[str, Any], size: int) -> None:
    n, nf = sum(e.n_tiles for e in entries), len(entries)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    layout = array_layout(config)

    def array(name, **kw):
        dims, attrs = layout[name]
        root.create_array(name, dimension_names=dims, attributes=attrs, **kw)

    t = (1, size, size)
    nc = len(layout["targets"][1]["channel_names"])
    array("targets", shape=(n, size, size, nc), dtype="float32", chunks=t + (nc,), fill_value=0)
    array("labels", shape=(n, size, size, 2), dtype="uint8", chunks=t + (2,), fill_value=0)
    array("probabilities", shape=(n, size, size, 2), dtype="float16", chunks=t + (2,), fill_value=0)
    tile_field = np.concatenate([np.full(e.n_tiles, e.index, np.int32) for e in entries]) if n else np.zeros(0, np.int32)
    array("tile_field", data=tile_field, chunks=(max(n, 1),))
    rc = [TileGrid(e.scaled_shape, size, config["tiling"]["margin"]).indices for e in entries]
    array("tile_rc", data=np.concatenate(rc).astype(np.int32) if n else np.zeros((0, 2), np.int32),
          chunks=(max(n, 1), 2))
    array("field_done", shape=(nf,), dtype="uint8", chunks=(1,), fill_value=0)
    array("field_status", shape=(nf,), dtype="uint8", chunks=(1,), fill_value=0)
    array("field_qc", shape=(nf, len(QC_COLUMNS)), dtype="float32", chunks=(1, len(QC_COLUMNS)), fill_value=np.nan)
    root.attrs.update({
        "hpc_retrain": {"version": __version__, "kind": "training-store"},
        CONFIG_ATTR: config,
        "fields": [{"well": e.well, "field": e.field, "source": e.source, "shape": list(e.shape),
                    "scaled_shape": list(e.scaled_shape), "first_tile": e.first_tile, "n_tiles": e.n_tiles}
                   for e in entries],
        "label_channels": list(LABEL_CHANNELS),
        "qc_columns": list(QC_COLUMNS),
        "tile_size": size,
        EVERY_CHUNK: True,
    })


def array_layout(config: dict[str, Any] | None = None,
                 stages=tuple(STAGE_TILES)) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """{array: (dimension_names, attributes)} of every array of a store prepared with ``config`` (a
    ``RunConfig.to_dict()``; its ``preprocess.sigmas`` name the target channels), ``stages``' arrays included."""
    sigmas = ((config or {}).get("preprocess") or {}).get("sigmas") or (1.0, 1.5, 2.0)
    tile, table = ["tile", "y", "x", "c"], "one row per field of attrs['fields'] (the root group's)"
    binary = {"0": "no", "1": "yes"}
    out: dict[str, tuple[list[str], dict[str, Any]]] = {
        "targets": (tile, {
            "description": "the model's input: MISIC's shape index of the brightfield image (normalized, rescaled "
                           "to a 10 px cell width), one channel per Gaussian scale; -1..1, 0 where flat",
            "channel_names": [f"shape_index_sigma_{float(s):g}" for s in sigmas],
            "sigmas": [float(s) for s in sigmas]}),
        "labels": (tile, {
            "description": "the training labels: MISIC's segmentation of the fluorescence image, its probabilities "
                           "thresholded, 1 inside / 0 outside",
            "channel_names": list(LABEL_CHANNELS)}),
        "probabilities": (tile, {
            "description": "MISIC's per-pixel probabilities on the fluorescence image, the labels were cut from",
            "channel_names": list(LABEL_CHANNELS)}),
        "tile_field": (["tile"], {"description": "the tile's field: its index in attrs['fields'] of the root group"}),
        "tile_rc": (["tile", "rc"], {"description": "the tile's row and column in its field's tile grid",
                                     "column_names": ["row", "column"]}),
        "field_done": (["field"], {"description": "1 once the field's tiles and QC are fully written (set last); "
                                                  + table, "codes": {"0": "not done", "1": "done"}}),
        "field_status": (["field"], {"description": "whether the field is used for training; " + table,
                                     "codes": dict(STATUS_CODES)}),
        "field_qc": (["field", "qc"], {"description": "per-field statistics of the labels and targets (NaN until "
                                                      "written); " + table, "column_names": list(QC_COLUMNS)}),
    }
    for st in stages:
        out[f"{st}_done"] = (["field"], {"description": f"1 once prepare's {st} stage finished the field (its "
                                                         f"tiles, QC and error written); " + table, "codes": binary})
        out[f"{st}_error"] = (["field"], {"description": f"why the {st} stage flagged the field; empty when fine; "
                                                         + table})
        out[f"{st}_written"] = (["field"], {"description": f"when the {st} stage finished the field (NaN: not yet); "
                                                           + table, "units": TIME_UNITS})
    return out


def ensure_stage_arrays(root: zarr.Group, nf: int, stages=tuple(STAGE_TILES)) -> None:
    """``<stage>_done``, ``<stage>_error`` and ``<stage>_written`` (F,) of ``stages``, unless there."""
    layout = array_layout(stored_config(root), stages)
    kinds = {"done": dict(dtype="uint8", fill_value=0), "error": dict(dtype=str),
             "written": dict(dtype="float64", fill_value=np.nan)}
    for stage in stages:
        if f"{stage}_done" in root:
            continue
        for kind, kw in kinds.items():
            dims, attrs = layout[f"{stage}_{kind}"]
            root.create_array(f"{stage}_{kind}", shape=(nf,), chunks=(1,), dimension_names=dims, attributes=attrs,
                              **kw)


def describe_arrays(root: zarr.Group) -> list[str]:
    """Give the arrays of an older store, made before stores described themselves, their attributes and
    ``dimension_names`` (rewriting their ``zarr.json``; attributes only where the store is not a local folder).
    Returns the arrays changed."""
    import json

    folder = _store_folder(root)
    changed = []
    for name, (dims, attrs) in array_layout(stored_config(root)).items():
        if name not in root or "description" in root[name].attrs:
            continue
        meta = folder / name / "zarr.json" if folder is not None else None
        if meta is not None and meta.is_file():
            doc = json.loads(meta.read_text())
            if len(doc.get("shape", ())) == len(dims):
                doc["dimension_names"] = doc.get("dimension_names") or dims
            doc["attributes"] = {**attrs, **(doc.get("attributes") or {})}
            atomic.write_json(meta, doc, indent=2)
        else:
            root[name].attrs.update(attrs)
        changed.append(name)
    return changed


# ----------------------------------------------------------------------------------------- config
def config_copy_path(path: str | Path) -> Path:
    """``<store>.config.yaml`` beside the store (``x.train.zarr`` -> ``x.train.config.yaml``): the settings, for
    people; outside the hierarchy, so plain zarr does not take it for a broken member."""
    p = Path(path)
    return p.with_name((p.name[:-5] if p.name.endswith(".zarr") else p.name) + ".config.yaml")


def _store_folder(root: zarr.Group) -> Path | None:
    folder = getattr(root.store, "root", None)  # a LocalStore
    return Path(folder) / root.path if folder is not None else None


def stored_config(root: zarr.Group) -> dict[str, Any]:
    """The settings the store was prepared with, a ``RunConfig.to_dict()`` (no provenance): the root attribute
    ``config``, else (older stores) the ``config.yaml`` inside the store; {} when it has neither.

    Every reader of a store's settings goes through here."""
    saved = root.attrs.get(CONFIG_ATTR)
    if isinstance(saved, dict) and saved:
        return dict(saved)
    folder = _store_folder(root)
    if folder is not None and (folder / OLD_CONFIG_FILE).is_file():
        import yaml

        try:
            data = yaml.safe_load((folder / OLD_CONFIG_FILE).read_text()) or {}
        except (OSError, yaml.YAMLError):
            data = {}
        if isinstance(data, dict):
            from hpc_retrain.config import _PROVENANCE  # the keys RunConfig.save adds beside the settings

            return {k: v for k, v in data.items() if k not in _PROVENANCE}
    return {}


def read_config(path: str | Path):
    """The ``RunConfig`` the training store at ``path`` was prepared with (see :func:`stored_config`)."""
    from hpc_retrain.config import RunConfig

    saved = stored_config(open_store(path))
    if not saved:
        raise StoreError(f"{path}: the store records no settings (no attrs['{CONFIG_ATTR}']); rebuild it with "
                         f"`hpc-retrain prepare --plate PLATE --out {path} --overwrite`")
    return RunConfig.from_dict(saved, source=f"{path} attrs['{CONFIG_ATTR}']")


def save_config(root: zarr.Group, path: str | Path, cfg) -> Path:
    """Record ``cfg`` (a RunConfig) as the store's root attribute ``config`` (rewritten only when it changed)
    and write the copy for people beside the store (:func:`config_copy_path`). An older store's
    ``config.yaml`` inside the hierarchy is removed (its settings are the attribute now)."""
    config = cfg.to_dict()
    if root.attrs.get(CONFIG_ATTR) != config:
        root.attrs[CONFIG_ATTR] = config
    copy = config_copy_path(path)
    cfg.save(copy.parent, copy.name)
    (Path(path) / OLD_CONFIG_FILE).unlink(missing_ok=True)
    return copy


def writing_every_chunk():
    """Arrays opened inside this context write all-zero tiles as chunk files too (zarr skips them by
    default), so that a chunk file missing later means damage, never "all zeros"."""
    return zarr.config.set({"array.write_empty_chunks": True})


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """The training store at ``path``; :class:`DamagedStore` when one of its arrays' metadata is missing or
    unreadable (say a deleted ``targets/zarr.json``), naming it and how to rebuild the store."""
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as e:
        raise StoreError(f"{path}: not a readable Zarr store ({type(e).__name__}: {e})") from None
    if root.attrs.get("hpc_retrain", {}).get("kind") != "training-store":
        raise StoreError(f"{path}: not an hpc-retrain training store (build one with `hpc-retrain prepare`)")
    for name in REQUIRED_ARRAYS:
        try:
            root[name]
        except KeyError:
            problem = f"array {name} is missing (no {path / name / 'zarr.json'})"
        except Exception as e:
            problem = f"the metadata of array {name} is unreadable ({path / name / 'zarr.json'}: {_short(e)})"
        else:
            continue
        raise DamagedStore(f"{path}: the store is damaged: {problem}; rebuild it with "
                           f"`{prepare_command(root, path)} --overwrite`")
    return root


def prepare_command(root: zarr.Group, path: str | Path) -> str:
    """The ``hpc-retrain prepare`` command that (re)fills the store at ``path``."""
    plate = stored_config(root).get("plate", {}).get("path") or "PLATE"
    return f"hpc-retrain prepare --plate {plate} --out {path}"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------- chunks
def tile_arrays(root: zarr.Group, arrays=("targets", "labels", "probabilities")) -> tuple[str, ...]:
    """Those of ``arrays`` whose chunk files must all exist: every one in stores that write all-zero tiles,
    else only ``targets`` (an all-zero label tile of an older store has no chunk file)."""
    every = bool(root.attrs.get(EVERY_CHUNK))
    return tuple(a for a in arrays if a in root and (every or a == "targets"))


def chunk_file(root: zarr.Group, path: str | Path, name: str, tile: int) -> Path:
    arr = root[name]
    return Path(path) / name / arr.metadata.encode_chunk_key((int(tile),) + (0,) * (arr.ndim - 1))


def _chunk_keys(root: zarr.Group, name: str) -> set[str]:
    """Keys of the chunks ``name`` has in the store (one listing, nothing read)."""
    from zarr.core.sync import sync

    prefix = f"{root.path}/{name}/" if root.path else f"{name}/"

    async def collect():
        return {k[len(prefix):] async for k in root.store.list_prefix(prefix)}

    return sync(collect())


def missing_tiles(root: zarr.Group, fields,
                  arrays=("targets", "labels", "probabilities")) -> dict[int, dict[str, list[int]]]:
    """{field: {array: [tile, ...]}} for the tiles of ``fields`` whose chunk file is missing."""
    ent = entries(root)
    out: dict[int, dict[str, list[int]]] = {}
    for name in tile_arrays(root, arrays):
        arr = root[name]
        have = _chunk_keys(root, name)
        rest = (0,) * (arr.ndim - 1)
        for f in fields:
            e = ent[int(f)]
            gone = [t for t in range(e.first_tile, e.first_tile + e.n_tiles)
                    if arr.metadata.encode_chunk_key((t,) + rest) not in have]
            if gone:
                out.setdefault(int(f), {})[name] = gone
    return out


def describe_missing(root: zarr.Group, missing: dict[int, dict[str, list[int]]], limit: int = 4) -> str:
    """"A1/0: targets tiles 0-3; A2/1: labels tile 5" (the first ``limit`` fields, then how many more)."""
    ent = entries(root)
    parts = []
    for f in sorted(missing)[:limit]:
        arrays = ", ".join(f"{name} tile{'s' if len(t) > 1 else ''} {_ranges(t)}" for name, t in missing[f].items())
        parts.append(f"{ent[f].well}/{ent[f].field}: {arrays}")
    if len(missing) > limit:
        parts.append(f"and {len(missing) - limit} more field(s)")
    return "; ".join(parts)


def _ranges(tiles: list[int]) -> str:
    out, start = [], None
    for i, t in enumerate(tiles):
        if start is None:
            start = t
        if i + 1 == len(tiles) or tiles[i + 1] != t + 1:
            out.append(str(start) if start == t else f"{start}-{t}")
            start = None
    return ", ".join(out)


def unreadable_chunks(root: zarr.Group, path: str | Path, fields=None, limit: int = 5,
                      arrays=("targets", "labels", "probabilities")) -> list[tuple[Path, str]]:
    """(chunk file, why) for up to ``limit`` tiles of ``fields`` (default: the usable ones) that exist but do
    not decode (truncated, overwritten). Reads every tile: for naming the damage once something failed."""
    fields = done_fields(root) if fields is None else fields
    ent = entries(root)
    out = []
    for name in (a for a in arrays if a in root):
        arr = root[name]
        for f in fields:
            for t in range(ent[int(f)].first_tile, ent[int(f)].first_tile + ent[int(f)].n_tiles):
                try:
                    arr[t]
                except Exception as e:
                    out.append((chunk_file(root, path, name, t), _short(e)))
                    if len(out) >= limit:
                        return out
    return out


def check_tiles(root: zarr.Group, path: str | Path, fields=None) -> None:
    """Refuse (:class:`StoreError`, one line) when a tile of ``fields`` (default: the usable ones) has no
    chunk file in ``targets`` or ``labels``: zarr would read it as zeros and train on blank tiles."""
    fields = done_fields(root) if fields is None else fields
    missing = missing_tiles(root, fields, ("targets", "labels"))
    if missing:
        n = sum(len(t) for m in missing.values() for t in m.values())
        raise StoreError(f"{path}: {n} tile chunk(s) of {len(missing)} finished field(s) are missing "
                         f"({describe_missing(root, missing)}); they would train as blank tiles: rerun "
                         f"`{prepare_command(root, path)}` (with the options the store was made with), which "
                         f"redoes fields with missing chunks")


def entries(root: zarr.Group) -> list[FieldEntry]:
    return [FieldEntry(i, f["well"], f["field"], f["source"], tuple(f["shape"]), tuple(f["scaled_shape"]),
                       f["first_tile"], f["n_tiles"]) for i, f in enumerate(root.attrs["fields"])]


def done_fields(root: zarr.Group) -> np.ndarray:
    """Indices of fields whose tiles are complete and usable for training."""
    done = root["field_done"][:]
    status = root["field_status"][:]
    return np.flatnonzero((done == 1) & (status == OK))


def positive_fraction(root: zarr.Group, fields: np.ndarray | None = None) -> np.ndarray:
    """Per-channel fraction of positive label pixels over the given (default: usable) fields."""
    fields = done_fields(root) if fields is None else np.asarray(fields)
    qc = root["field_qc"][:]
    cols = [QC_COLUMNS.index("positive_body"), QC_COLUMNS.index("positive_contour")]
    ent = entries(root)
    w = np.array([ent[i].n_tiles for i in fields], float)
    if not len(fields) or w.sum() == 0:
        raise StoreError(f"{root.store}: no finished fields with labels; run `hpc-retrain prepare` first")
    return (qc[fields][:, cols] * w[:, None]).sum(0) / w.sum()
