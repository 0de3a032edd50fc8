"""Retrain MISIC on a training store: a custom TensorFlow loop whose checkpoints make resumes exact.

Why a custom loop rather than ``model.fit``: every piece of state that decides the next update is
explicit and saved together, so a run killed at any point continues bit-for-bit (with op determinism):

* weights, BatchNorm statistics and the Dropout layers' seed-generator states (``model.variables``);
* the optimizer's variables (Adam moments, iteration count, loss scale under mixed precision);
* the data order: each epoch's tile permutation and augmentation codes are a pure function of
  ``(seed, epoch)``, so "where we are" is just ``(epoch, step)``;
* the running sums of the epoch's training metrics and the history so far.

Checkpoints (``run_dir/checkpoints``) are written at every epoch end and, on SIGTERM/SIGUSR2, after the
training step in flight finishes ("interrupt" checkpoints, holding the batch position within the epoch), so
a preempted job loses at most one step. Each is written to a temporary folder and renamed into place. The
last ``keep_checkpoints`` epoch-end checkpoints and the best one (lowest validation loss) are kept.

Encoder freezing (``init: finetune-decoder``): the MISIC U-Net's encoder is every layer up to and
including the conv block after the deepest MaxPooling (the bottleneck), i.e. everything before the first
UpSampling layer; frozen BatchNorm layers run in inference mode, so their statistics stay pretrained.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain import store as st
from hpc_retrain.config import RunConfig

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
BEST = "best"
STATUS_FILE = "status.json"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_iou", "val_dice",
                   "val_f1", "val_precision", "val_recall", "time_s", "tiles_per_s")
# Training settings a resume must share with the run it continues; anything else (epochs, how many
# checkpoints to keep, determinism, precision) may change between attempts.
_RESUME_FIXED = ("batch_size", "learning_rate", "init", "base_model", "val_fraction", "pos_weight", "augment",
                 "steps_per_epoch", "tiles_per_epoch")
# Sections of the store's own config that the run (and the model it exports) must carry: a model is only
# meaningful with the preprocessing, labels and tiling its training tiles were made with.
STORE_SECTIONS = ("preprocess", "labels", "tiling")
EPS = 1e-7


class TrainingError(ValueError):
    """A run that cannot start or continue; the message names the folder or store and the problem."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``train`` again on the same run resumes."""

    def __init__(self, signum: int, checkpoint: Path, previous_handler: Any = None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.previous_handler = previous_handler


# ----------------------------------------------------------------------------------------- data split
def split_fields(usable: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation fields (not tiles: neighbouring tiles of one field would leak)."""
    usable = np.asarray(usable, int)
    n = len(usable)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    perm = np.random.default_rng([seed, 0x5E1D]).permutation(usable)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def field_tiles(root, fields: np.ndarray) -> np.ndarray:
    ent = st.entries(root)
    parts = [np.arange(ent[f].first_tile, ent[f].first_tile + ent[f].n_tiles) for f in fields]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def positive_weights(root, train_fields: np.ndarray, override, source: str) -> np.ndarray:
    """w_c = (1 - p_c) / p_c from the training fields' positive-pixel fractions, unless given."""
    if override is not None:
        w = np.asarray(override, np.float64)
        if w.shape != (len(st.LABEL_CHANNELS),) or np.any(w <= 0):
            raise TrainingError(f"train.pos_weight: need {len(st.LABEL_CHANNELS)} positive numbers "
                                f"(one per channel {st.LABEL_CHANNELS}), got {list(override)}")
        return w
    p = np.asarray(st.positive_fraction(root, train_fields), np.float64)
    for c, pc in zip(st.LABEL_CHANNELS, p):
        if not (0 < pc < 1) or not np.isfinite(pc):
            raise TrainingError(f"{source}: the training fields' {c} labels are {pc:.3g} positive; a weight "
                                f"(1-p)/p needs 0 < p < 1 (check the labels, or set train.pos_weight)")
    return (1 - p) / p


def epoch_plan(train_tiles: np.ndarray, epoch: int, seed: int, batch: int, steps_cap: int | None,
               augment: bool, min_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Tile order, augmentation codes (0-7: k = code % 4 quarter turns, flipped when code >= 4), steps.

    With ``min_tiles`` the tiles go round in fresh permutations until at least that many are planned.
    A pure function of (seed, epoch): a resumed run sees exactly the order the interrupted one would.
    """
    rng = np.random.default_rng([seed, 0xDA7A, epoch])
    rounds = max(1, math.ceil((min_tiles or 0) / len(train_tiles))) if len(train_tiles) else 1
    order = np.concatenate([rng.permutation(train_tiles) for _ in range(rounds)])
    codes = rng.integers(0, 8, len(order)) if augment else np.zeros(len(order), np.int64)
    steps = math.ceil(len(order) / batch)
    if steps_cap is not None:
        steps = min(steps, steps_cap)
    n = min(len(order), steps * batch)
    return order[:n], codes[:n].astype(np.int32), steps


# ------------------------------------------------------------------------------------------ TF parts
class TileReader:
    """Random access to one tile's (target, label) in the Zarr store.

    Opening checks, from a listing of chunk keys (nothing read), that every tile of the usable fields has
    its ``targets`` and ``labels`` chunk files: zarr reads a missing one as zeros. A chunk that exists but
    cannot be decoded (truncated, overwritten) fails ``read`` with one line naming the file; as that happens
    inside TensorFlow's input pipeline, the line is also kept in ``TileReader.failure`` for the caller.
    """

    failure: str | None = None  # the last unreadable tile's message, in this process

    def __init__(self, path: Path):
        TileReader.failure = None  # a failure of an earlier training in this process is not this one's
        self.path = Path(path)
        root = st.open_store(path)  # a deleted or garbled array metadata: StoreError, one line
        st.check_tiles(root, self.path)
        self.root = root
        self.targets, self.labels = root["targets"], root["labels"]
        self.size = int(self.targets.shape[1])

    def read(self, i) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        try:
            return np.asarray(self.targets[i], np.float32), np.asarray(self.labels[i], np.uint8)
        except Exception as e:
            TileReader.failure = _unreadable_tile(self, i, e)
            raise st.StoreError(TileReader.failure) from None


def _unreadable_tile(reader: TileReader, i: int, e: Exception) -> str:
    """One line: the store, the tile's field, the chunk file that fails, the decoder's complaint, the fix."""
    root = reader.root
    try:
        field = st.entries(root)[int(root["tile_field"][i])]
        where = f" (field {field.well}/{field.field})"
    except Exception:
        where = ""
    files = []
    for name in ("targets", "labels"):
        try:
            root[name][i]
        except Exception:
            files.append(str(st.chunk_file(root, reader.path, name, i)))
    files = files or [f"{reader.path}/targets|labels chunk of tile {i}"]
    text = " ".join(str(e).split())[:200]
    return (f"{reader.path}: tile {i}{where} is unreadable ({type(e).__name__}: {text}): chunk file "
            f"{' and '.join(files)} is truncated or corrupt; delete it and rerun "
            f"`{st.prepare_command(root, reader.path)}` (with the options the store was made with), which redoes "
            f"fields with missing chunks")


def make_dataset(reader: TileReader, tiles: np.ndarray, codes: np.ndarray, batch: int):
    """Batches of (target, label) read in parallel from Zarr, in the given order, augmented by code."""
    import tensorflow as tf

    s = reader.size

    def load(i, code):
        x, y = tf.py_function(reader.read, [i], [tf.float32, tf.uint8])
        x.set_shape((s, s, 3))
        y.set_shape((s, s, 2))
        return augment_pair(x, tf.cast(y, tf.float32), code)

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(tiles, np.int64), np.asarray(codes, np.int32)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def augment_pair(x, y, code):
    """The same flip/quarter-turn for target and label (stacked, so they cannot drift apart)."""
    import tensorflow as tf

    both = tf.concat([x, y], axis=-1)
    both = tf.image.rot90(both, k=code % 4)
    both = tf.cond(code >= 4, lambda: tf.reverse(both, axis=[1]), lambda: both)
    nx = x.shape[-1]
    return both[..., :nx], both[..., nx:]


def weighted_bce(y_true, y_prob, pos_weight, eps: float = EPS):
    """Mean of -(w_c y log p + (1 - y) log(1 - p)) on probabilities (MISIC ends in a sigmoid)."""
    import tensorflow as tf

    y = tf.cast(y_true, tf.float32)
    p = tf.clip_by_value(tf.cast(y_prob, tf.float32), eps, 1.0 - eps)
    w = tf.cast(pos_weight, tf.float32)
    return tf.reduce_mean(-(w * y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p)))


def encoder_layers(model) -> list:
    """Layers before the first UpSampling that follows the deepest MaxPooling (see module docstring)."""
    import keras

    layers = model.layers
    pools = [i for i, l in enumerate(layers) if isinstance(l, keras.layers.MaxPooling2D)]
    if not pools:
        raise TrainingError(f"{model.name}: no MaxPooling layer, cannot tell the encoder for finetune-decoder")
    ups = [i for i, l in enumerate(layers) if i > pools[-1] and isinstance(l, keras.layers.UpSampling2D)]
    if not ups:
        raise TrainingError(f"{model.name}: no UpSampling after the deepest MaxPooling; not a U-Net")
    return layers[:ups[0]]


def with_policy(model, policy: str):
    """The same network with ``policy`` on every layer but the output (kept float32), same weights."""
    import keras

    cfg = model.get_config()
    outputs = {o[0] for o in cfg["output_layers"]}
    for layer in cfg["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = "float32" if layer["name"] in outputs else policy
    new = keras.Model.from_config(cfg)
    new.set_weights(model.get_weights())
    return new


def use_mixed_precision(setting: str) -> bool:
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not gpu:
        log.warning("mixed precision requested without a GPU: float16 on CPU is slow")
    return setting == "on" or (setting == "auto" and gpu)


def build_model(cfg: RunConfig, mixed: bool):
    """(model to train, float32 model to export). Both share one architecture; weights are copied over."""
    from hpc_retrain import model as mdl

    base = mdl.load(cfg.train.base_model, tile=cfg.tiling.size)
    if cfg.train.init == "reinit":
        mdl.reinitialize(base, seed=cfg.seed)
    net = with_policy(base, "mixed_float16") if mixed else base
    if cfg.train.init == "finetune-decoder":
        frozen = encoder_layers(net)
        for layer in frozen:
            layer.trainable = False
        log.info("finetune-decoder: froze %d encoder layers (through %s)", len(frozen), frozen[-1].name)
    return net, base


# ------------------------------------------------------------------------------------- checkpoints
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
    data_seed: int = 0
    train_config: dict | None = None

    @property
    def name(self) -> str:
        return f"ckpt-e{self.epoch:05d}" + (f"-s{self.step:06d}" if self.step else "")


def _checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CKPT_DIR
    return sorted(p for p in d.glob("ckpt-*") if (p / "state.json").is_file()) if d.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = _checkpoints(Path(run_dir))
    return cks[-1] if cks else None  # names sort by (epoch, step)


def save_checkpoint(run_dir: Path, prog: Progress, model, optimizer, keep: int, best: bool) -> Path:
    ck_root = run_dir / CKPT_DIR
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / prog.name
    tmp = ck_root / f".tmp-{prog.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {f"m{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"o{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    with open(tmp / "variables.npz", "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    state = dict(prog.__dict__, model_variables=_signature(model.variables),
                 optimizer_variables=_signature(optimizer.variables))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
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
    cks = [p for p in sorted(ck_root.glob("ckpt-*")) if (p / "state.json").is_file()]
    ends = [p for p in cks if "-s" not in p.name]
    drop = set(ends[:-keep]) if len(ends) > keep else set()
    if ends:  # an interrupt checkpoint is superseded by any later epoch end
        drop |= {p for p in cks if "-s" in p.name and p.name < ends[-1].name}
    for p in drop:
        shutil.rmtree(p, ignore_errors=True)


def _signature(variables) -> list[str]:
    return [f"{tuple(v.shape)} {v.dtype}" for v in variables]


def load_checkpoint(path: Path, model, optimizer) -> Progress:
    state = json.loads((path / "state.json").read_text())
    names_m, names_o = state.pop("model_variables"), state.pop("optimizer_variables")
    # Shapes, not names: Keras numbers layer names per process, so a second model in one process differs.
    if names_m != _signature(model.variables):
        raise TrainingError(f"{path}: checkpoint variables do not match this model (another base model?)")
    optimizer.build(model.trainable_variables)
    if names_o != _signature(optimizer.variables):
        raise TrainingError(f"{path}: optimizer state does not match (another init mode or precision?)")
    with np.load(path / "variables.npz") as z:
        for i, v in enumerate(model.variables):
            v.assign(z[f"m{i:04d}"])
        for i, v in enumerate(optimizer.variables):
            v.assign(z[f"o{i:04d}"])
    known = set(Progress.__dataclass_fields__)
    return Progress(**{k: v for k, v in state.items() if k in known})


# --------------------------------------------------------------------------------------- signals
class _StopOnSignal:
    """SIGTERM/SIGUSR2 only raise a flag: the loop saves after the step in flight and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._raise_flag)
        return self

    def _raise_flag(self, signum, frame):  # no logging here: a handler may interrupt a logging call
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------ outputs
def write_history(run_dir: Path, history: list[dict]) -> None:
    _atomic_text(run_dir / "history.json", json.dumps(history, indent=1))
    tmp = run_dir / "history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, run_dir / "history.csv")


def read_history(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "history.json"
    return json.loads(p.read_text()) if p.is_file() else []


def plot_curves(run_dir: Path, history: list[dict]) -> Path:
    """Loss and validation loss per epoch (as the original workflow plotted), and validation IoU/Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]

    def col(k):
        return [np.nan if h.get(k) is None else h[k] for h in history]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, col("loss"), "o-", label="loss")
    if any(h.get("val_loss") is not None for h in history):
        a.plot(ep, col("val_loss"), "o-", label="val loss")
    a.set_xlabel("epoch"), a.set_ylabel("weighted BCE"), a.set_title("Model loss"), a.legend()
    b.plot(ep, col("val_f1"), "o-", label="val instance F1@0.5")
    b.plot(ep, col("val_iou"), "o-", label="val IoU (body)")
    b.set_xlabel("epoch (0: the starting model)"), b.set_ylim(0, 1), b.set_title("Validation"), b.legend()
    fig.tight_layout()
    out = run_dir / "training_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_status(run_dir: Path, state: str, **extra) -> None:
    doc = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    doc.update(extra)
    _atomic_text(run_dir / STATUS_FILE, json.dumps(doc, indent=1))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _RunLog:
    """train.log in the run folder receives this module's records for the duration of a run."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.level = log.level

    def __enter__(self):
        log.addHandler(self.handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        log.removeHandler(self.handler)
        self.handler.close()
        log.setLevel(self.level)


# ----------------------------------------------------------------------------------------- training
def _check_resume(prog: Progress, cfg: RunConfig, ckpt: Path) -> None:
    now = cfg.train.model_dump(mode="json")
    old = prog.train_config or {}
    diff = [k for k in _RESUME_FIXED if old.get(k) != now.get(k)]
    if prog.data_seed != cfg.seed:
        diff.append("seed")
    if diff:
        raise TrainingError(
            f"{ckpt}: this run was started with other settings ({', '.join(diff)}); resume with the same "
            f"settings or train into a new run folder")


def train(cfg: RunConfig, store: Path, run_dir: Path) -> dict:
    """Train (or resume) into ``run_dir``; returns the final metrics (also written to metrics.json)."""
    store, run_dir = Path(store), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _RunLog(run_dir):
        try:
            return _train(cfg, store, run_dir)
        except TrainingInterrupted as e:
            write_status(run_dir, "interrupted", checkpoint=str(e.checkpoint), signal=signal.Signals(e.signum).name,
                         epochs=cfg.train.epochs)
            raise
        except BaseException as e:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}", epochs=cfg.train.epochs)
            raise


def make_steps(net, opt, pos_w, size: int):
    """Compiled training and validation steps for (batch, size, size, 3) -> (batch, size, size, 2).

    ``val_step`` returns sums (loss * n, accuracy * n, n, body intersection, predicted, true) so metrics
    over the whole validation set do not depend on the batch size, and the batch's probabilities (for
    the instance F1 of :mod:`validation`).
    """
    import tensorflow as tf

    s = size
    w = tf.constant(pos_w, tf.float32)
    spec = (tf.TensorSpec((None, s, s, 3), tf.float32), tf.TensorSpec((None, s, s, 2), tf.float32))

    @tf.function(input_signature=spec)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            p = net(x, training=True)
            loss = weighted_bce(y, p, w)
            scaled = opt.scale_loss(loss)
        grads = tape.gradient(scaled, net.trainable_variables)
        opt.apply(grads, net.trainable_variables)
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.cast(p, tf.float32) >= 0.5, y >= 0.5), tf.float32))
        return loss, acc

    @tf.function(input_signature=spec)
    def val_step(x, y):
        p = tf.cast(net(x, training=False), tf.float32)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        hit = tf.cast(tf.equal(p >= 0.5, y >= 0.5), tf.float32)
        pb, yb = tf.cast(p[..., 0] >= 0.5, tf.float32), y[..., 0]
        inter, sp, sy = tf.reduce_sum(pb * yb), tf.reduce_sum(pb), tf.reduce_sum(yb)
        return tf.stack([weighted_bce(y, p, w) * n, tf.reduce_mean(hit) * n, n, inter, sp, sy]), p[..., :2]

    return train_step, val_step


def store_config(cfg: RunConfig, root, store: Path) -> RunConfig:
    """``cfg`` with the store's preprocessing, label and tiling settings: what the tiles were made with."""
    saved = st.stored_config(root)
    data = cfg.to_dict()
    changed = []
    for sec in STORE_SECTIONS:
        if sec in saved and saved[sec] != data.get(sec):
            changed.append(sec)
            data[sec] = saved[sec]
    if changed:
        log.info("%s: using the store's %s settings (the tiles were made with them)", store, ", ".join(changed))
    return RunConfig.from_dict(data, source=f"{store} config")


def selection_score(row: dict) -> float:
    """Higher is better: validation instance F1@0.5, ties broken by body IoU (a few validation cells give
    a coarse F1, and a plateau of equal F1s would otherwise stop training early); -loss without validation."""
    if row.get("val_f1") is None:
        return -row["loss"]
    return row["val_f1"] + 0.01 * row["val_iou"]


def _train(cfg: RunConfig, store: Path, run_dir: Path) -> dict:
    import keras
    import tensorflow as tf

    from hpc_retrain.validation import FieldValidator

    root = st.open_store(store)
    cfg = store_config(cfg, root, store)
    tc = cfg.train
    if tc.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg.seed)  # before building: Dropout seed generators draw from it
    mixed = use_mixed_precision(tc.mixed_precision)
    net, export = build_model(cfg, mixed)
    opt = keras.optimizers.Adam(tc.learning_rate)
    if mixed:
        opt = keras.optimizers.LossScaleOptimizer(opt)

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        prog = load_checkpoint(ckpt, net, opt)
        _check_resume(prog, cfg, ckpt)
        train_fields, val_fields = np.array(prog.train_fields, int), np.array(prog.val_fields, int)
        pos_w = np.array(prog.pos_weight)
        log.info("resuming from %s: %d epoch(s) done%s", ckpt.name, prog.epoch,
                 f", {prog.step} step(s) into epoch {prog.epoch + 1}" if prog.step else "")
    else:
        usable = st.done_fields(root)
        if len(usable) == 0:
            raise TrainingError(f"{store}: no finished fields; run `hpc-retrain prepare` first")
        train_fields, val_fields = split_fields(usable, tc.val_fraction, cfg.seed)
        pos_w = positive_weights(root, train_fields, tc.pos_weight, str(store))
        opt.build(net.trainable_variables)
        prog = Progress(history=[], train_fields=train_fields.tolist(), val_fields=val_fields.tolist(),
                        pos_weight=pos_w.tolist(), data_seed=cfg.seed, train_config=tc.model_dump(mode="json"))
    cfg.save(run_dir)

    train_tiles, val_tiles = field_tiles(root, train_fields), field_tiles(root, val_fields)
    if len(train_tiles) == 0:
        raise TrainingError(f"{store}: the training fields hold no tiles")
    log.info("store %s: %d training tiles (%d fields), %d validation tiles (%d fields); pos_weight %s; "
             "batch %d; lr %g; init %s; %s", store, len(train_tiles), len(train_fields), len(val_tiles),
             len(val_fields), np.round(pos_w, 3).tolist(), tc.batch_size, tc.learning_rate, tc.init,
             "mixed_float16" if mixed else "float32")
    if len(val_tiles) == 0:
        log.warning("no validation fields (need at least 2 usable fields); the last epoch is exported, "
                    "thresholds stay MISIC's")

    reader = TileReader(store)
    s = reader.size
    if s != cfg.tiling.size:
        raise TrainingError(f"{store}: tiles are {s} px but tiling.size is {cfg.tiling.size}; use the config the "
                            f"store was prepared with")
    train_step, val_step = make_steps(net, opt, pos_w, s)

    val_ds = make_dataset(reader, val_tiles, np.zeros(len(val_tiles), np.int32), tc.batch_size)
    validator = FieldValidator(root, val_fields, cfg) if len(val_tiles) else None
    status_extra = {"epochs": tc.epochs, "store": str(store)}

    def val_pass() -> tuple[np.ndarray, list[np.ndarray]]:
        """The validation sums of ``val_step`` and each validation field's stitched probabilities."""
        vals, probs = np.zeros(6), []
        for x, y in val_ds:
            v, p = val_step(x, y)
            vals += v.numpy()
            probs.append(p.numpy())
        return vals, validator.stitch(np.concatenate(probs))

    def validate(row: dict) -> dict:
        """Loss, pixel and instance metrics of the current weights on the validation fields."""
        if validator is None:
            return row
        vals, probs = val_pass()
        inter, sp, sy = vals[3:]
        sc = validator.score(probs)
        row.update(val_loss=float(vals[0] / vals[2]), val_accuracy=float(vals[1] / vals[2]),
                   val_iou=float(inter / (sp + sy - inter)) if sp + sy - inter > 0 else 1.0,
                   val_dice=float(2 * inter / (sp + sy)) if sp + sy > 0 else 1.0,
                   val_f1=sc.f1, val_precision=sc.precision, val_recall=sc.recall)
        return row

    if prog.epoch == 0 and prog.step == 0 and not prog.history:
        # Epoch 0: the starting model on the validation fields, the baseline every epoch must beat.
        row = validate({"epoch": 0, "loss": None, "accuracy": None, "time_s": 0.0, "tiles_per_s": None})
        prog.history.append(row)
        if row.get("val_f1") is not None:
            prog.best_score, prog.best_epoch = selection_score(row), 0
            log.info("epoch 0 (the starting model): val_f1 %.4f val_loss %.4f", row["val_f1"], row["val_loss"])
            save_checkpoint(run_dir, prog, net, opt, tc.keep_checkpoints, best=True)

    with _StopOnSignal() as stop:
        for epoch in range(prog.epoch + 1, tc.epochs + 1):
            if (tc.patience is not None and validator is not None and prog.since_best >= tc.patience
                    and prog.epoch >= tc.min_epochs):
                log.info("stopping early: validation F1 has not improved for %d epochs (best %.4f at epoch %d)",
                         prog.since_best, prog.best_score, prog.best_epoch)
                break
            order, codes, steps = epoch_plan(train_tiles, epoch, cfg.seed, tc.batch_size, tc.steps_per_epoch,
                                             tc.augment, tc.tiles_per_epoch)
            start_step = prog.step
            ds = make_dataset(reader, order[start_step * tc.batch_size:], codes[start_step * tc.batch_size:],
                              tc.batch_size)
            write_status(run_dir, "running", epoch=epoch, **status_extra)
            log.info("epoch %d/%d started (%d steps%s)", epoch, tc.epochs, steps,
                     f", resuming at step {start_step + 1}" if start_step else "")
            t0 = time.perf_counter() - prog.elapsed_s
            every = max(1, steps // 10)
            step = start_step
            for x, y in ds:
                if stop.signum is not None:
                    break
                loss, acc = train_step(x, y)
                n = int(x.shape[0])
                step += 1
                prog.loss_sum += float(loss) * n
                prog.acc_sum += float(acc) * n
                prog.seen += n
                if step % every == 0 or step == steps:
                    log.info("epoch %d/%d step %d/%d loss %.4f", epoch, tc.epochs, step, steps,
                             prog.loss_sum / prog.seen)
                if stop.signum is not None:
                    break
            if stop.signum is not None and step < steps:
                prog.step, prog.epoch, prog.elapsed_s = step, epoch - 1, time.perf_counter() - t0
                path = run_dir / CKPT_DIR / prog.name
                if step > start_step or not path.is_dir():  # else: nothing new since that checkpoint
                    path = save_checkpoint(run_dir, prog, net, opt, tc.keep_checkpoints, best=False)
                log.warning("%s: saved epoch %d at step %d/%d to %s; train again to resume",
                            signal.Signals(stop.signum).name, epoch, step, steps, path.name)
                raise TrainingInterrupted(stop.signum, path, stop.previous.get(stop.signum))

            dt = time.perf_counter() - t0
            row = validate({"epoch": epoch, "loss": prog.loss_sum / prog.seen, "accuracy": prog.acc_sum / prog.seen,
                            "time_s": round(dt, 3), "tiles_per_s": round(prog.seen / dt, 3) if dt > 0 else None})
            prog.history.append(row)
            score = selection_score(row)
            is_best = prog.best_score is None or score > prog.best_score
            if is_best:
                prog.best_score, prog.best_epoch, prog.since_best = score, epoch, 0
            else:
                prog.since_best += 1
            prog.epoch, prog.step, prog.loss_sum, prog.acc_sum, prog.seen, prog.elapsed_s = epoch, 0, 0.0, 0.0, 0, 0.0
            save_checkpoint(run_dir, prog, net, opt, tc.keep_checkpoints, best=is_best)
            write_history(run_dir, prog.history)
            log.info("epoch %d/%d loss %.4f accuracy %.4f%s %.1f s (%.2f tiles/s)%s", epoch, tc.epochs,
                     row["loss"], row["accuracy"],
                     "" if row.get("val_loss") is None else
                     f" val_loss {row['val_loss']:.4f} val_iou {row['val_iou']:.4f} val_f1 {row['val_f1']:.4f}",
                     dt, row["tiles_per_s"] or 0.0, " (best)" if is_best else "")
            if stop.signum is not None:
                log.warning("%s at the end of epoch %d: checkpoint saved; train again to resume",
                            signal.Signals(stop.signum).name, epoch)
                raise TrainingInterrupted(stop.signum, latest_checkpoint(run_dir), stop.previous.get(stop.signum))

    return _finish(cfg, run_dir, prog, net, opt, export, validator, val_pass)


def _finish(cfg: RunConfig, run_dir: Path, prog: Progress, net, opt, export, validator, val_pass) -> dict:
    """Export the best epoch's float32 model with thresholds calibrated on the validation fields."""
    best = run_dir / CKPT_DIR / BEST
    if validator is not None and (best / "state.json").is_file():
        load_checkpoint(best, net, opt)  # the exported model is the best epoch's, not the last one's
    export.set_weights(net.get_weights())
    for name in ("model.keras", "model.h5"):  # via a temporary name: a kill mid-save leaves no torn model
        tmp = run_dir / f".tmp-{os.getpid()}-{name}"
        export.save(tmp)
        os.replace(tmp, run_dir / name)
    write_history(run_dir, prog.history)
    plot_curves(run_dir, prog.history)
    start = next((h for h in prog.history if h["epoch"] == 0), {})
    chosen = next((h for h in prog.history if h["epoch"] == prog.best_epoch), prog.history[-1] if prog.history else {})
    metrics = {"epochs": prog.epoch, "final": prog.history[-1] if prog.history else {},
               "best_epoch": prog.best_epoch, "best_score": prog.best_score, "pos_weight": prog.pos_weight,
               "train_fields": prog.train_fields, "val_fields": prog.val_fields,
               "validation": {"starting_model_f1": start.get("val_f1"), "exported_model_f1": chosen.get("val_f1")}}
    from hpc_retrain.validation import MIN_CALIBRATION_CELLS

    if validator is not None and cfg.train.calibrate and validator.n_cells < MIN_CALIBRATION_CELLS:
        log.info("post-processing not calibrated: the validation fields hold %d cells (fewer than %d); "
                 "MISIC's thresholds are kept", validator.n_cells, MIN_CALIBRATION_CELLS)
        metrics["validation"].update(calibrated=False, validation_cells=validator.n_cells)
    elif validator is not None and cfg.train.calibrate:
        th = validator.calibrate(val_pass()[1])
        cfg = cfg.updated(infer__body_threshold=th.body, infer__marker_threshold=th.marker)
        metrics["validation"].update(calibrated_f1=th.f1, body_threshold=th.body, marker_threshold=th.marker)
        log.info("post-processing calibrated on the validation fields: body > %.2f, markers > %.2f (F1@0.5 %.4f, "
                 "%.4f with MISIC's 0.4/0.95)", th.body, th.marker, th.f1, chosen.get("val_f1") or float("nan"))
    cfg.save(run_dir)  # the run's config carries the store's preprocessing and the calibrated thresholds
    _atomic_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_status(run_dir, "finished", epoch=prog.epoch, epochs=cfg.train.epochs)
    log.info("finished %d epoch(s): model of epoch %s in %s (validation F1@0.5 %s -> %s)", prog.epoch,
             prog.best_epoch, run_dir / "model.keras", start.get("val_f1"), chosen.get("val_f1"))
    return metrics
