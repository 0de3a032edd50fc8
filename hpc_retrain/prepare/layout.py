"""What a training store holds: its arrays' names, dimensions and attributes, status codes and field table.

Layout (N tiles from F fields; every field's tiles are a contiguous block fixed when the store is created):

    targets        (N, S, S, 3) float32   shape-index features of brightfield
    labels         (N, S, S, 2) uint8     body, contour (0/1) from MISIC on fluorescence
    probabilities  (N, S, S, 2) float16   MISIC's probabilities the labels were cut from
    tile_field     (N,)  int32            index of the tile's field in attrs["fields"]
    tile_rc        (N, 2) int32           tile row/column in its field's grid
    field_done     (F,)  uint8            1 once a field's tiles AND its QC are fully written
    field_qc       (F, K) float32         per-field label statistics (columns: attrs["qc_columns"])
    field_status   (F,)  uint8            0 pending, 1 ok, 2 flagged (attrs["fields"][i]["error"] says why)

and, per ``prepare`` stage (``labels``, ``targets``; ``store.ensure_stage_arrays``), ``<stage>_done`` (F,) uint8,
``<stage>_error`` (F,) str and ``<stage>_written`` (F,) float64 (seconds since the epoch).

Every array carries Zarr v3 ``dimension_names`` and the attributes of :func:`array_layout`. Reading, creating
and checking stores is :mod:`hpc_retrain.prepare.store`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_retrain.imaging.tiling import TileGrid

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
    from hpc_retrain.imaging.preprocess import rescaled_shape

    out, offset = [], 0
    for i, f in enumerate(fields):
        scaled = rescaled_shape(f.shape, scale)
        n = len(TileGrid(scaled, size, margin))
        out.append(FieldEntry(i, f.well, f.field, f.source, tuple(f.shape), scaled, offset, n))
        offset += n
    return out


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
