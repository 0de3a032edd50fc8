"""Retrain MISIC on a training store: a custom Keras loop whose checkpoints make resumes exact, on any backend.

Why a custom loop rather than ``model.fit``: every piece of state that decides the next update is
explicit and saved together, so a run killed at any point continues bit-for-bit (with op determinism), on
TensorFlow, JAX or PyTorch (``compute.backend``; only the gradient step differs, ``backend.make_train_step``):

* weights, BatchNorm statistics and the Dropout layers' seed-generator states (``model.variables``);
* the optimizer's variables (Adam moments, iteration count, loss scale under mixed precision);
* the data order: each epoch's tile permutation and augmentation codes are a pure function of
  ``(seed, epoch)``, so "where we are" is just ``(epoch, step)``;
* the running sums of the epoch's training metrics and the history so far.

Checkpoints (``run_dir/checkpoints``) are written at every epoch end and, on SIGTERM/SIGUSR2, after the
training step in flight finishes ("interrupt" checkpoints, holding the batch position within the epoch), so
a preempted job loses at most one step. Each is written to a temporary folder and renamed into place. The
last ``keep_checkpoints`` epoch-end checkpoints and the best one (``history.replaces_best``: validation
instance F1, equal within one validation cell, then body IoU; epoch 0 included) are kept.

The pieces live beside this loop: :mod:`data` (split, tile order, tile pipeline), :mod:`recipe` (learning
rate and class weights chosen from the store),
:mod:`network` (loss, precision, encoder freezing, compiled steps), :mod:`checkpoints` and :mod:`history`
(history, curves, status).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain.config import STORE_SECTIONS, RunConfig
from hpc_retrain.errors import TrainingInterrupted
from hpc_retrain.io import atomic
from hpc_retrain.io.runfolder import BEST, CKPT_DIR, LOG_FILE, METRICS_FILE, MODEL_FILES, STATE_FILE, latest_checkpoint
from hpc_retrain.prepare import qc
from hpc_retrain.prepare import store as st
from hpc_retrain.training.checkpoints import Progress, check_resume, load_checkpoint, save_checkpoint
from hpc_retrain.training.data import (
    TileReader,
    TrainingError,
    epoch_plan,
    field_tiles,
    make_dataset,
    split_fields,
)
from hpc_retrain.training.history import plot_curves, replaces_best, selection_score, write_history, write_status
from hpc_retrain.training.network import build_model, make_optimizer, make_steps, precision_policy
from hpc_retrain.training.recipe import choose as choose_recipe

log = logging.getLogger(__name__)





# --------------------------------------------------------------------------------------- signals
class _StopOnSignal:
    """SIGTERM/SIGUSR2 and SIGINT (Ctrl-C) only raise a flag: the loop saves after the step in flight and stops.
    A second Ctrl-C stops at once (KeyboardInterrupt), without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._raise_flag)
        return self

    def _raise_flag(self, signum, frame):  # no logging here: a handler may interrupt a logging call
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)



class _RunLog:
    """train.log in the run folder receives this module's records for the duration of a run."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / LOG_FILE)
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
def train(cfg: RunConfig, store: Path, run_dir: Path) -> dict:
    """Train (or resume) into ``run_dir``; returns the final metrics (also written to metrics.json)."""
    from hpc_retrain.inference import backend

    backend.apply(cfg.compute.backend)  # before anything imports keras: a backend that cannot run fails here, up front
    store, run_dir = Path(store), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _RunLog(run_dir):
        try:
            with st.reading(store):  # prepare --overwrite cannot rebuild the store meanwhile
                return _train(cfg, store, run_dir)
        except TrainingInterrupted as e:
            write_status(run_dir, "interrupted", checkpoint=str(e.checkpoint), signal=signal.Signals(e.signum).name,
                         epochs=cfg.train.epochs)
            raise
        except KeyboardInterrupt:  # Ctrl-C outside the epochs' loop (or twice): the last checkpoint stands
            last = latest_checkpoint(run_dir)
            write_status(run_dir, "interrupted", checkpoint=str(last) if last else None, signal="SIGINT",
                         epochs=cfg.train.epochs)
            raise
        except BaseException as e:
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}", epochs=cfg.train.epochs)
            raise


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


def _train(cfg: RunConfig, store: Path, run_dir: Path) -> dict:
    import keras

    from hpc_retrain.inference import backend
    from hpc_retrain.training.validation import FieldValidator

    root = st.open_store(store)
    cfg = store_config(cfg, root, store)
    tc = cfg.train
    if tc.deterministic:
        backend.enable_determinism()
    keras.utils.set_random_seed(cfg.seed)  # before building: Dropout seed generators draw from it
    policy = precision_policy(tc.mixed_precision)
    net, export = build_model(cfg, policy)
    # the learning rate is an optimizer variable: set below from the recipe, or restored by a checkpoint
    opt = make_optimizer(tc.learning_rate or 1e-4, policy)

    generation = st.generation(root)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        prog = load_checkpoint(ckpt, net, opt)
        check_resume(vars(prog), cfg, run_dir)
        if prog.store_generation is not None and prog.store_generation != generation:
            raise TrainingError(_rebuilt(store, run_dir, "since this run started on it"))
        prog.store = prog.store or str(store.resolve())
        prog.store_generation = prog.store_generation or generation
        train_fields, val_fields = np.array(prog.train_fields, int), np.array(prog.val_fields, int)
        pos_w = np.array(prog.pos_weight)
        log.info("resuming from %s: %d epoch(s) done%s", ckpt.name, prog.epoch,
                 f", {prog.step} step(s) into epoch {prog.epoch + 1}" if prog.step else "")
    else:
        usable = st.done_fields(root)
        if len(usable) == 0:
            raise TrainingError(f"{store}: no finished fields; run `hpc-retrain prepare` first")
        train_fields, val_fields = split_fields(usable, tc.val_fraction, cfg.seed)
        chosen = choose_recipe(root, train_fields, tc, str(store))
        log.info("%s", chosen.describe())
        pos_w = np.array(chosen.pos_weight)
        opt.build(net.trainable_variables)
        opt.learning_rate = chosen.learning_rate
        prog = Progress(history=[], train_fields=train_fields.tolist(), val_fields=val_fields.tolist(),
                        pos_weight=pos_w.tolist(), data_seed=cfg.seed, train_config=tc.model_dump(mode="json"),
                        store=str(store.resolve()), store_generation=generation, recipe=chosen.as_dict())
    cfg.save(run_dir)

    def check_store() -> None:
        """The store still holds the tiles this run started on (no ``prepare --overwrite`` meanwhile)."""
        if generation is not None and st.generation(store) != generation:
            raise TrainingError(_rebuilt(store, run_dir, "while this run trained on it"))

    train_tiles, val_tiles = field_tiles(root, train_fields), field_tiles(root, val_fields)
    if len(train_tiles) == 0:
        raise TrainingError(f"{store}: the training fields hold no tiles")
    log.info("store %s: %d training tiles (%d fields), %d validation tiles (%d fields); pos_weight %s; "
             "batch %d; lr %g; init %s; %s; Keras backend %s", store, len(train_tiles), len(train_fields), len(val_tiles),
             len(val_fields), np.round(pos_w, 3).tolist(), tc.batch_size, float(opt.learning_rate), tc.init,
             policy, keras.backend.backend())
    # A weak teacher (dim or fading fluorescence) is a weak judge: validation against it still picks the
    # exported epoch, but never stops the training on its own.
    doubt = qc.teacher_doubt(root, np.concatenate([train_fields, val_fields])) if len(val_tiles) else None
    if doubt:
        log.warning("the fluorescence teacher looks weak (%s): validation against its labels is a weak guide; "
                    "training runs all %d epochs without stopping early", doubt, tc.epochs)
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
            vals += v
            probs.append(p)
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
            if (tc.patience is not None and validator is not None and not doubt and prog.since_best >= tc.patience
                    and prog.epoch >= tc.min_epochs):
                log.info("stopping early: no better epoch by validation F1 and IoU for %d epochs (best: epoch %d)",
                         prog.since_best, prog.best_epoch)
                break
            order, codes, steps = epoch_plan(train_tiles, epoch, cfg.seed, tc.batch_size, tc.steps_per_epoch,
                                             tc.augment, tc.tiles_per_epoch)
            start_step = prog.step
            check_store()
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
                prog.loss_sum += loss * n
                prog.acc_sum += acc * n
                prog.seen += n
                if step % every == 0 or step == steps:
                    log.info("epoch %d/%d step %d/%d loss %.4f", epoch, tc.epochs, step, steps,
                             prog.loss_sum / prog.seen)
                if stop.signum is not None:
                    break
            check_store()  # an epoch that read a rebuilt store is not saved
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
            chosen = next((h for h in prog.history if h["epoch"] == prog.best_epoch), None)
            is_best = replaces_best(row, chosen, prog.history, validator.n_cells if validator else 1)
            if is_best:
                prog.best_score, prog.best_epoch, prog.since_best = selection_score(row), epoch, 0
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

    return _finish(cfg, run_dir, prog, net, opt, export, validator, val_pass, policy, doubt)


def _rebuilt(store: Path, run_dir: Path, when: str) -> str:
    return (f"{store}: the training store was rebuilt (`hpc-retrain prepare --overwrite`) {when}: its tiles, "
            f"fields and settings are no longer those of run {run_dir}; train the new store into a new run folder")


def _finish(cfg: RunConfig, run_dir: Path, prog: Progress, net, opt, export, validator, val_pass,
            policy: str, doubt: str | None) -> dict:
    """Export the best epoch's float32 model with thresholds calibrated on the validation fields."""
    import keras

    best = run_dir / CKPT_DIR / BEST
    if validator is not None and (best / STATE_FILE).is_file():
        load_checkpoint(best, net, opt)  # the exported model is the best epoch's, not the last one's
    export.set_weights(net.get_weights())
    for name in MODEL_FILES:  # via a temporary name: a kill mid-save leaves no torn model
        tmp = atomic.temp_path(run_dir / name)
        export.save(tmp)
        os.replace(tmp, run_dir / name)
    write_history(run_dir, prog.history)
    plot_curves(run_dir, prog.history)
    start = next((h for h in prog.history if h["epoch"] == 0), {})
    chosen = next((h for h in prog.history if h["epoch"] == prog.best_epoch), prog.history[-1] if prog.history else {})
    metrics = {"epochs": prog.epoch, "final": prog.history[-1] if prog.history else {},
               "best_epoch": prog.best_epoch, "best_score": prog.best_score, "pos_weight": prog.pos_weight,
               "recipe": prog.recipe,
               "train_fields": prog.train_fields, "val_fields": prog.val_fields, "precision": policy,
               "backend": keras.backend.backend(),
               "validation": {"starting_model_f1": start.get("val_f1"), "exported_model_f1": chosen.get("val_f1"),
                              "teacher_doubt": doubt}}
    if validator is not None:
        metrics["validation"]["validation_cells"] = validator.n_cells
    from hpc_retrain.training.validation import MIN_CALIBRATION_CELLS

    if validator is not None and cfg.train.calibrate and validator.n_cells < MIN_CALIBRATION_CELLS:
        log.info("post-processing not calibrated: the validation fields hold %d cells (fewer than %d); "
                 "MISIC's thresholds are kept", validator.n_cells, MIN_CALIBRATION_CELLS)
        metrics["validation"].update(calibrated=False)
    elif validator is not None and cfg.train.calibrate:
        th = validator.calibrate(val_pass()[1])
        cfg = cfg.updated(infer__body_threshold=th.body, infer__marker_threshold=th.marker,
                          infer__contour_threshold=th.contour)
        metrics["validation"].update(calibrated_f1=th.f1, body_threshold=th.body, marker_threshold=th.marker,
                                     contour_threshold=th.contour)
        where = "in a trough of the contour (MISIC's)" if th.contour >= 1 else f"where contour < {th.contour:.2f}"
        log.info("post-processing calibrated on the validation fields: body > %.2f, markers > %.2f %s (F1@0.5 "
                 "%.4f, %.4f with MISIC's 0.4/0.95)", th.body, th.marker, where, th.f1,
                 chosen.get("val_f1") or float("nan"))
    cfg.save(run_dir)  # the run's config carries the store's preprocessing and the calibrated thresholds
    atomic.write_json(run_dir / METRICS_FILE, metrics)
    write_status(run_dir, "finished", epoch=prog.epoch, epochs=cfg.train.epochs)
    log.info("finished %d epoch(s): model of epoch %s in %s (validation F1@0.5 %s -> %s)", prog.epoch,
             prog.best_epoch, run_dir / "model.keras", start.get("val_f1"), chosen.get("val_f1"))
    return metrics
