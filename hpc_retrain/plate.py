"""Plate input: a folder of TIFFs or an OME-Zarr HCS plate, both as fields of lazy per-channel arrays.

Listing reads only headers (TIFF) or metadata (Zarr), so plates of thousands of fields list in seconds;
pixels are read when a Dask task needs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile

from hpc_retrain import ngff
from hpc_retrain.config import PlateConfig


class PlateError(ValueError):
    """A plate that cannot be read as asked; the message names the file or field."""


@dataclass(frozen=True)
class Field:
    well: str
    field: str
    channels: dict[str, da.Array] = dc_field(repr=False)
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.well}/{self.field}"

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.channels.values())).shape

    def channel(self, name: str) -> da.Array:
        try:
            return self.channels[name]
        except KeyError:
            raise PlateError(
                f"{self.source}: field {self.key} has no channel {name!r} (has {sorted(self.channels)}); "
                f"set plate.brightfield / plate.fluorescence to the names your plate uses"
            ) from None


@dataclass(frozen=True)
class Plate:
    path: Path
    layout: str
    fields: list[Field]

    @property
    def channel_names(self) -> list[str]:
        names: set[str] = set()
        for f in self.fields:
            names.update(f.channels)
        return sorted(names)

    def require(self, *channels: str) -> None:
        """Fail before any work if a field lacks a channel the run needs."""
        for f in self.fields:
            for c in channels:
                f.channel(c)

    def __len__(self) -> int:
        return len(self.fields)


def open_plate(cfg: PlateConfig, path: str | Path | None = None) -> Plate:
    path = Path(path or cfg.path or "")
    if not str(path) or not path.exists():
        raise PlateError(f"{path}: plate not found")
    layout = cfg.layout
    if layout == "auto":
        layout = "ome-zarr" if (path / "zarr.json").exists() or (path / ".zattrs").exists() else "tiff"
    plate = _open_zarr(path) if layout == "ome-zarr" else _open_tiffs(path, cfg.pattern)
    if not plate.fields:
        raise PlateError(f"{path}: no fields found")
    return plate


# ---------------------------------------------------------------------------------------------- TIFF
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{well\}|\{field\}|\{channel\})", pattern)
    rx = []
    for p in parts:
        if p == "{well}":
            rx.append(r"(?P<well>[A-Za-z]+\d+)")
        elif p == "{field}":
            rx.append(r"(?P<field>\d+)")
        elif p == "{channel}":
            rx.append(r"(?P<channel>[^/]+?)")
        else:
            rx.append(re.escape(p))
    return re.compile("^" + "".join(rx) + "$")


def parse_name(pattern: str, name: str) -> dict[str, str] | None:
    """Well/field/channel named by a file name under ``pattern``, or None if it does not match."""
    m = _pattern_regex(pattern).match(name)
    if not m:
        return None
    d = m.groupdict()
    d.setdefault("well", "A1")
    return d


def _open_tiffs(root: Path, pattern: str) -> Plate:
    found: dict[tuple[str, str], dict[str, Path]] = {}
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))
    for p in flat:
        d = parse_name(pattern, p.name)
        if d:
            found.setdefault((d["well"], d["field"]), {})[d["channel"]] = p
    if not found:
        # The channel-per-folder layout: brightfield/00001.tif, fluorescence/00001.tif, ...
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for p in sorted(sub.glob("*.tif*")):
                m = re.match(r"^(\d+)", p.stem)
                if m:
                    found.setdefault(("A1", m.group(1)), {})[sub.name] = p
    if not found:
        raise PlateError(
            f"{root}: no file matches the pattern {pattern!r} and there are no channel folders "
            f"(channel/NNNNN.tif); set plate.pattern to your file naming"
        )
    fields = [Field(well, fld, {c: _lazy_tiff(p) for c, p in sorted(chans.items())}, str(root / f"{well}_{fld}"))
              for (well, fld), chans in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1])))]
    for f in fields:
        _check_same_shape(f)
    return Plate(root, "tiff", fields)


def _lazy_tiff(path: Path) -> da.Array:
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            shape, dtype = page.shape, page.dtype
    except Exception as e:
        raise PlateError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    if len(shape) == 3 and shape[-1] in (3, 4):
        shape = shape[:2]  # RGB(A) scans: the first channel is read, as MISIC does
    if len(shape) != 2:
        raise PlateError(f"{path}: expected a 2-D image, got shape {shape}")
    return da.from_delayed(dask.delayed(read_tiff)(str(path)), shape=shape, dtype=dtype, name=f"tiff-{path}")


def read_tiff(path: str) -> np.ndarray:
    try:
        im = tifffile.imread(path)
    except Exception as e:
        raise PlateError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    return im[..., 0] if im.ndim == 3 else im


# ---------------------------------------------------------------------------------------------- Zarr
def _open_zarr(root_path: Path) -> Plate:
    try:
        root, entries = ngff.open_hcs(root_path)
    except ValueError as e:
        raise PlateError(str(e)) from None
    fields = []
    for well, idx, gpath in entries:
        grp = root[gpath]
        names = ngff.channel_names(grp)
        arr = grp["0"]
        if arr.ndim != 3 or len(names) != arr.shape[0]:
            raise PlateError(f"{root_path}/{gpath}: image {arr.shape} does not match channels {names}")
        full = da.from_zarr(arr)
        fields.append(Field(well, str(idx), {n: full[i] for i, n in enumerate(names)}, f"{root_path}/{gpath}"))
    return Plate(root_path, "ome-zarr", fields)


def _check_same_shape(f: Field) -> None:
    shapes = {c: a.shape for c, a in f.channels.items()}
    if len(set(shapes.values())) > 1:
        raise PlateError(f"{f.source}: channels of field {f.key} differ in size: {shapes}")
