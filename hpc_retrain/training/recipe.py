"""The training recipe (learning rate, class weights) chosen from the store the run trains on.

Sparse fields and dense colonies learn best differently, and the store says which a lab has: the fraction of
the training fields' pixels that the teacher labelled as cell body.

* **Sparse** (cells on under a tenth of the pixels; ColiCoords: ~1 %): lr 1e-4 and class weights (1-p)/p.
  Less weight let the few cell pixels shrink away (ColiCoords cross-validation: no weight or its square root
  took validation F1 from 0.53 to 0-0.2 within 5-7 epochs), and 1e-3 made validation worse every epoch
  (benchmarks/RESULTS.md, section 5b).
* **Dense** (a tenth or more; the demo's monolayer colonies: ~23 %): lr 2e-3 and no class weight. Here what is
  rare and decides instance F1 is the background line between touching cells: weighting the cells (3-5x)
  taught the student to merge them, and lr 1e-4 moved nothing in the demo's minutes (section 6).

The 0.1 line sits between the two measured regimes (a factor ~10 from each). A value set in the config
(``train.learning_rate``, ``train.pos_weight``) always wins over the choice; the choice and the density it came
from are logged and recorded in the checkpoints and ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hpc_retrain.config import TrainConfig
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st
from hpc_retrain.training.data import TrainingError

DENSE_BODY_FRACTION = 0.1
SPARSE_LR, DENSE_LR = 1e-4, 2e-3


@dataclass(frozen=True)
class Recipe:
    body_fraction: float  # the training fields' body-positive pixel fraction (tile-weighted)
    regime: str  # "sparse" or "dense"
    learning_rate: float
    pos_weight: tuple[float, ...]
    given: tuple[str, ...]  # the settings the config fixed instead of the choice

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        chose = [k for k in ("learning_rate", "pos_weight") if k not in self.given]
        what = (f"chose {' and '.join(chose)} for {self.regime} fields" if chose
                else f"{self.regime} fields; learning_rate and pos_weight set in the config")
        return (f"recipe: cells on {self.body_fraction:.1%} of the training pixels ({self.regime}: the line is "
                f"{DENSE_BODY_FRACTION:.0%}): {what}: lr {self.learning_rate:g}, pos_weight "
                f"{[round(w, 3) for w in self.pos_weight]}")


def choose(root, train_fields: np.ndarray, tc: TrainConfig, source: str) -> Recipe:
    """The recipe for these training fields; ``tc``'s explicit values override the choice."""
    p = np.asarray(st.positive_fraction(root, train_fields), np.float64)
    regime = "dense" if p[0] >= DENSE_BODY_FRACTION else "sparse"
    given = tuple(k for k in ("learning_rate", "pos_weight") if getattr(tc, k) is not None)
    lr = tc.learning_rate if tc.learning_rate is not None else (DENSE_LR if regime == "dense" else SPARSE_LR)
    if tc.pos_weight is not None:
        w = np.asarray(tc.pos_weight, np.float64)
        if w.shape != (len(layout.LABEL_CHANNELS),) or np.any(w <= 0):
            raise TrainingError(f"train.pos_weight: need {len(layout.LABEL_CHANNELS)} positive numbers "
                                f"(one per channel {layout.LABEL_CHANNELS}), got {list(tc.pos_weight)}")
    else:
        for c, pc in zip(layout.LABEL_CHANNELS, p):
            if not (0 < pc < 1) or not np.isfinite(pc):
                raise TrainingError(f"{source}: the training fields' {c} labels are {pc:.3g} positive; the "
                                    f"recipe needs 0 < p < 1 (check the labels, or set train.pos_weight)")
        w = np.ones(len(p)) if regime == "dense" else (1 - p) / p
    return Recipe(float(p[0]), regime, float(lr), tuple(float(x) for x in w), given)
