"""The training store: one Zarr (v3) group of aligned (target, label) tiles, readable with plain zarr.

The arrays (``targets``, ``labels``, ``probabilities``, the tile and field tables, the per-stage ``prepare``
arrays) and their dimension names and attributes are described in :mod:`hpc_retrain.prepare.layout`.

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

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpc_retrain import __version__
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.imaging.tiling import TileGrid
from hpc_retrain.io import atomic
from hpc_retrain.prepare.layout import (
    CONFIG_ATTR,
    EVERY_CHUNK,
    LABEL_CHANNELS,
    OK,
    OLD_CONFIG_FILE,
    QC_COLUMNS,
    REQUIRED_ARRAYS,
    STAGE_TILES,
    FieldEntry,
    array_layout,
)

# Root attribute: a new id each time a store is created (rebuilt); a training checks it has not changed.
GENERATION = "generation"


class StoreError(HpcRetrainError, ValueError):
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
        GENERATION: uuid.uuid4().hex,
    })


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


# ----------------------------------------------------------------------------------------- generation, lock
def generation(path_or_root) -> str | None:
    """The store's generation id, read afresh from its metadata (None: an older store, or none at ``path``)."""
    try:
        root = path_or_root if isinstance(path_or_root, zarr.Group) else zarr.open_group(str(path_or_root), mode="r")
        value = root.attrs.get(GENERATION)
    except Exception:
        return None
    return str(value) if value else None


@contextlib.contextmanager
def _flocked(path: str | Path, mode: int, busy: str):
    """A non-blocking ``flock`` (``mode``) on the store's folder for the block; ``StoreError(busy)`` when another
    process holds a conflicting one. Where the file system has no ``flock`` the block runs unlocked."""
    fd = _lock_fd(path)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(busy) from None
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


def reading(path: str | Path):
    """Held by a training for as long as it reads the store: a shared ``flock`` on the store's folder, which
    :func:`replacing` (``prepare --overwrite``) cannot take meanwhile. Where the file system has no ``flock``
    the training goes on; its generation check still notices a rebuild."""
    return _flocked(path, fcntl.LOCK_SH, f"{path}: the store is being rebuilt (`hpc-retrain prepare --overwrite`); "
                                         f"train once it has finished")


def replacing(path: str | Path):
    """Held while an existing store is deleted to be rebuilt; refused while a training reads it."""
    return _flocked(path, fcntl.LOCK_EX,
                    f"{path}: a training is reading this store (`hpc-retrain train --store {path}`); rebuilding it "
                    f"would change its tiles under the run: wait for the training to end (or stop it), or prepare "
                    f"into another --out")


def _lock_fd(path: str | Path) -> int | None:
    try:
        return os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None  # not a folder (yet): nothing to lock


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
        from hpc_retrain.config import ConfigError, RunConfig

        try:
            return RunConfig.read_saved(folder / OLD_CONFIG_FILE).to_dict()
        except (OSError, ConfigError):  # unreadable: the store is then treated as having no settings
            pass
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
