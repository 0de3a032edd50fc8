"""Small OME-Zarr (NGFF 0.5, Zarr v3) writers and readers for HCS plates and label images.

They mirror ome-zarr-py's layout (plate -> row/column well -> field image -> labels/<name>) so napari and
ome-zarr-py open what we write, without depending on either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr

NGFF_VERSION = "0.5"
_WELL = re.compile(r"^([A-Za-z]+)0*(\d+)$")


def split_well(well: str) -> tuple[str, str]:
    """'B03' -> ('B', '3'); NGFF wells are row/column groups."""
    m = _WELL.match(well)
    if not m:
        raise ValueError(f"well {well!r}: expected a row letter and a column number, e.g. A1 or B03")
    return m.group(1).upper(), str(int(m.group(2)))


def _ome(group: zarr.Group) -> dict[str, Any]:
    return dict(group.attrs.get("ome", {}))


def _set_ome(group: zarr.Group, **entries: Any) -> None:
    ome = _ome(group)
    ome.setdefault("version", NGFF_VERSION)
    ome.update(entries)
    group.attrs["ome"] = ome


def create_plate(path: str | Path, wells: list[str], field_count: int, name: str = "plate") -> zarr.Group:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    rc = [split_well(w) for w in wells]
    rows = sorted({r for r, _ in rc})
    cols = sorted({c for _, c in rc}, key=int)
    _set_ome(
        root,
        plate={
            "name": name,
            "rows": [{"name": r} for r in rows],
            "columns": [{"name": c} for c in cols],
            "wells": [
                {"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": cols.index(c)} for r, c in rc
            ],
            "field_count": field_count,
        },
    )
    for r, c in rc:
        well = root.require_group(f"{r}/{c}")
        _set_ome(well, well={"images": [{"path": str(i)} for i in range(field_count)]})
    return root


def _multiscales(axes: list[dict[str, str]], name: str) -> list[dict[str, Any]]:
    ndim = len(axes)
    return [{
        "name": name,
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * ndim}]}],
    }]


_CYX = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
_YX = _CYX[1:]


def write_field(plate: zarr.Group, well: str, field: int, image, channel_names: list[str],
                chunk: int = 1024) -> zarr.Group:
    """Write one field's (C, Y, X) image (NumPy, or Dask for a scan of any size) with channel labels;
    returns the field's image group."""
    if image.ndim != 3 or image.shape[0] != len(channel_names):
        raise ValueError(f"well {well} field {field}: image {image.shape} does not match channels {channel_names}")
    r, c = split_well(well)
    grp = plate.require_group(f"{r}/{c}/{field}")
    chunks = (1, min(chunk, image.shape[1]), min(chunk, image.shape[2]))
    if isinstance(image, np.ndarray):
        grp.create_array("0", data=image, chunks=chunks, overwrite=True)
    else:  # a Dask array (a scan larger than memory): copied chunk by chunk
        import dask
        import dask.array as da

        arr = grp.create_array("0", shape=image.shape, dtype=image.dtype, chunks=chunks, overwrite=True)
        with dask.config.set(scheduler="threads"):
            da.store(image.rechunk(chunks), arr, lock=False)
    _set_ome(grp, multiscales=_multiscales(_CYX, f"{well}/{field}"),
             omero={"channels": [{"label": n} for n in channel_names]})
    return grp


def create_label(field_group: zarr.Group, name: str, shape: tuple[int, int], dtype: Any,
                 chunk: int = 1024, overwrite: bool = False, **attrs: Any) -> zarr.Array:
    """Create (not fill) ``labels/<name>/0`` so large results can be written chunk by chunk."""
    labels = field_group.require_group("labels")
    names = list(_ome(labels).get("labels", []))
    if name not in names:
        names.append(name)
    _set_ome(labels, labels=names)
    grp = labels.require_group(name)
    arr = grp.create_array("0", shape=shape, dtype=dtype, chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
                           fill_value=0, overwrite=overwrite)
    _set_ome(grp, multiscales=_multiscales(_YX, name), **{"image-label": {"source": {"image": "../../"}}})
    if attrs:
        grp.attrs.update(attrs)
    return arr


# hpc_retrain's own attributes on a label image (and its probabilities): the provenance of the result and
# whether it was finished. ``segment`` sets {"complete": false} before it changes any array of the result and
# replaces it with the provenance, the cell count and "complete": true as its very last write.
PROVENANCE = "hpc_retrain"


def is_complete(group: zarr.Group) -> bool:
    """False for a result hpc_retrain started and did not finish (a killed ``segment``): ``complete`` is false,
    or, as written before that marker existed, provenance without the ``cells`` count. Label images that
    other tools wrote (no such attributes) count as complete."""
    prov = group.attrs.get(PROVENANCE)
    if not isinstance(prov, dict):
        return True
    if "complete" in prov:
        return prov["complete"] is True
    return "cells" in prov


def write_labels(field_group: zarr.Group, name: str, labels: np.ndarray, **attrs: Any) -> zarr.Array:
    arr = create_label(field_group, name, labels.shape, labels.dtype, overwrite=True, **attrs)
    arr[...] = labels
    return arr


def plate_fields(root: zarr.Group) -> list[tuple[str, int, str]]:
    """(well name, field index, group path) for every field an HCS plate lists."""
    meta = _ome(root).get("plate") or root.attrs.get("plate")
    if not meta:
        raise ValueError(f"{root.store}: not an OME-Zarr HCS plate (no 'plate' metadata)")
    out = []
    for w in meta["wells"]:
        row, col = w["path"].split("/")
        well_meta = _ome(root[w["path"]]).get("well") or root[w["path"]].attrs.get("well", {})
        for i, img in enumerate(well_meta.get("images", [])):
            out.append((f"{row}{col}", i, f"{w['path']}/{img['path']}"))
    return out


def open_hcs(path, mode: str = "r") -> tuple[zarr.Group, list[tuple[str, int, str]]]:
    """Open an HCS plate and list its fields; a ValueError naming ``path`` if it is not one."""
    try:
        root = zarr.open_group(str(path), mode=mode)
        return root, plate_fields(root)
    except Exception as e:
        raise ValueError(f"{path}: not a readable OME-Zarr HCS plate ({e})") from None


def channel_names(field_group: zarr.Group) -> list[str]:
    omero = _ome(field_group).get("omero") or field_group.attrs.get("omero") or {}
    return [c.get("label", str(i)) for i, c in enumerate(omero.get("channels", []))]
