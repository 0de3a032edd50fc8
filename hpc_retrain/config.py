"""One typed configuration for a run: validated up front, saved next to every output.

A run is reproducible from the ``config.yaml`` written beside its results: every stage reads only
this object, never ad-hoc arguments.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpc_retrain.errors import HpcRetrainError

CONFIG_NAME = "config.yaml"
CHANNELS = ("brightfield", "fluorescence")  # the two images of every field
# Sections of a store's own config that a run (and the model it exports) carries: a model is only meaningful
# with the preprocessing, labels and tiling its training tiles were made with.
STORE_SECTIONS = ("preprocess", "labels", "tiling")
MODES = ("stitch", "blend")
MODALITIES = ("brightfield", "phase")  # how a synthetic plate draws its transmitted-light channel  # how tiles are put back together: MISIC crop-and-stitch, or blended overlaps
_PROVENANCE = ("hpc_retrain_version", "written")  # written beside the settings, not settings themselves
# Settings that moved section: configs written before still load, each old key read as its new one (once
# logged). compute.* are shared by every stage that runs the model; they lived under infer in 0.1.
MOVED = {"infer.batch_size": "compute.batch_size", "infer.chunk": "compute.chunk", "infer.engine": "compute.engine"}
# Other names for a setting, read as it without a warning: the transmitted-light channel is "brightfield"
# in the config (and in every store and run written), but a lab imaging phase contrast may say so
# (``plate.phase: PH``, ``--set plate.phase=PH``); its preprocessing is the same (dark cells on a light
# background). Saved configs write the setting's own name.
ALIASES = {"plate.phase": "plate.brightfield", "plate.transmitted": "plate.brightfield",
           "preprocess.phase": "preprocess.brightfield", "preprocess.transmitted": "preprocess.brightfield"}

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()


class ConfigError(HpcRetrainError, ValueError):
    """A configuration that cannot run; the message names the field and the problem."""


class _Section(BaseModel):
    # Unknown keys are typos in a YAML file: refuse them rather than silently ignore them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _section_aliases(section: str, data: Any) -> Any:
    """A section's settings with each ``ALIASES`` name of this section read as its setting; an alias and
    its setting given different values is an error."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for alias, name in ALIASES.items():
        (asec, akey), (_, nkey) = alias.split("."), name.split(".")
        if asec != section or akey not in data:
            continue
        value = data.pop(akey)
        if nkey in data and data[nkey] != value:
            raise ValueError(f"{alias}={value!r} and {name}={data[nkey]!r} disagree; {alias} is another name "
                             f"for {name}: give one of them")
        data[nkey] = value
    return data


class PlateConfig(_Section):
    path: Path | None = Field(None, description="TIFF folder or OME-Zarr HCS plate; none for a synthetic plate")
    layout: Literal["auto", "tiff", "ome-zarr"] = "auto"
    pattern: str = Field(
        "{well}_s{field}_{channel}.tif",
        description="TIFF file name pattern; placeholders {well}, {field}, {channel}. "
        "The layout channel/NNNNN.tif is found without a pattern.",
    )
    brightfield: str = Field("brightfield", description="channel name of the transmitted-light images: "
                             "brightfield or phase contrast (plate.phase and plate.transmitted are other names "
                             "for this setting)")
    fluorescence: str = Field("fluorescence", description="channel name of the fluorescence images")
    reference: str | None = Field(None, description="channel holding reference instance masks, if any")

    @field_validator("path")
    @classmethod
    def _utf8(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                str(v).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{str(v).encode('utf-8', 'backslashreplace').decode()}: the path is not valid "
                                 f"UTF-8 (it is recorded in configs and Zarr attributes, which are UTF-8); rename "
                                 f"the folder") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        # PlateConfig(phase="PH") in Python, as plate.phase in a file (RunConfig reads files through _migrated)
        return _section_aliases("plate", data)

    @field_validator("pattern")
    @classmethod
    def _pattern_names_channel(cls, v: str) -> str:
        if "{channel}" not in v or "{field}" not in v:
            raise ValueError("the pattern must contain {channel} and {field} (and may contain {well})")
        twice = [p for p in ("{well}", "{field}", "{channel}") if v.count(p) > 1]
        if twice:
            raise ValueError(f"{', '.join(twice)} appear(s) more than once in {v!r}; each placeholder may appear "
                             f"once")
        return v


class ChannelPrep(_Section):
    gamma: float = Field(1.0, gt=0)
    light_background: bool = Field(False, description="dark cells on a bright background (flips shape index)")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="robust normalization range")

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError("need 0 <= low < high <= 100")
        return v


# Bounds of preprocess.mean_width (px): MISIC sees cells 10 px wide, images are scaled by 10 / mean_width.
MIN_WIDTH, MAX_WIDTH = 2.0, 200.0


class PreprocessConfig(_Section):
    mean_width: float | Literal["auto"] = Field(
        "auto", description="mean cell width in pixels (images are scaled by 10/mean_width), or auto: measured "
        "from the plate (hpc_retrain.prepare.width) before any stage scales an image, and saved as the number")
    sigmas: tuple[float, ...] = Field((1.0, 1.5, 2.0), description="shape index scales")
    brightfield: ChannelPrep = ChannelPrep(gamma=0.41, light_background=True)
    fluorescence: ChannelPrep = ChannelPrep(gamma=1.0, light_background=False)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        data = _section_aliases("preprocess", data)
        # A channel given in part (--set preprocess.brightfield.gamma=0.5 over no file) keeps this section's
        # defaults for the rest: built from ChannelPrep's own defaults instead, brightfield would silently
        # lose light_background (dark cells on a light background) and gamma 0.41.
        if isinstance(data, dict):
            for ch in ("brightfield", "fluorescence"):
                if isinstance(data.get(ch), dict):
                    data[ch] = {**cls.model_fields[ch].default.model_dump(), **data[ch]}
        return data

    @field_validator("sigmas")
    @classmethod
    def _three_positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != 3 or any(s <= 0 for s in v):
            raise ValueError("MISIC takes exactly three positive shape-index scales")
        return v

    @field_validator("mean_width", mode="before")
    @classmethod
    def _width_or_auto(cls, v: Any) -> float | str:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            w = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a cell width in pixels or 'auto', got {v!r}") from None
        if not w > 0 or w == float("inf"):  # also refuses NaN
            raise ValueError(f"must be a positive width in pixels or 'auto', got {v!r}")
        if not MIN_WIDTH <= w <= MAX_WIDTH:
            raise ValueError(f"{v!r} px is outside {MIN_WIDTH:g}-{MAX_WIDTH:g} px: images are scaled by "
                             f"10/mean_width, so a width below {MIN_WIDTH:g} px would enlarge them more than "
                             f"{10 / MIN_WIDTH:g}-fold (memory) and one above {MAX_WIDTH:g} px shrink them more than "
                             f"{MAX_WIDTH / 10:g}-fold (cells vanish); give the cells' width in pixels")
        return w

    @property
    def width(self) -> float:
        """The mean width as a number; "auto" must have been measured (``width.resolve_mean_width``) first."""
        if self.mean_width == "auto":
            raise ConfigError("preprocess.mean_width is 'auto' and was not measured yet: measure it first "
                              "(hpc_retrain.prepare.width.resolve_mean_width) or give a number: --mean-width PX "
                              "(prepare) or --set preprocess.mean_width=PX")
        return float(self.mean_width)

    @property
    def scale(self) -> float:
        # MISIC rounds the scale to two decimals; keeping that makes our features comparable with its.
        return round(10.0 / self.width, 2)


class LabelConfig(_Section):
    body_threshold: float = Field(0.4, ge=0, le=1, description="cell body label: probability >= this")
    contour_threshold: float = Field(0.1, ge=0, le=1, description="contour label: probability > this")
    # Pretrained MISIC on fluorescence also outlines blobs of background noise (no cell under them, in any
    # channel): on ColiCoords their median intensity is 0.6-4.5 robust noise s.d. above background, the cells
    # that ilastik's masks confirm 5.3 and up. Such objects, and specks, are taken out of the labels (labels.clean).
    min_snr: float | None = Field(4.0, ge=0, description="a labelled cell's median fluorescence must exceed "
                                  "the background by this many robust noise s.d. (none: keep every object)")
    # Whether pretrained MISIC sees a fluorescent cell depends on the width it is told: on ColiCoords it misses
    # a third of the hand-annotated cells at the measured width, and finds most of them told 0.7-0.85 of it
    # (and misses others there). Each factor is one more MISIC pass; their probabilities are joined by maximum.
    width_factors: tuple[float, ...] = Field(
        (0.7, 0.85, 1.0), description="segment the fluorescence as if the mean width were each of these "
        "multiples of it and keep each pixel's highest body and contour probability; (1.0,): MISIC's single pass")

    @field_validator("width_factors")
    @classmethod
    def _with_one(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if 1.0 not in v or any(f <= 0 for f in v):
            raise ValueError("need positive factors, 1.0 among them (the labels' own grid)")
        return tuple(sorted(set(v)))


class TilingConfig(_Section):
    size: int = Field(256, ge=32, description="tile edge in pixels (the model's input)")
    margin: int = Field(16, ge=0, description="pixels dropped at each tile edge when stitching")

    @model_validator(mode="after")
    def _margin_fits(self) -> TilingConfig:
        if self.size % 8:
            raise ValueError(f"size {self.size}: MISIC's U-Net halves a tile three times, so its edge must be a "
                             f"multiple of 8 (e.g. 256)")
        if 2 * self.margin >= self.size:
            raise ValueError(f"margin {self.margin} leaves nothing of a {self.size} px tile")
        return self


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    # None: chosen from the store (training.recipe: 1e-4 on sparse fields, 2e-3 on dense colonies); the best
    # epoch by validation F1 is exported anyway, epoch 0 (the starting model) included.
    learning_rate: float | None = Field(None, gt=0, description="Adam's learning rate; default: chosen from the "
                                        "store's cell density (1e-4 sparse, 2e-3 dense; training.recipe)")
    init: Literal["pretrained", "reinit", "finetune-decoder"] = "pretrained"
    base_model: Path | None = Field(None, description="a Keras .h5/.keras MISIC-style model; default: misic's own")
    # 0.3, not 0.2: validation steers early stopping and calibration, and a lab's few fields give it few cells
    # (ColiCoords folds: 7 usable fields, 2 for validation instead of 1; held-out gain +0.060 vs +0.050).
    val_fraction: float = Field(0.3, ge=0, lt=1, description="fraction of fields held out for validation")
    pos_weight: tuple[float, ...] | None = Field(None, description="positive-class weight per label channel; "
                                                 "default: chosen from the store ((1-p)/p on sparse fields, "
                                                 "none on dense colonies; training.recipe)")
    augment: bool = True
    steps_per_epoch: int | None = Field(None, ge=1, description="cap batches per epoch (for quick runs)")
    # A lab's few fields make few tiles (ColiCoords: 6 fields, 24 tiles, 3 batches an epoch): an epoch then
    # goes round them again, each time in a new order with new flips and turns, up to this many tiles.
    # ColiCoords cross-validation: 64 took held-out F1 from +0.013 to +0.050 over pretrained and ilastik
    # recall from 0.25 to 0.63 (benchmarks/RESULTS.md, section 5).
    tiles_per_epoch: int | None = Field(64, ge=1, description="at least this many tiles an epoch (tiles repeat, "
                                        "augmented anew); none: each tile once")
    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: mixed_float16 on a GPU, float32 on a CPU; on: mixed_float16 on a GPU, "
        "mixed_bfloat16 on a CPU (1.48x faster where the CPU has AVX512_BF16 or AMX, emulated and slow "
        "elsewhere); off: float32")
    keep_checkpoints: int = Field(3, ge=1)
    deterministic: bool = Field(False, description="TensorFlow op determinism (slower; for exact resumes)")
    patience: int | None = Field(5, ge=1, description="stop after this many epochs without a better epoch "
                                 "(history.replaces_best: validation F1, then IoU; none: run every epoch)")
    # Fine-tuning first costs instance F1 while the masks grow to the labels' size, then gains: on ColiCoords the
    # folds stopped at epoch 5 exported epoch 0, those that ran on peaked at epochs 16-19.
    min_epochs: int = Field(10, ge=0, description="never stop early before this epoch")
    calibrate: bool = Field(True, description="fit the post-processing thresholds on the validation fields")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare on/off (in a config file or `--set train.mixed_precision=on`) as true/false.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class ClusterConfig(_Section):
    executor: Literal["local", "slurm"] = "local"
    workers: int = Field(1, ge=1, description="local Dask workers for labels/targets")
    scheduler_address: str | None = Field(None, description="an existing Dask scheduler, e.g. tcp://host:8786")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(60, ge=1)
    gpus: int = Field(1, ge=0, description="GPUs per training job; 0 on clusters without a GPU gres")
    cpus: int = Field(4, ge=1)
    mem_gb: float = Field(16, gt=0)
    container: str | None = Field(None, description="Apptainer image; jobs run inside it with --nv")


class ComputeConfig(_Section):
    """How the model and the large-image machinery run, shared by every stage that runs them (labels and
    targets in prepare, validation in train, segment); none of it changes a result beyond float rounding."""

    batch_size: int = Field(8, ge=1, description="tiles per model call when predicting (labels, validation, "
                            "segment) on a GPU or OpenVINO; TensorFlow on a CPU takes one tile per call, as fast "
                            "and ~80 MB less per tile (infer.CPU_BATCH); training batches are train.batch_size")
    chunk: int = Field(2048, ge=256, description="block edge in pixels at full resolution: fields larger than "
                       "this go block by block, strip by strip (hpc_retrain.imaging.blocks)")
    engine: Literal["auto", "keras", "tensorflow", "openvino"] = Field(
        "auto", description="what runs the model (segment, and prepare's labels): auto: OpenVINO when installed "
        "and TensorFlow sees no GPU, else TensorFlow; or force either (OpenVINO and tensorflow need "
        "compute.backend=tensorflow; under jax or torch auto and keras run the Keras predictor on that backend)")
    backend: Literal["tensorflow", "jax", "torch"] | None = Field(
        None, description="the Keras 3 backend that runs and trains the model (hpc_retrain.inference.backend): tensorflow, "
        "jax or torch (pip install 'hpc-retrain[jax]' / '[torch]'); not given: KERAS_BACKEND if set, else "
        "tensorflow; both given and different is refused")


class InferConfig(_Section):
    model: Path | None = Field(None, description="a run folder or a model file; default: pretrained MISIC")
    mode: Literal["stitch", "blend"] = Field("stitch", description="MISIC crop-and-stitch or blended overlaps")
    # Post-processing thresholds: MISIC's own values by default; a retrained run stores the ones calibrated
    # on its validation fields, and ``segment --model RUN`` uses those.
    body_threshold: float = Field(0.4, gt=0, lt=1, description="cell mask: body probability above this")
    marker_threshold: float = Field(0.95, gt=0, le=1, description="confident body core for watershed markers")
    contour_threshold: float = Field(1.0, gt=0, le=1, description="markers are the cores where the contour "
                                     "probability is below this (splits touching cells); 1: MISIC's markers, "
                                     "cores in a trough of the contour map")
    name: str = Field("misic", description="label image name under each field's labels/ group")

    @field_validator("name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        return check_name(v)


NAME_RULE = "letters, digits, '-', '_' and '.', not starting with a dot, at most 100 characters"
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


def check_name(v: str) -> str:
    """A result name (``infer.name``, ``--name``): one folder name, so it can never leave its group."""
    if not isinstance(v, str) or not _NAME.match(v):
        raise ValueError(f"{v!r} is not a name: use {NAME_RULE}")
    return v


class RunConfig(_Section):
    seed: int = 0

    @field_validator("seed", mode="before")
    @classmethod
    def _an_integer(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"expected an integer seed, got {v!r}")
        return v
    plate: PlateConfig = PlateConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    labels: LabelConfig = LabelConfig()
    tiling: TilingConfig = TilingConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    compute: ComputeConfig = ComputeConfig()
    infer: InferConfig = InferConfig()

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
        """Read YAML (or nothing: defaults), apply ``section.key=value`` overrides, validate once."""
        return cls.layered(file=path, overrides=overrides or ())

    @classmethod
    def layered(cls, saved: str | Path | None = None, file: str | Path | RunConfig | None = None,
                overrides: Iterable[str] | dict[str, Any] = (), options: dict[str, Any] | None = None, *,
                saved_keys: Iterable[str] | None = None, explicit: Iterable[str] = ()) -> RunConfig:
        """The one place a command's settings are layered, each layer over those before it; validated once.

        1. ``file``: a YAML file (a run's saved ``config.yaml`` is one too), or a ``RunConfig`` already
           layered; None: the defaults.
        2. ``saved``: a run's saved config (its folder or ``config.yaml``): all of it (the file is then
           not used), or with ``saved_keys`` only those sections and ``section.field``s. A saved key is not
           taken where the caller set it: an override, or an ``explicit`` item (the ``--set`` items a
           ``file`` RunConfig already holds), names the key or a field inside it.
        3. ``overrides``: ``--set`` items ``section.key=value`` (or a {"section.key": value} mapping).
        4. ``options``: a command's own options, {"section.key" or "section__key": value}; None: not given.
        """
        if isinstance(file, RunConfig):
            data, source = file.to_dict(), "config"
        else:
            data, source = (_read_file(Path(file)), str(file)) if file is not None else ({}, "config")
        items = list(overrides.items()) if isinstance(overrides, dict) else [_split(o) for o in overrides]
        items = [(current_key(k, "--set"), v) for k, v in items]
        given = {current_key(k.replace("__", "."), "option"): v for k, v in (options or {}).items() if v is not None}
        if saved is not None:
            run = cls.read_saved(saved).to_dict()
            source = str(_saved_file(Path(saved))) + (" with options" if items or given else "")
            if saved_keys is None:
                data = run
            else:
                for key in taken_keys(saved_keys, [*explicit, *(k for k, _ in items)]):
                    _set_dotted(data, key, _get_dotted(run, key))
        for key, value in [*items, *given.items()]:
            _set_dotted(data, key, value)
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        try:
            return cls.model_validate(_migrated(data, source))
        except ValidationError as e:
            # One line, as every error the commands print: each field named with what is wrong with it.
            problems = []
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"]) or "(top level)"
                problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
            raise ConfigError(f"{source}: {'; '.join(problems)}") from None

    def updated(self, **dotted: Any) -> RunConfig:
        """A validated copy with ``section__key=value`` (or dotted-dict) changes."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, current_key(key.replace("__", "."), "updated()"), value)
        return RunConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def save(self, folder: str | Path, name: str = CONFIG_NAME) -> Path:
        """Write the config (plus provenance) beside a run's outputs, atomically."""
        from hpc_retrain import __version__
        from hpc_retrain.io import atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"hpc_retrain_version": __version__, "written": _dt.datetime.now().isoformat(timespec="seconds")}
        doc.update(self.to_dict())
        out = folder / name
        return atomic.write_text(out, yaml.safe_dump(doc, sort_keys=False))

    @classmethod
    def read_saved(cls, folder_or_file: str | Path) -> RunConfig:
        p = _saved_file(Path(folder_or_file))
        if not p.is_file():
            raise ConfigError(f"{p}: no saved config (is this a run folder?)")
        return cls.from_dict(_read_file(p), source=str(p))


def current_key(key: str, source: str) -> str:
    """``key`` under its current name (``MOVED``, saying so once per key and source; ``ALIASES``, silently).
    An alias of a section (``preprocess.phase``) also renames the keys inside it (``preprocess.phase.gamma``)."""
    for alias, name in ALIASES.items():
        if key == alias or key.startswith(alias + "."):
            return name + key[len(alias):]
    new = MOVED.get(key)
    if new is None:
        return key
    if (key, source) not in _WARNED:
        _WARNED.add((key, source))
        log.warning("%s: %s is now %s (read as that; rename it to silence this)", source, key, new)
    return new


def _migrated(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with every ``MOVED`` and ``ALIASES`` key under its own name; both names with different values
    is an error."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for sec in {a.split(".")[0] for a in ALIASES}:
        if isinstance(data.get(sec), dict):
            try:
                data[sec] = _section_aliases(sec, data[sec])
            except ValueError as e:
                raise ConfigError(f"{source}: {e}") from None
    for old, new in MOVED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = data.get(osec)
        if not isinstance(section, dict) or okey not in section:
            continue
        value = section.pop(okey)
        target = data.setdefault(nsec, {})
        if not isinstance(target, dict):
            continue  # pydantic names the malformed section
        if nkey in target and target[nkey] != value:
            raise ConfigError(f"{source}: {old}={value!r} and {new}={target[nkey]!r} disagree; {old} is the old "
                              f"name of {new}: keep only {new}")
        target[nkey] = value
        current_key(old, source)
    return data


def taken_keys(saved_keys: Iterable[str], told: Iterable[str]) -> list[str]:
    """Those of ``saved_keys`` a saved config provides under :meth:`RunConfig.layered`: the ones no ``told``
    item (a ``--set`` item or its key) names, or names a field inside."""
    told = [t.split("=", 1)[0].strip() for t in told]
    return [key for key in saved_keys if not any(t == key or t.startswith(key + ".") for t in told)]


def _saved_file(p: Path) -> Path:
    return p / CONFIG_NAME if p.is_dir() else p


def _read_file(path: Path) -> dict[str, Any]:
    """A YAML config file's settings (a run's saved config.yaml less its provenance), not yet validated."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for k in _PROVENANCE:  # a run's saved config.yaml is a valid --config
        data.pop(k, None)
    return data


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        data = data[p]
    return data


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    # YAML parsing turns "5" into 5, "[1,2]" into a list, "null" into None, as a user would expect.
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = child
    if value is None:
        node[parts[-1]] = None
    else:
        node[parts[-1]] = str(value) if isinstance(value, Path) else value
