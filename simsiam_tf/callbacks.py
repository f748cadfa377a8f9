"""Keras callbacks that watch and report a training run: divergence, collapse, kNN,
TensorBoard and summary.json, one job each.

Checkpoints are `checkpoints`'s; what an input watches (undecodable images, the tf.data
service's deliveries) comes with the input (`input.contract.TrainingInput.callbacks`).
"""

from __future__ import annotations

import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf.config import write_json_atomic
from simsiam_tf.diagnostics import knn
from simsiam_tf.diagnostics.embed import calibrate_batchnorm


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is NaN or infinite.

    It records the step on `model.diverged`, which the backup and the other callbacks
    read so that nothing written after the divergence replaces the last good checkpoint.
    Keras's TerminateOnNaN stops too, but lets the epoch-end callbacks save NaN weights.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.model.diverged = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float(np.ravel((logs or {}).get("loss", 0.0))[0])
        if not np.isfinite(loss) and not self.model.diverged:
            self.model.diverged = {
                "step": int(self.model.optimizer.iterations.numpy()),
                "epoch": self._epoch + 1,
                "loss": str(loss),
            }
            self.model.stop_training = True


# ---------------------------------------------------------------------------
# What a run reports. One callback per job; they talk through the epoch's `logs`
# dict, which Keras hands to each callback in turn: EpochTimer adds `epoch_seconds`,
# KnnMonitor `knn_top1` (test split) and `knn_val_top1` (validation split),
# BestCheckpoint `knn_val_top1_best`, `knn_best_epoch` and `knn_top1_val_selected`,
# SkippedImages `skipped_images`, and TensorBoardLogger and RunSummary, listed after
# them, record what they find (`training.reporting_callbacks` builds the list).
#
# The protocol: the test split is measured, never used to choose. The best checkpoint
# is the one with the best kNN on the validation split, held out of training; its test
# accuracy (`knn_top1_val_selected`) is reported beside the last model's (`knn_top1`).


def _diverged(model) -> bool:
    return bool(getattr(model, "diverged", None))


class CollapseWarning(keras.callbacks.Callback):
    """One warning when the training z_std stays far below 1/sqrt(d): collapse.

    The threshold comes from the measured runs (docs/collapse.md, docs/contrastive.md):
    healthy SimSiam and SimCLR runs keep the training batches' z_std at 0.97-1.0 of
    1/sqrt(d) from the first epoch; runs without the stop-gradient fall to 0.20-0.55 of
    it and stay there. Below `fraction` = 0.6 of 1/sqrt(d) for `patience` epochs in a
    row, it prints one line and writes it to TensorBoard as text (warnings/collapse).
    """

    def __init__(self, logdir: str, proj_dim: int, is_chief: bool = True, fraction: float = 0.6, patience: int = 3):
        super().__init__()
        self.logdir = logdir
        self.reference = 1.0 / np.sqrt(proj_dim)
        self.is_chief = is_chief
        self.fraction = fraction
        self.patience = patience
        self._below = 0
        self._warned = False

    def on_epoch_end(self, epoch, logs=None):
        z_std = (logs or {}).get("z_std")
        if z_std is None or self._warned:
            return
        self._below = self._below + 1 if float(z_std) < self.fraction * self.reference else 0
        if self._below < self.patience:
            return
        self._warned = True
        message = (
            f"warning: the representation may have collapsed: training z_std {float(z_std):.4f} has stayed below "
            f"{self.fraction} x 1/sqrt(d) = {self.fraction * self.reference:.4f} for {self.patience} epochs "
            f"(healthy runs stay near 1/sqrt(d) = {self.reference:.4f}): the outputs are close to one direction and "
            "carry little information about the image. Check that the stop-gradient is on (no --no-stop-gradient), "
            "try a lower --lr in a new run, and see docs/collapse.md"
        )
        print("\n" + message, file=sys.stderr, flush=True)
        if self.is_chief:
            writer = tf.summary.create_file_writer(os.path.join(self.logdir, "tb"))
            with writer.as_default():
                tf.summary.text("warnings/collapse", message, step=int(self.model.optimizer.iterations.numpy()))
            writer.close()

    @staticmethod
    def written(run_dir: str) -> list[tuple[int, str]]:
        """(step, message) of every collapse warning in RUN_DIR/tb, oldest first."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"tensors": 0})
        events.Reload()
        if "warnings/collapse" not in events.Tags()["tensors"]:
            return []
        return [(e.step, tf.make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors("warnings/collapse")]


class EpochTimer(keras.callbacks.Callback):
    """`logs["epoch_seconds"]`: the epoch's training time, measured before the
    evaluations that later callbacks run at its end."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.time() - self._started


class KnnMonitor(keras.callbacks.Callback):
    """kNN top-1 of the backbone before training and every `every` epochs (and after the
    last), as `logs["knn_top1"]` on the test split and `logs["knn_val_top1"]` on the
    validation split (when the probe has one). Test or validation images that could not
    be decoded are left out of the accuracy, and said beside it.

    Before training, BatchNorm statistics are first estimated from the bank
    (`calibrate_batchnorm`), so "before" measures the random network fairly. Every
    worker calibrates, so that their BatchNorm statistics stay identical; only the chief
    evaluates.
    """

    def __init__(self, probe: knn.KnnProbe, every: int, epochs: int, initial_epoch: int = 0, is_chief: bool = True,
                 initial_top1: float | None = None):
        super().__init__()
        self.probe = probe
        self.every = every
        self.epochs = epochs
        self.initial_epoch = initial_epoch
        self.is_chief = is_chief
        self.initial_top1 = initial_top1

    def _evaluate(self) -> dict[str, float]:
        return self.probe(self.model.backbone)

    def on_train_begin(self, logs=None):
        if self.initial_epoch != 0:
            return
        calibrate_batchnorm(self.model.backbone, self.probe.bank, self.probe.image_size)
        if self.is_chief and self.initial_top1 is None:
            self.initial_top1 = self._evaluate()["test"]
            print(f"kNN top-1 before training: {self.initial_top1:.4f} on the test split{self._skipped()} (random "
                  "init, BatchNorm statistics from data)", flush=True)

    def _skipped(self) -> str:
        """' (N test images could not be decoded)', or '' when every image decoded."""
        lost = [f"{n} {name} image(s)" for name, n in self.probe.skipped().items() if n]
        return f" ({' and '.join(lost)} could not be decoded and are not counted)" if lost else ""

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if not self.is_chief or _diverged(self.model) or logs is None:
            return
        if self.every and (done % self.every == 0 or done == self.epochs):
            top1 = self._evaluate()
            logs["knn_top1"] = top1["test"]
            line = f"\nepoch {done}: kNN top-1 {top1['test']:.4f} test"
            if "val" in top1:
                logs["knn_val_top1"] = top1["val"]
                line += f", {top1['val']:.4f} validation"
            print(line + self._skipped(), flush=True)


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard scalars and the preview of augmented views.

    Tags: train/loss, train/z_std, train/lr every `log_every` steps; epoch/loss,
    epoch/z_std, epoch/lr (and train/loss_scale, epoch/loss_scale under float16); knn/test_top1 (the model of that epoch; step 0 = before
    training), knn/val_top1, and knn/test_top1_val_selected (the test top-1 of the
    checkpoint the validation split has chosen so far); data/skipped_images when files
    could not be decoded; images views/pairs (view 1 | view 2 per row, from a batch in
    the input's batch format). Written by the chief only.
    """

    def __init__(self, logdir: str, steps_per_epoch: int, log_every: int, views=None,
                 knn: KnnMonitor | None = None, is_chief: bool = True):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        self.views = views
        self.knn = knn
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "tb")) if is_chief else None

    def _scalar(self, tag, value, step):
        if self.writer is not None and value is not None:
            with self.writer.as_default():
                tf.summary.scalar(tag, float(value), step=int(step))

    def on_train_begin(self, logs=None):
        if self.writer is None:
            return
        if self.knn is not None and self.knn.initial_epoch == 0:
            self._scalar("knn/test_top1", self.knn.initial_top1, 0)
        if self.views is not None:
            pairs = np.concatenate([self.views[:, 0], self.views[:, 1]], axis=2)
            with self.writer.as_default():
                tf.summary.image("views/pairs", pairs, step=0, max_outputs=len(pairs))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if logs and step % self.log_every == 0:
            for key in ("loss", "z_std", "lr", "loss_scale"):
                if key in logs:
                    self._scalar(f"train/{key}", np.ravel(logs[key])[0], step)

    def on_epoch_end(self, epoch, logs=None):
        if _diverged(self.model) or self.writer is None:
            return
        logs = logs or {}
        step = (epoch + 1) * self.steps_per_epoch
        for key in ("loss", "z_std", "lr", "loss_scale"):
            if key in logs:
                self._scalar(f"epoch/{key}", np.ravel(logs[key])[0], step)
        self._scalar("knn/test_top1", logs.get("knn_top1"), step)
        self._scalar("knn/val_top1", logs.get("knn_val_top1"), step)
        self._scalar("knn/test_top1_val_selected", logs.get("knn_top1_val_selected"), step)
        if logs.get("skipped_images"):
            self._scalar("data/skipped_images", logs["skipped_images"], step)
        if logs.get("images_missed") is not None:
            self._scalar("data/images_missed", logs["images_missed"], step)
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()


class RunSummary(keras.callbacks.Callback):
    """summary.json, rewritten atomically after every epoch.

    Fields: epochs_completed, epochs, loss, z_std, z_std_reference; kNN top-1 on the
    test split of the last model (knn_top1), of the random initial one (knn_top1_init)
    and of the checkpoint chosen on the validation split (knn_top1_val_selected, from
    epoch knn_best_epoch, where the validation top-1 was knn_val_top1_best); the last
    model's validation top-1 (knn_val_top1); precision and xla as this launch trains;
    skipped_images, train_images_per_sec,
    train_time_s, train_images, wall_time_s, and `history` (one record per epoch). On
    resume it continues the previous summary.
    """

    def __init__(self, logdir: str, config, steps_per_epoch: int, knn: KnnMonitor | None = None,
                 previous_summary: dict | None = None, is_chief: bool = True, input_kind: str | None = None):
        super().__init__()
        self.logdir = logdir
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.knn = knn
        self.is_chief = is_chief
        prev = previous_summary or {}
        self.summary = {
            "epochs_completed": prev.get("epochs_completed", 0),
            "epochs": config.epochs,
            "input": input_kind,
            # As this launch trains (a resumed run may have changed --xla).
            "precision": config.precision,
            "xla": config.xla,
            "loss": prev.get("loss"),
            "z_std": prev.get("z_std"),
            "z_std_reference": 1.0 / np.sqrt(config.proj_dim),
            "knn_top1": prev.get("knn_top1"),
            "knn_top1_init": prev.get("knn_top1_init"),
            "knn_val_top1": prev.get("knn_val_top1"),
            "knn_val_top1_best": prev.get("knn_val_top1_best"),
            "knn_best_epoch": prev.get("knn_best_epoch"),
            "knn_top1_val_selected": prev.get("knn_top1_val_selected"),
            "skipped_images": prev.get("skipped_images", 0),
            "train_images_per_sec": prev.get("train_images_per_sec"),
            "wall_time_s": prev.get("wall_time_s", 0.0),
            "history": prev.get("history", []),
        }
        self._train_time = prev.get("train_time_s", 0.0)
        self._train_images = prev.get("train_images", 0)
        self._wall_before = self.summary["wall_time_s"]
        self._first_epoch = None

    def _write(self):
        if not self.is_chief:
            return
        self.summary["wall_time_s"] = round(self._wall_before + time.time() - self._started, 2)
        self.summary["train_time_s"] = round(self._train_time, 2)
        self.summary["train_images"] = self._train_images
        write_json_atomic(os.path.join(self.logdir, "summary.json"), self.summary)

    def on_train_begin(self, logs=None):
        self._started = time.time()
        if self.knn is not None and self.summary["knn_top1_init"] is None:
            self.summary["knn_top1_init"] = self.knn.initial_top1
        self._write()

    def on_epoch_end(self, epoch, logs=None):
        if _diverged(self.model):
            self.summary["diverged"] = self.model.diverged
            self._write()
            return
        logs = logs or {}
        value = lambda key: None if logs.get(key) is None else float(np.ravel(logs[key])[0])
        # The first epoch of a process includes graph tracing: it counts only while it
        # is the only epoch measured.
        epoch_time = logs["epoch_seconds"]
        images = self.steps_per_epoch * self.config.batch_size
        if self._first_epoch is None:
            self._first_epoch = (epoch_time, images)
        else:
            self._train_time += epoch_time
            self._train_images += images
        record = {"epoch": epoch + 1, "loss": value("loss"), "z_std": value("z_std"), "lr": value("lr")}
        if logs.get("loss_scale") is not None:  # float16: the dynamic loss scale at the epoch's end
            record["loss_scale"] = value("loss_scale")
        for key in ("knn_top1", "knn_val_top1"):
            if logs.get(key) is not None:
                record[key] = value(key)
                self.summary[key] = record[key]
        keys = ("knn_val_top1_best", "knn_best_epoch", "knn_top1_val_selected", "skipped_images", "images_missed")
        for key in keys:
            if logs.get(key) is not None:
                self.summary[key] = logs[key]
        self.summary["epochs_completed"] = epoch + 1
        self.summary["loss"] = record["loss"]
        self.summary["z_std"] = record["z_std"]
        seconds, counted = self._train_time, self._train_images
        if seconds == 0:
            seconds, counted = self._first_epoch
        self.summary["train_images_per_sec"] = round(counted / seconds, 2)
        self.summary["history"].append(record)
        self._write()

    def on_train_end(self, logs=None):
        self._write()
