"""Keras callbacks for a training run: crash-safe backups, TensorBoard, kNN, checkpoints.

Where each file goes is described in `simsiam_tf.rundir`.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.config import write_json_atomic
from simsiam_tf.data import subset
from simsiam_tf.diagnostics import knn

from simsiam_tf.rundir import BEST_DIR, WEIGHTS_FILE


def _save_weights_atomic(model: keras.Model, path: str) -> None:
    """Write weights to a temporary file beside `path`, then rename it into place."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    model.save_weights(tmp, overwrite=True)
    os.replace(tmp, path)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras BackupAndRestore whose files are never left half-written.

    Keras writes the weights and the epoch metadata in place; a kill during the write
    leaves a truncated file that the next start fails to load. Here both are written to
    temporary files and renamed, weights first, so the metadata never names an epoch
    whose weights are not complete.
    """

    def __init__(self, backup_dir: str, restore_dir: str | None = None):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        # Under multi-worker training every worker saves its own copy, but all restore
        # the chief's: the copies are identical, and one source means every worker
        # resumes at the same epoch even if a crash hit between their saves.
        self.restore_dir = restore_dir or backup_dir

    def _load_model(self):
        own = (self._weights_path, self._training_metadata_path)
        self._weights_path = os.path.join(self.restore_dir, os.path.basename(own[0]))
        self._training_metadata_path = os.path.join(self.restore_dir, os.path.basename(own[1]))
        try:
            super()._load_model()
        finally:
            self._weights_path, self._training_metadata_path = own

    def _save_model(self):
        if getattr(self.model, "diverged", None):
            return  # keep the last good state, never a NaN one
        os.makedirs(self.backup_dir, exist_ok=True)
        _save_weights_atomic(self.model, self._weights_path)
        write_json_atomic(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )


def completed_epochs(backup_dir: str) -> int:
    """Epochs finished according to a BackupAndRestore directory (0 if none)."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


class FeatureExtractor:
    """Backbone features (float32 [N, F]) of uint8 images, with the evaluation preprocessing."""

    def __init__(self, backbone: keras.Model, image_size: int, batch_size: int = 256):
        self.backbone = backbone
        self.batch_size = batch_size
        self.dim = backbone.output.shape[-1]

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def embed(x):
            return tf.cast(backbone(aug.eval_preprocess(x, image_size), training=False), tf.float32)

        self._embed = embed

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [
            self._embed(tf.constant(images[i : i + self.batch_size])).numpy()
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros([0, self.dim], np.float32)


def calibrate_batchnorm(backbone: keras.Model, images: np.ndarray, image_size: int, steps: int = 30, batch_size: int = 256):
    """Estimate BatchNorm's moving statistics from data without changing any weight.

    A freshly initialised network has moving mean 0 and variance 1, so its inference-mode
    features are not normalised at all, and kNN on them understates what random features
    can do. Running the backbone in training mode updates only the moving statistics
    (momentum 0.9: after 30 steps, 4% of the initial values remain). Training itself is
    unaffected: in training mode BatchNorm uses batch statistics.
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def forward(x):
        backbone(aug.eval_preprocess(x, image_size), training=True)

    order = np.random.default_rng(0).permutation(len(images))
    for step in range(steps):
        idx = np.take(order, range(step * batch_size, (step + 1) * batch_size), mode="wrap")
        forward(tf.constant(images[np.sort(idx)]))


class KnnProbe:
    """kNN top-1 of the backbone's features: bank = train split, queries = test split."""

    def __init__(self, data, image_size: int, k: int, temperature: float, bank_limit: int = 0):
        bank = subset(len(data.train_images), bank_limit)
        self.bank_images = data.train_images[bank]
        self.bank_labels = data.train_labels[bank]
        self.test_images = data.test_images
        self.test_labels = data.test_labels
        self.num_classes = int(max(self.bank_labels.max(), self.test_labels.max()) + 1)
        self.image_size = image_size
        self.k = k
        self.temperature = temperature
        self._extractors = {}

    def __call__(self, backbone: keras.Model) -> float:
        if id(backbone) not in self._extractors:
            self._extractors[id(backbone)] = FeatureExtractor(backbone, self.image_size)
        extract = self._extractors[id(backbone)]
        bank = extract(self.bank_images)
        queries = extract(self.test_images)
        return knn.knn_accuracy(
            bank, self.bank_labels, queries, self.test_labels, self.num_classes, self.k, self.temperature
        )


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is NaN or infinite.

    It records the step on `model.diverged`, which the backup and the monitor read so
    that nothing written after the divergence replaces the last good checkpoint.
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


class TrainingMonitor(keras.callbacks.Callback):
    """TensorBoard scalars and images, kNN every few epochs, best checkpoint, summary.json.

    TensorBoard tags: train/loss, train/z_std, train/lr (every `log_every` steps and per
    epoch as epoch/*), knn/top1, and images views/pairs (view 1 | view 2 per row).
    The best checkpoint is chosen by kNN top-1, never by the self-supervised loss, which
    a collapsed model minimises.
    """

    def __init__(
        self,
        logdir: str,
        config,
        steps_per_epoch: int,
        knn_probe: KnnProbe | None,
        view_pairs: tuple[np.ndarray, np.ndarray] | None = None,
        previous_summary: dict | None = None,
        is_chief: bool = True,
        initial_epoch: int = 0,
    ):
        super().__init__()
        self.initial_epoch = initial_epoch
        self.logdir = logdir
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.knn_probe = knn_probe
        self.view_pairs = view_pairs
        self.is_chief = is_chief
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "tb")) if is_chief else None
        prev = previous_summary or {}
        self.summary = {
            "epochs_completed": prev.get("epochs_completed", 0),
            "epochs": config.epochs,
            "loss": prev.get("loss"),
            "z_std": prev.get("z_std"),
            "z_std_reference": 1.0 / np.sqrt(config.proj_dim),
            "knn_top1": prev.get("knn_top1"),
            "knn_top1_init": prev.get("knn_top1_init"),
            "knn_top1_best": prev.get("knn_top1_best"),
            "knn_best_epoch": prev.get("knn_best_epoch"),
            "train_images_per_sec": prev.get("train_images_per_sec"),
            "wall_time_s": prev.get("wall_time_s", 0.0),
            "history": prev.get("history", []),
        }
        self._train_time = prev.get("train_time_s", 0.0)
        self._train_images = prev.get("train_images", 0)
        self._wall_before = self.summary["wall_time_s"]
        self._first_epoch = None

    # -- helpers ---------------------------------------------------------------------

    def _scalar(self, tag, value, step):
        if self.writer is not None and value is not None:
            with self.writer.as_default():
                tf.summary.scalar(tag, float(value), step=int(step))

    def _run_knn(self):
        if self.knn_probe is None or not self.is_chief:
            return None
        started = time.time()
        top1 = self.knn_probe(self.model.backbone)
        self._knn_time += time.time() - started
        return top1

    def _write_summary(self):
        if not self.is_chief:
            return
        self.summary["wall_time_s"] = round(self._wall_before + time.time() - self._started, 2)
        self.summary["train_time_s"] = round(self._train_time, 2)
        self.summary["train_images"] = self._train_images
        write_json_atomic(os.path.join(self.logdir, "summary.json"), self.summary)

    # -- Keras hooks -------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._started = time.time()
        self._knn_time = 0.0
        if self.initial_epoch == 0 and self.knn_probe is not None:
            # Every worker calibrates, so that their BatchNorm statistics stay identical.
            calibrate_batchnorm(self.model.backbone, self.knn_probe.bank_images, self.config.image_size)
            if self.is_chief and self.summary["knn_top1_init"] is None:
                top1 = self._run_knn()
                self.summary["knn_top1_init"] = top1
                self._scalar("knn/top1", top1, 0)
                print(f"kNN top-1 before training: {top1:.4f} (random init, BatchNorm statistics from data)", flush=True)
        if self.view_pairs is not None and self.writer is not None:
            x1, x2 = self.view_pairs
            mean, std = np.array(aug.IMAGENET_MEAN), np.array(aug.IMAGENET_STD)
            pairs = np.concatenate([x1, x2], axis=2) * std + mean
            with self.writer.as_default():
                tf.summary.image("views/pairs", np.clip(pairs, 0, 1), step=0, max_outputs=len(pairs))
        self._write_summary()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.time()
        self._knn_time = 0.0

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if logs and step % self.config.log_every_steps == 0:
            for key in ("loss", "z_std", "lr"):
                if key in logs:
                    self._scalar(f"train/{key}", np.ravel(logs[key])[0], step)

    def on_epoch_end(self, epoch, logs=None):
        if getattr(self.model, "diverged", None):
            self.summary["diverged"] = self.model.diverged
            self._write_summary()
            return
        logs = {k: float(np.ravel(v)[0]) for k, v in (logs or {}).items()}
        epoch_time = time.time() - self._epoch_started
        images = self.steps_per_epoch * self.config.batch_size
        # The first epoch of a process includes graph tracing: it counts only while it
        # is the only epoch measured.
        if self._first_epoch is None:
            self._first_epoch = (epoch_time, images)
        else:
            self._train_time += epoch_time
            self._train_images += images
        done = epoch + 1
        step = done * self.steps_per_epoch
        for key in ("loss", "z_std", "lr"):
            self._scalar(f"epoch/{key}", logs.get(key), step)
        record = {"epoch": done, "loss": logs.get("loss"), "z_std": logs.get("z_std"), "lr": logs.get("lr")}

        every = self.config.knn_every
        if self.knn_probe is not None and self.is_chief and every and (done % every == 0 or done == self.config.epochs):
            top1 = self._run_knn()
            record["knn_top1"] = top1
            self.summary["knn_top1"] = top1
            self._scalar("knn/top1", top1, step)
            best = self.summary["knn_top1_best"]
            if best is None or top1 > best:
                self.summary["knn_top1_best"] = top1
                self.summary["knn_best_epoch"] = done
                self._save_best(done, top1)
            print(f"\nepoch {done}: kNN top-1 {top1:.4f}", flush=True)

        self.summary["epochs_completed"] = done
        self.summary["loss"] = logs.get("loss")
        self.summary["z_std"] = logs.get("z_std")
        seconds, counted = self._train_time, self._train_images
        if seconds == 0:
            seconds, counted = self._first_epoch
        self.summary["train_images_per_sec"] = round(counted / seconds, 2)
        self.summary["history"].append(record)
        self._write_summary()
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, logs=None):
        self._write_summary()
        if self.writer is not None:
            self.writer.flush()

    def _save_best(self, epoch, top1):
        if not self.is_chief:
            return
        best_dir = os.path.join(self.logdir, BEST_DIR)
        os.makedirs(best_dir, exist_ok=True)
        _save_weights_atomic(self.model, os.path.join(best_dir, WEIGHTS_FILE))
        write_json_atomic(os.path.join(best_dir, "info.json"), {"epoch": epoch, "knn_top1": top1})
