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

Chunks hold one tile, so fields never share a chunk: parallel writers cannot race, and a field killed
half-way is simply rewritten because ``field_done`` is set last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpc_retrain import __version__
from hpc_retrain.tiling import TileGrid

LABEL_CHANNELS = ("body", "contour")
QC_COLUMNS = ("body_q1", "body_q2", "body_q3", "body_q4", "positive_body", "positive_contour", "cells",
              "target_mean", "target_std")
PENDING, OK, FLAGGED = 0, 1, 2


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names it and what to do."""


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
    """A new, empty store; refuses to replace an existing one made with other parameters."""
    path = Path(path)
    n, nf = sum(e.n_tiles for e in entries), len(entries)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    t = (1, size, size)
    root.create_array("targets", shape=(n, size, size, 3), dtype="float32", chunks=t + (3,), fill_value=0)
    root.create_array("labels", shape=(n, size, size, 2), dtype="uint8", chunks=t + (2,), fill_value=0)
    root.create_array("probabilities", shape=(n, size, size, 2), dtype="float16", chunks=t + (2,), fill_value=0)
    tile_field = np.concatenate([np.full(e.n_tiles, e.index, np.int32) for e in entries]) if n else np.zeros(0, np.int32)
    root.create_array("tile_field", data=tile_field, chunks=(max(n, 1),))
    rc = [TileGrid(e.scaled_shape, size, config["tiling"]["margin"]).indices for e in entries]
    root.create_array("tile_rc", data=np.concatenate(rc).astype(np.int32) if n else np.zeros((0, 2), np.int32),
                      chunks=(max(n, 1), 2))
    root.create_array("field_done", shape=(nf,), dtype="uint8", chunks=(1,), fill_value=0)
    root.create_array("field_status", shape=(nf,), dtype="uint8", chunks=(1,), fill_value=0)
    root.create_array("field_qc", shape=(nf, len(QC_COLUMNS)), dtype="float32", chunks=(1, len(QC_COLUMNS)),
                      fill_value=np.nan)
    root.attrs.update({
        "hpc_retrain": {"version": __version__, "kind": "training-store"},
        "config": config,
        "fields": [{"well": e.well, "field": e.field, "source": e.source, "shape": list(e.shape),
                    "scaled_shape": list(e.scaled_shape), "first_tile": e.first_tile, "n_tiles": e.n_tiles}
                   for e in entries],
        "label_channels": list(LABEL_CHANNELS),
        "qc_columns": list(QC_COLUMNS),
        "tile_size": size,
    })
    return root


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode=mode)
    except Exception as e:
        raise StoreError(f"{path}: not a readable Zarr store ({type(e).__name__}: {e})") from None
    if root.attrs.get("hpc_retrain", {}).get("kind") != "training-store":
        raise StoreError(f"{path}: not an hpc-retrain training store (build one with `hpc-retrain prepare`)")
    return root


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
