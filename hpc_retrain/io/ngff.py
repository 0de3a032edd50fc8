"""Small OME-Zarr (NGFF 0.5, Zarr v3) writers and readers for HCS plates and label images.

They mirror ome-zarr-py's layout (plate -> row/column well -> field image -> labels/<name>) so napari and
ome-zarr-py open what we write, without depending on either. Every group written validates with the NGFF
validator ome-zarr-models (tests/integration/test_ngff_valid.py): arrays carry ``dimension_names`` equal to
their axes' names, and a result drawn on a field's pixel grid (label images, probabilities) copies the
field image's y/x axes (units included) and its scale and translation, so it overlays its image.
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
            "version": NGFF_VERSION,
        },
    )
    for r, c in rc:
        well = root.require_group(f"{r}/{c}")
        _set_ome(well, well={"images": [{"path": str(i)} for i in range(field_count)]})
    return root


_C = [{"name": "c", "type": "channel"}]
_YX = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
_CYX = _C + _YX


def pixel_grid(scale: tuple[float, float] = (1.0, 1.0), unit: str | None = None,
               translation: tuple[float, float] | None = None) -> dict[str, Any]:
    """A field's y/x axes and level-0 scale and translation, as :func:`spatial` returns and
    :func:`write_field` takes: e.g. ``pixel_grid((0.065, 0.065), "micrometer")``."""
    axes = [dict(a, unit=unit) if unit else dict(a) for a in _YX]
    return {"axes": axes, "scale": [float(v) for v in scale],
            "translation": [float(v) for v in translation] if translation else None}


def spatial(image_group: zarr.Group) -> dict[str, Any]:
    """The y/x pixel grid of an image group's first multiscale at full resolution: its last two axes (as
    written, units included) and the scale and translation of its first dataset composed with the
    multiscale's own, for those axes. A result of the same pixel grid written with it overlays the image."""
    ms = (_ome(image_group).get("multiscales") or image_group.attrs.get("multiscales") or [None])[0]
    if not ms or len(ms.get("axes", [])) < 2 or not ms.get("datasets"):
        return pixel_grid()
    ndim = len(ms["axes"])
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for t in [*ms["datasets"][0].get("coordinateTransformations", []), *(ms.get("coordinateTransformations") or [])]:
        if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            scale = [a * b for a, b in zip(scale, t["scale"])]
            shift = [a * b for a, b in zip(shift, t["scale"])]
        elif t.get("type") == "translation" and len(t.get("translation", [])) == ndim:
            shift = [a + b for a, b in zip(shift, t["translation"])]
    return {"axes": [dict(a) for a in ms["axes"][-2:]], "scale": [float(v) for v in scale[-2:]],
            "translation": [float(v) for v in shift[-2:]] if any(shift[-2:]) else None}


def _multiscales(grid: dict[str, Any], name: str, channels: bool) -> list[dict[str, Any]]:
    """One single-level multiscale of (c,) y, x on ``grid`` (:func:`spatial`), its array at path ``0``."""
    lead = _C if channels else []
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0] * len(lead) + grid["scale"]}]
    if grid.get("translation"):
        transforms.append({"type": "translation", "translation": [0.0] * len(lead) + grid["translation"]})
    return [{"name": name, "axes": lead + grid["axes"],
             "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]


def _names(multiscales: list[dict[str, Any]]) -> list[str]:
    return [a["name"] for a in multiscales[0]["axes"]]


def create_image(group: zarr.Group, grid: dict[str, Any], name: str, shape: tuple[int, ...], dtype: Any,
                 chunks: tuple[int, ...], overwrite: bool = False, **ome: Any) -> zarr.Array:
    """Make ``group`` an NGFF image of one (c, y, x) or (y, x) array ``0`` on pixel grid ``grid``, with
    ``ome`` entries (``omero``, ``image-label``) beside its multiscales; the array is created, not filled."""
    ms = _multiscales(grid, name, channels=len(shape) == 3)
    arr = group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0, overwrite=overwrite,
                             dimension_names=_names(ms))
    _set_ome(group, multiscales=ms, **ome)
    return arr


def write_field(plate: zarr.Group, well: str, field: int, image, channel_names: list[str],
                chunk: int = 1024, grid: dict[str, Any] | None = None) -> zarr.Group:
    """Write one field's (C, Y, X) image (NumPy, or Dask for a scan of any size) with channel labels on pixel
    grid ``grid`` (:func:`pixel_grid`, :func:`spatial`; default unit pixels); returns the field's image group."""
    if image.ndim != 3 or image.shape[0] != len(channel_names):
        raise ValueError(f"well {well} field {field}: image {image.shape} does not match channels {channel_names}")
    r, c = split_well(well)
    grp = plate.require_group(f"{r}/{c}/{field}")
    chunks = (1, min(chunk, image.shape[1]), min(chunk, image.shape[2]))
    arr = create_image(grp, grid or pixel_grid(), f"{well}/{field}", image.shape, image.dtype, chunks,
                       overwrite=True, omero={"channels": [{"label": n} for n in channel_names]})
    if isinstance(image, np.ndarray):
        arr[...] = image
    else:  # a Dask array (a scan larger than memory): copied chunk by chunk
        import dask
        import dask.array as da

        with dask.config.set(scheduler="threads"):
            da.store(image.rechunk(chunks), arr, lock=False)
    return grp


def create_label(field_group: zarr.Group, name: str, shape: tuple[int, int], dtype: Any,
                 chunk: int = 1024, overwrite: bool = False, **attrs: Any) -> zarr.Array:
    """Create (not fill) ``labels/<name>/0`` so large results can be written chunk by chunk; on the field
    image's pixel grid (:func:`spatial`)."""
    grid = spatial(field_group)
    labels = field_group.require_group("labels")
    names = list(_ome(labels).get("labels", []))
    if name not in names:
        names.append(name)
    _set_ome(labels, labels=names)
    grp = labels.require_group(name)
    arr = create_image(grp, grid, name, tuple(shape), dtype, (min(chunk, shape[0]), min(chunk, shape[1])),
                       overwrite=overwrite, **{"image-label": {"source": {"image": "../../"}, "colors": _CLEAR_BACKGROUND}})
    if attrs:
        grp.attrs.update(attrs)
    return arr


# Background (0) transparent, so a viewer overlays the cells on their image; other values keep its colours.
_CLEAR_BACKGROUND = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]


def list_result(container: zarr.Group, name: str) -> None:
    """Add ``name`` to ``container``'s ``images`` attribute: the NGFF images it holds (as ``labels/`` lists
    its label images), e.g. ``<field>/probabilities``."""
    names = list(container.attrs.get("images", []))
    if name not in names:
        container.attrs["images"] = names + [name]


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
        parts = str(w.get("path", "")).split("/")
        if len(parts) != 2 or not all(_plain_name(p) for p in parts):
            raise ValueError(f"the plate lists well path {w.get('path')!r}; a well path is 'row/column' (e.g. A/1)")
        row, col = parts
        if w["path"] not in root:
            raise ValueError(f"the plate lists well {w['path']} but it is not there; fix the plate's metadata")
        well_meta = _ome(root[w["path"]]).get("well") or root[w["path"]].attrs.get("well", {})
        for i, img in enumerate(well_meta.get("images", [])):
            if not _plain_name(str(img.get("path", ""))):
                raise ValueError(f"well {w['path']} lists image path {img.get('path')!r}; an image path is one name "
                                 f"inside its well (e.g. 0), without '/', '.' or '..'")
            gpath = f"{w['path']}/{img['path']}"
            if gpath not in root:
                raise ValueError(f"well {w['path']} lists field {gpath} but it is not there; fix the plate's metadata")
            out.append((f"{row}{col}", i, gpath))
    return out


def _plain_name(name: str) -> bool:
    """One path element that stays where it is: not empty, no '/', not '.' or '..'."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


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
