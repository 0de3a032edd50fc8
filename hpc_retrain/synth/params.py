"""The parameters that shape a synthetic field (:class:`SynthParams`) and a rendered field (:class:`SynthField`).

:mod:`hpc_retrain.synth.plates` renders fields and writes plates from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import numpy as np

from hpc_retrain.config import MODALITIES
from hpc_retrain.errors import HpcRetrainError

U16 = 65535


class SynthError(HpcRetrainError, ValueError):
    """Synthetic-plate parameters that cannot be used; the message names the parameter."""


@dataclass(frozen=True)
class SynthParams:
    """Everything that shapes a field besides its seed and size; lengths are in pixels unless noted."""

    mean_width: float = 7.0
    width_spread: float = 0.08  # relative s.d. of cell widths, clipped to +-15 %
    length_range: tuple[float, float] = (2.0, 5.0)  # cell length (caps included) in cell widths
    density: float = 0.3  # fraction of the field cells cover; met up to 0.3 (0.35 gives ~0.32, 0.45 ~0.36)
    colony_fraction: float = 0.75  # share of cells drawn in microcolonies; single cells fill the rest
    colony_size: float = 12.0  # mean cells per microcolony
    angle_jitter_deg: float = 2.0  # turn of a daughter from its mother's axis at division (s.d.)
    # what the transmitted-light channel shows: brightfield, or positive phase contrast
    modality: str = "brightfield"
    # brightfield: counts on a bright field, cells a few thousand counts darker, a faint bright halo
    bf_background: float = 60000.0
    bf_contrast: float = 4000.0
    bf_contrast_spread: float = 0.1
    bf_halo: float = 0.3  # halo peak as a fraction of the cell contrast
    bf_envelope: float = 0.5  # extra darkness of the envelope line on a cell's surface, fraction of bf_contrast
    bf_envelope_sigma: float = 0.08  # its half thickness (Gaussian s.d.) in cell widths, at least 0.5 px
    bf_gain: float = 1.0  # counts per photon: Poisson noise s.d. is sqrt(gain * counts)
    bf_read_noise: float = 20.0
    bf_gradient: float = 0.04  # peak-to-peak relative illumination change across the field
    bf_mottle: float = 0.004  # relative amplitude of smooth background texture (dirt, condenser)
    # phase contrast (modality "phase"; gain, read noise, gradient, mottle and PSF as brightfield's): a
    # mid-grey background, cells darker by up to ph_depth where thickest, light spread into a halo
    ph_background: float = 30000.0
    ph_depth: float = 0.8  # relative darkening along a cell's axis before the halo light is added back
    ph_depth_spread: float = 0.1
    # share of a cell's phase spread back as halo light (0: no halo; 1: all the light taken from the cell
    # lands around it). With the defaults an isolated cell's axis is ~0.66 of the background and its halo
    # peaks ~1.13 of it 2 px out, colonies reach 0.46-1.5 (tests/unit/synth/test_monolayer.py)
    ph_halo: float = 1.0
    ph_halo_sigma: float = 0.5  # reach of the halo (Gaussian s.d.) in cell widths
    # fluorescence: cytoplasmic signal over a camera offset and a dim autofluorescent background
    fl_brightness: float = 1500.0  # median cell brightness above background, counts
    fl_brightness_spread: float = 0.35  # log-normal sigma of per-cell brightness
    fl_background: float = 40.0
    fl_offset: float = 100.0
    fl_gain: float = 2.0
    fl_read_noise: float = 4.0
    fl_gradient: float = 0.08
    debris_per_mpx: float = 60.0  # small out-of-cell fluorescent specks per megapixel, as real slides have
    psf_sigma: float | None = None  # brightfield PSF s.d.; default 0.15 * mean_width
    fl_psf_sigma: float | None = None  # fluorescence PSF s.d.; default 0.2 * mean_width

    def check(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SynthError(f"synthetic field: {what}")

        need(self.mean_width >= 2, f"mean_width must be at least 2 px, got {self.mean_width}")
        need(0 <= self.width_spread <= 0.5, f"width_spread must be in [0, 0.5], got {self.width_spread}")
        lo, hi = self.length_range
        need(1 <= lo <= hi, f"length_range must satisfy 1 <= min <= max (in widths), got {self.length_range}")
        need(0 <= self.density <= 0.6, f"density must be in [0, 0.6], got {self.density}")
        need(0 <= self.colony_fraction <= 1, f"colony_fraction must be in [0, 1], got {self.colony_fraction}")
        need(self.colony_size >= 1, f"colony_size must be >= 1, got {self.colony_size}")
        need(self.modality in MODALITIES, f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        need(0 < self.ph_depth < 1 and 0 <= self.ph_halo <= 1 and self.ph_halo_sigma > 0,
             "phase contrast needs 0 < ph_depth < 1, 0 <= ph_halo <= 1, ph_halo_sigma > 0")
        need(self.bf_envelope >= 0 and self.bf_envelope_sigma > 0, "bf_envelope >= 0 and bf_envelope_sigma > 0")
        need(0 < self.bf_contrast < self.bf_background <= U16,
             "brightfield needs 0 < bf_contrast < bf_background <= 65535")
        need(self.bf_gain > 0 and self.fl_gain > 0, "gains must be positive")

    @property
    def psf(self) -> float:
        return 0.15 * self.mean_width if self.psf_sigma is None else self.psf_sigma

    @property
    def fl_psf(self) -> float:
        return 0.2 * self.mean_width if self.fl_psf_sigma is None else self.fl_psf_sigma


@dataclass
class SynthField:
    brightfield: np.ndarray  # uint16 (Y, X): the transmitted light, brightfield or phase contrast (params["modality"])
    fluorescence: np.ndarray  # uint16 (Y, X)
    masks: np.ndarray  # int32 (Y, X): 0 background, cells 1..n
    seed: int = 0
    params: dict[str, Any] = dc_field(default_factory=dict, repr=False)
    # (n, 5) float: cell i + 1's capsule, (cy, cx, angle, length, width) in px; its mask is this capsule's
    # pixels (those inside the field)
    cells: np.ndarray | None = dc_field(default=None, repr=False)

    @property
    def n_cells(self) -> int:
        return int(self.masks.max())

    @property
    def modality(self) -> str:
        return self.params.get("modality", "brightfield")

    def channels(self) -> dict[str, np.ndarray]:
        """The images by channel name; ``brightfield`` holds the transmitted light, named "phase" in a
        phase-contrast field."""
        name = "phase" if self.modality == "phase" else "brightfield"
        return {name: self.brightfield, "fluorescence": self.fluorescence}
