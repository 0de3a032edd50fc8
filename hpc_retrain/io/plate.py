"""Plate input: a folder of TIFFs or an OME-Zarr HCS plate, both as fields of lazy per-channel arrays.

Listing reads only headers (TIFF) or metadata (Zarr), so plates of thousands of fields list in seconds;
pixels are read when a Dask task needs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile

from hpc_retrain.config import PlateConfig
from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.io import ngff


class PlateError(HpcRetrainError, ValueError):
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
TIFF_SUFFIXES = (".tif", ".tiff")


def _is_tiff(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in TIFF_SUFFIXES  # 00001.TIF as well as 00001.tif


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # The pattern's extension matches in any case: "{...}.tif" also finds A1_s1_bf.TIF (not .tiff, though).
    ext = re.search(r"\.tiff?$", pattern, re.IGNORECASE)
    if ext:
        pattern = pattern[:ext.start()]
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
    if ext:
        rx.append(f"(?i:{re.escape(ext.group())})")
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
    flat = sorted(p for p in root.iterdir() if _is_tiff(p))
    for p in flat:
        d = parse_name(pattern, p.name)
        if d:
            found.setdefault((d["well"], d["field"]), {})[d["channel"]] = p
    if not found:
        # The channel-per-folder layout: brightfield/00001.tif, fluorescence/00001.tif, ...
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for p in sorted(q for q in sub.iterdir() if _is_tiff(q)):
                m = re.match(r"^(\d+)", p.stem)
                if m:
                    found.setdefault(("A1", m.group(1)), {})[sub.name] = p
    if not found:
        raise PlateError(_nothing_found(root, pattern))
    _one_spelling_per_well(found)
    fields = []
    for (well, fld), chans in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        f = Field(well, fld, {c: _lazy_tiff(p) for c, p in sorted(chans.items())}, str(root / f"{well}_{fld}"))
        _check_same_shape(f, chans)
        fields.append(f)
    return Plate(root, "tiff", fields)


def _one_spelling_per_well(found: dict[tuple[str, str], dict[str, Path]]) -> None:
    """Refuse two spellings of one well (A1 and a1, A1 and A01): an HCS plate has one group per well, so
    their fields would overwrite each other. Also a well name that is not a row letter and a column number."""
    spelled: dict[tuple[str, str], tuple[str, Path]] = {}
    for (well, _), chans in sorted(found.items()):
        example = next(iter(chans.values()))
        try:
            rc = ngff.split_well(well)
        except ValueError as e:
            raise PlateError(f"{example}: {e}") from None
        first = spelled.setdefault(rc, (well, example))
        if first[0] != well:
            raise PlateError(f"{first[1]} and {example} name the same well {rc[0]}{rc[1]} ({first[0]!r} and "
                             f"{well!r}); rename the files so each well is spelled one way")


def _nothing_found(root: Path, pattern: str, sample: int = 5) -> str:
    """One line: what the folder holds and the two layouts that are expected."""

    def names(items: list[str]) -> str:
        more = f", ... ({len(items)} in all)" if len(items) > sample else ""
        return ", ".join(items[:sample]) + more

    entries = sorted(root.iterdir())
    dirs, files = [p for p in entries if p.is_dir()], [p.name for p in entries if p.is_file()]
    parts = []
    for d in dirs[:sample]:
        inner = sorted(q.name for q in d.iterdir() if q.is_file())
        parts.append(f"{d.name}/ ({names(inner) if inner else 'no files'})")
    found = []
    if dirs:
        found.append(f"folders {'; '.join(parts)}" + (f"; ... ({len(dirs)} in all)" if len(dirs) > sample else ""))
    if files:
        found.append(f"files {names(files)}")
    example = pattern.replace("{well}", "A1").replace("{field}", "1").replace("{channel}", "brightfield")
    return (f"{root}: no fields found: no file matches the pattern {pattern!r} (plate.pattern, e.g. {example}) "
            f"and no folder holds numbered TIFFs of one channel (brightfield/1.tif or brightfield/00001.tif; "
            f".tif/.tiff in any case); found {' and '.join(found) if found else 'nothing'}; set plate.pattern to "
            f"your file naming")


_ONE_PLANE = ("this tool takes single-plane 2-D images: save a max projection (e.g. Fiji: Image > Stacks > "
              "Z Project..., Max Intensity) or choose one plane, one file per plane")


def _plane_index(path, shape: tuple, axes: str, images: int = 1) -> tuple:
    """The index that takes the one 2-D plane out of a TIFF series of ``shape``/``axes``, or PlateError.

    Axes of length 1 are dropped; RGB(A) samples give their first channel (as MISIC reads them). Anything
    else (a z-stack, a time series, several channels as planes, pages of separate images) is refused:
    reading one page of it silently would segment the wrong image.
    """
    shape, axes = tuple(shape), str(axes)
    index, kept = [], []
    for a, n in zip(axes, shape):
        if n == 1:
            index.append(0)
        elif a == "S" and n in (3, 4):
            index.append(0)  # RGB(A): the first channel
        else:
            index.append(slice(None))
            kept.append((a, n))
    if len(kept) == 2 and images == 1:
        return tuple(index)
    if len(kept) < 2 and images == 1 and len(shape) >= 2:
        # A tiny 2-D image (1 x 1, 1 x N): read as such; the stages skip it as too small, naming the file
        yx = [i for i, a in enumerate(axes) if a in "YX"]
        yx = yx if len(yx) == 2 else [len(shape) - 2, len(shape) - 1]
        if all(n == 1 or i in yx for i, n in enumerate(shape)):
            return tuple(slice(None) if i in yx else 0 for i in range(len(shape)))
    if len(kept) > 2:
        planar = [n for a, n in kept if a not in "YX"] if {"Y", "X"} <= {a for a, _ in kept} else \
            [n for _, n in kept[:-2]]
        what = f"a stack of {int(np.prod(planar))} planes (shape {shape}, axes {axes})"
    elif images > 1:
        what = f"{images} images (pages) in one file"
    else:
        what = f"not a 2-D image (shape {shape}, axes {axes})"
    raise PlateError(f"{path}: {what}; {_ONE_PLANE}")


def _lazy_tiff(path: Path) -> da.Array:
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape, dtype, axes = tuple(series.shape), series.dtype, series.axes
            own = len(series.pages)  # the planes of a stack are pages of its first series
            # pages outside it are further images, reduced-resolution previews (thumbnails) aside
            others = 0 if len(tf.pages) <= own else \
                sum(1 for p in list(tf.pages)[own:] if not getattr(p, "is_reduced", False))
    except Exception as e:
        raise PlateError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    if len(shape) != len(axes):
        raise PlateError(f"{path}: unreadable TIFF (shape {shape} does not match axes {axes})")
    index = _plane_index(path, shape, axes, 1 + others)
    shape2d = tuple(n for n, i in zip(shape, index) if isinstance(i, slice))
    return da.from_delayed(dask.delayed(read_tiff)(str(path), shape2d), shape=shape2d, dtype=dtype,
                           name=f"tiff-{path}")


def read_tiff(path: str, expected: tuple[int, int] | None = None) -> np.ndarray:
    """The one 2-D plane of a TIFF (the first channel of RGB); a stack is refused, naming the file."""
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            im, axes = series.asarray(), series.axes
    except Exception as e:
        raise PlateError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    im = im[_plane_index(path, im.shape, axes)]
    if expected is not None and tuple(im.shape) != tuple(expected):
        raise PlateError(f"{path}: the image is {im.shape}, its header said {tuple(expected)}; was it "
                         f"replaced while the plate was open?")
    return im


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
        try:
            arr = grp["0"]
        except KeyError:
            raise PlateError(f"{root_path}/{gpath}: the field image has no array '0' (its full-resolution level); "
                             f"the plate is incomplete: rewrite that field, or remove it from well "
                             f"{gpath.rsplit('/', 1)[0]}'s list") from None
        if arr.ndim != 3 or len(names) != arr.shape[0]:
            raise PlateError(f"{root_path}/{gpath}: image {arr.shape} does not match channels {names}")
        full = da.from_zarr(arr)
        fields.append(Field(well, str(idx), {n: full[i] for i, n in enumerate(names)}, f"{root_path}/{gpath}"))
    return Plate(root_path, "ome-zarr", fields)


def _check_same_shape(f: Field, files: dict[str, Path] | None = None) -> None:
    shapes = {c: a.shape for c, a in f.channels.items()}
    if len(set(shapes.values())) > 1:
        if files:
            detail = ", ".join(f"{c} {files[c]} is {shapes[c]}" for c in sorted(shapes))
            raise PlateError(f"{f.source}: channels of field {f.key} differ in size: {detail}")
        raise PlateError(f"{f.source}: channels of field {f.key} differ in size: {shapes}")
