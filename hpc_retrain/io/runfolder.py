"""The training run folder: its files' names, its checkpoints, and which model a path given as ``--model`` means.

One owner for the format that ``train`` writes and ``status``, ``segment --model`` and resume read::

    RUN/config.yaml        the run's settings (``RunConfig.save``)
    RUN/status.json        what the training reports (``training.history.write_status``)
    RUN/job.json           what the launcher recorded (executor, job id, logs)
    RUN/.lock              flock'ed by the process that trains the run
    RUN/train.log          the training's log lines
    RUN/history.json|.csv  one row per epoch; RUN/metrics.json  the exported model's figures
    RUN/model.keras        the exported model (model.h5 in older runs)
    RUN/checkpoints/ckpt-eEEEEE[-sSSSSSS]/{state.json,variables.npz}, RUN/checkpoints/best/

Nothing here loads a model or TensorFlow: :func:`resolve_model` says what a path stands for, the inference
layer loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hpc_retrain.config import CONFIG_NAME
from hpc_retrain.errors import ModelError

CONFIG_FILE = CONFIG_NAME
STATUS_FILE = "status.json"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"
LOG_FILE = "train.log"
HISTORY_JSON, HISTORY_CSV = "history.json", "history.csv"
METRICS_FILE = "metrics.json"
MODEL_FILES = ("model.keras", "model.h5")  # the export, newest format first
CKPT_DIR = "checkpoints"
BEST = "best"
STATE_FILE, VARIABLES_FILE = "state.json", "variables.npz"  # a checkpoint's two files
RUN_FILES = (CONFIG_FILE, STATUS_FILE, JOB_FILE)  # any of them makes a folder a training run


def is_run(path: str | Path) -> bool:
    p = Path(path)
    return any((p / f).is_file() for f in RUN_FILES)


# ------------------------------------------------------------------------------------------ checkpoints
def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / STATE_FILE).is_file() and (p / VARIABLES_FILE).is_file()


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's finished checkpoints, oldest first (a checkpoint is finished once its state.json exists)."""
    d = Path(run_dir) / CKPT_DIR
    return sorted(p for p in d.glob("ckpt-*") if (p / STATE_FILE).is_file()) if d.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    cks = checkpoints(run_dir)
    return cks[-1] if cks else None


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json. FileNotFoundError passes through: a checkpoint pruned or replaced by a
    training that runs on, which the caller looks for again."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"{ckpt}: unreadable checkpoint {STATE_FILE} ({e})") from None


def run_of(path: str | Path | None) -> Path | None:
    """The training run folder ``path`` belongs to (the folder itself, or a checkpoint's run), else None."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and is_checkpoint(p) and (p.parent.parent / CONFIG_FILE).is_file():
        return p.parent.parent
    return p if p.is_dir() and (p / CONFIG_FILE).is_file() else None


def read_job(run_dir: str | Path) -> dict:
    p = Path(run_dir) / JOB_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


# ------------------------------------------------------------------------------------------ --model PATH
@dataclass(frozen=True)
class ModelSource:
    """What a model path stands for: a model file, or a checkpoint folder of a training run.

    ``path`` is what provenance names (the model file, or the checkpoint folder); ``note`` is the line that
    says what was chosen and why (empty for a plain model file); ``checkpoint`` holds the checkpoint's
    epoch/step (None for a model file); ``sha256`` is filled in when the model is loaded, for the bytes
    actually loaded (a checkpoint's ``variables.npz``).
    """

    path: Path
    run: Path | None = None
    checkpoint: dict | None = None
    note: str = ""
    sha256: str | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.checkpoint is not None


def _describe(ckpt: Path, state: dict, epochs: int | None) -> dict:
    """{"name", "epoch", "step"} and a phrase for the line: "epoch 7 of 20", "1 step(s) into epoch 3 of 20"."""
    done, step = int(state.get("epoch", 0)), int(state.get("step", 0))
    info = {"name": ckpt.name, "epoch": done, "step": step}
    of = f" of {epochs}" if epochs else ""
    if step:
        info["phrase"] = f"{step} step(s) into epoch {done + 1}{of}"
    elif done == 0:  # the starting model, validated before training; no epoch has beaten it (yet)
        info["phrase"] = f"epoch 0{of}: the starting model"
    else:
        info["phrase"] = f"epoch {done}{of}"
    return info


def resolve_model(path: str | Path) -> ModelSource:
    """What loading ``path`` would read, without loading it.

    A run folder: ``model.keras`` (or ``model.h5``) when the run finished; otherwise (still training,
    preempted, or trained on past its exported model) ``checkpoints/best`` if present, else the latest
    checkpoint. The source's ``note`` says which.
    """
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        return ModelSource(path)
    if is_checkpoint(path):
        run = run_of(path)
        if run is None:
            raise ModelError(f"{path}: a checkpoint outside a run folder (no {CONFIG_FILE} two levels up); "
                             f"the run's config names the model architecture")
        info = _describe(path, read_state(path), _epochs(run))
        return ModelSource(path, run, info, f"using checkpoint {path} ({info.pop('phrase')})")
    if path.name == CKPT_DIR and (path.parent / CONFIG_FILE).is_file():
        return resolve_model(path.parent)  # the run's checkpoints folder stands for the run
    model_file = next((path / n for n in MODEL_FILES if (path / n).is_file()), None)
    has_config = (path / CONFIG_FILE).is_file()
    if model_file is None and not has_config and (path / CKPT_DIR).is_dir():
        raise ModelError(f"{path}: checkpoints but no {CONFIG_FILE} (it names the model architecture); "
                         f"not a complete run folder")
    latest = latest_checkpoint(path) if has_config else None
    best = path / CKPT_DIR / BEST
    best = best if has_config and is_checkpoint(best) else None
    if model_file is not None:
        exported = exported_epoch(path)
        newer = latest is not None and exported is not None and _progress(read_state(latest)) > (exported, 0)
        if not newer:
            return ModelSource(model_file, path if has_config else None)
        why = (f"run {path} has trained past its exported {model_file.name} (epoch {exported}; "
               f"pass --model {model_file} for that one)")
    elif latest is None and best is None:
        raise ModelError(f"{path}: no model.keras, model.h5 or checkpoints in this folder; train first "
                         f"(hpc-retrain train --run {path} --store STORE)")
    else:
        why = f"run {path} is not finished"
    ckpt = best or latest
    info = _describe(ckpt, read_state(ckpt), _epochs(path))
    if ckpt == best:
        note = f"{why}: using checkpoint best ({info.pop('phrase')})"
    else:
        note = f"{why}: using the latest checkpoint {ckpt.name} ({info.pop('phrase')}; no best checkpoint yet)"
    return ModelSource(ckpt, path, info, note)


def _progress(state: dict) -> tuple[int, int]:
    return int(state.get("epoch", 0)), int(state.get("step", 0))


def _epochs(run: Path) -> int | None:
    try:
        from hpc_retrain.config import RunConfig

        return RunConfig.read_saved(run).train.epochs
    except Exception:  # only for the message
        return None


def exported_epoch(run: Path) -> int | None:
    """Epochs behind the run's exported model (metrics.json, written with it); None when unknown."""
    try:
        return int(json.loads((run / METRICS_FILE).read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
