"""Checkpoints of a training run: every piece of state that decides the next update, saved together.

A checkpoint folder (``run_dir/checkpoints/ckpt-eEEEEE[-sSSSSSS]``) holds the model's and the optimizer's
variables (``variables.npz``) and the :class:`Progress` (``state.json``). Each is written to a temporary
folder and renamed into place; the last ``keep`` epoch-end checkpoints and the best one are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_retrain.config import RunConfig
from hpc_retrain.io.runfolder import BEST, CKPT_DIR, STATE_FILE, VARIABLES_FILE
from hpc_retrain.training.data import TrainingError

# Training settings a resume must share with the run it continues; anything else (epochs, how many
# checkpoints to keep, determinism, precision) may change between attempts.
RESUME_FIXED = ("batch_size", "learning_rate", "init", "base_model", "val_fraction", "pos_weight", "augment",
                 "steps_per_epoch", "tiles_per_epoch")
CHOSEN_BY_RECIPE = ("learning_rate", "pos_weight")



@dataclass
class Progress:
    """Everything besides variables that a resume needs: where we are and what has been measured."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of epoch ``epoch + 1`` (interrupt checkpoints only)
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    seen: int = 0
    elapsed_s: float = 0.0
    history: list | None = None
    best_score: float | None = None  # validation F1@0.5 (or -loss without validation fields); higher is better
    best_epoch: int | None = None
    since_best: int = 0  # epochs without a better score (early stopping)
    train_fields: list | None = None
    val_fields: list | None = None
    pos_weight: list | None = None
    recipe: dict | None = None  # training.recipe.Recipe as chosen at the start (None: a run from before 0.3)
    data_seed: int = 0
    train_config: dict | None = None
    store: str | None = None  # the training store the run started on (resolved path)
    store_generation: str | None = None  # its generation id then (store.GENERATION); None for older stores

    @property
    def name(self) -> str:
        return f"ckpt-e{self.epoch:05d}" + (f"-s{self.step:06d}" if self.step else "")


def save_checkpoint(run_dir: Path, prog: Progress, model, optimizer, keep: int, best: bool) -> Path:
    ck_root = run_dir / CKPT_DIR
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / prog.name
    tmp = ck_root / f".tmp-{prog.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {f"m{i:04d}": _numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"o{i:04d}": _numpy(v) for i, v in enumerate(optimizer.variables)})
    with open(tmp / VARIABLES_FILE, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    state = dict(prog.__dict__, model_variables=_signature(model.variables),
                 optimizer_variables=_signature(optimizer.variables))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():  # the same state saved twice (e.g. a signal right at an epoch end)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if best:
        btmp = ck_root / f".tmp-best-{os.getpid()}"
        shutil.rmtree(btmp, ignore_errors=True)
        shutil.copytree(final, btmp)
        shutil.rmtree(ck_root / BEST, ignore_errors=True)
        os.replace(btmp, ck_root / BEST)
    _prune(ck_root, keep)
    return final


def _prune(ck_root: Path, keep: int) -> None:
    cks = [p for p in sorted(ck_root.glob("ckpt-*")) if (p / STATE_FILE).is_file()]
    ends = [p for p in cks if "-s" not in p.name]
    drop = set(ends[:-keep]) if len(ends) > keep else set()
    if ends:  # an interrupt checkpoint is superseded by any later epoch end
        drop |= {p for p in cks if "-s" in p.name and p.name < ends[-1].name}
    for p in drop:
        shutil.rmtree(p, ignore_errors=True)


def _numpy(v) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(v.value))


def _signature(variables) -> list[str]:
    return [f"{tuple(v.shape)} {v.dtype}" for v in variables]


def _fits(saved: list[str], ours: list[str]) -> bool:
    """The same variables by shape and kind (float or integer), not by exact dtype: backends keep the Dropout
    seed states and Adam's step count in integers of their own width (TensorFlow int64, JAX and PyTorch
    uint32/int32), so a checkpoint written under one backend resumes under another."""
    def key(sig: str) -> tuple[str, bool]:
        shape, dtype = sig.rsplit(" ", 1)
        return shape, dtype.startswith(("float", "bfloat"))

    return len(saved) == len(ours) and all(key(a) == key(b) for a, b in zip(saved, ours))


def load_checkpoint(path: Path, model, optimizer) -> Progress:
    state = json.loads((path / STATE_FILE).read_text())
    names_m, names_o = state.pop("model_variables"), state.pop("optimizer_variables")
    # Shapes, not names: Keras numbers layer names per process, so a second model in one process differs.
    if not _fits(names_m, _signature(model.variables)):
        raise TrainingError(f"{path}: checkpoint variables do not match this model (another base model?)")
    optimizer.build(model.trainable_variables)
    if not _fits(names_o, _signature(optimizer.variables)):
        raise TrainingError(f"{path}: optimizer state does not match (another init mode or precision?)")
    try:
        with np.load(path / VARIABLES_FILE) as z:
            for prefix, variables in (("m", model.variables), ("o", optimizer.variables)):
                for i, v in enumerate(variables):
                    a = z[f"{prefix}{i:04d}"]
                    if a.dtype.kind not in "fiub":
                        raise ValueError(f"{prefix}{i:04d} holds {a.dtype} values, not numbers")
                    # cast to the variable's own dtype (another backend's integer width): values carry over
                    v.assign(a.astype(str(v.dtype), copy=False))
    except OSError:
        raise  # the machine's (permission denied, I/O error): reported as such, the checkpoint is not blamed
    except Exception as e:  # truncated, an object array (allow_pickle is off), a missing member
        raise TrainingError(f"{path / VARIABLES_FILE} is unreadable ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); move the folder {path} out of {path.parent} to "
                            f"resume from the checkpoint before it") from None
    known = set(Progress.__dataclass_fields__)
    return Progress(**{k: v for k, v in state.items() if k in known})


def changed_fixed_settings(old: dict, cfg: RunConfig) -> list[tuple[str, object, object]]:
    """(field, the run's value, the new value) of each ``RESUME_FIXED`` training setting that differs."""
    now = cfg.train.model_dump(mode="json")
    default = type(cfg.train)().model_dump(mode="json")  # a field added since the run started: its default
    # Left unset, the recipe's settings are the run's own (training.recipe chose them at the start; the
    # checkpoint holds them), whatever a run from before the recipe recorded.
    chosen = {k for k in CHOSEN_BY_RECIPE if now.get(k) is None}
    return [(k, old.get(k, default.get(k)), now.get(k)) for k in RESUME_FIXED
            if k not in chosen and old.get(k, default.get(k)) != now.get(k)]


class ResumeError(TrainingError):
    """A resume (or a training store) the training would refuse; the message says what to change."""


def check_resume(state: dict, cfg: RunConfig, run_dir: Path) -> None:
    """The one resume check: refuse to continue a checkpoint (its ``state``: state.json, or a Progress as a
    dict) with training settings or a seed other than the run started with. ``jobs.check_resume`` runs it
    before anything is written; the training runs it again on the checkpoint it loads."""
    diffs = []
    old = state.get("train_config")
    if isinstance(old, dict):
        diffs += [f"train.{k} {_show(new)} (the run has {_show(was)})"
                  for k, was, new in changed_fixed_settings(old, cfg)]
    if state.get("data_seed") is not None and state["data_seed"] != cfg.seed:
        diffs.append(f"seed {cfg.seed} (the run has {state['data_seed']})")
    if diffs:
        raise ResumeError(f"{run_dir}: cannot resume with other settings than the run started with: "
                          f"{'; '.join(diffs)}; leave them out to resume, or train into a new run folder")


def _show(v) -> str:
    return "none" if v is None else json.dumps(v) if isinstance(v, (list, dict, str)) else str(v)
