"""Keras callbacks for a training run: crash-safe backups, kNN, best checkpoint,
TensorBoard, summary.json, one job each.

Where each file goes is described in `simsiam_tf.rundir`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.config import write_json_atomic
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

    def on_epoch_end(self, epoch, logs=None):
        # Saved by `SaveBackup`, placed after the callbacks that write summary.json, so
        # the summary is never behind the backup (a kill between the two would lose the
        # epoch's record from the resumed run's history); restored here at train begin,
        # before any callback evaluates the model.
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0

    def _save_model(self):
        if getattr(self.model, "diverged", None):
            return  # keep the last good state, never a NaN one
        os.makedirs(self.backup_dir, exist_ok=True)
        _save_weights_atomic(self.model, self._weights_path)
        write_json_atomic(
            self._training_metadata_path,
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )


class SaveBackup(keras.callbacks.Callback):
    """Writes `backup`'s state at the end of every epoch (see AtomicBackupAndRestore)."""

    def __init__(self, backup: AtomicBackupAndRestore):
        super().__init__()
        self.backup = backup

    def on_epoch_end(self, epoch, logs=None):
        self.backup._save_model()


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

    def embed_split(self, split) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and labels of an evaluation split (`data.ArrayEvalImages` or
        `stream.StreamEvalImages`), batch by batch, so a streamed split is never held."""
        features, labels = [], []
        for images, batch_labels in split.batches(self.batch_size):
            features.append(self._embed(tf.constant(images)).numpy())
            labels.append(batch_labels)
        if not features:
            return np.zeros([0, self.dim], np.float32), None
        return np.concatenate(features), None if labels[0] is None else np.concatenate(labels)


def calibrate_batchnorm(backbone: keras.Model, split, image_size: int, steps: int = 30, batch_size: int = 256):
    """Estimate BatchNorm's moving statistics from data without changing any weight.

    A freshly initialised network has moving mean 0 and variance 1, so its inference-mode
    features are not normalised at all, and kNN on them understates what random features
    can do. Running the backbone in training mode updates only the moving statistics
    (momentum 0.9: after 30 steps, 4% of the initial values remain). Training itself is
    unaffected: in training mode BatchNorm uses batch statistics.

    `split` is an evaluation split (`calibration_batches`).
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def forward(x):
        backbone(aug.eval_preprocess(x, image_size), training=True)

    for images in split.calibration_batches(steps, batch_size):
        forward(tf.constant(images))


class KnnProbe:
    """kNN top-1 of the backbone's features: bank = train split, queries = the test
    split and, when there is one, the validation split.

    `bank` and the query splits are evaluation splits (`data.ArrayEvalImages` in memory,
    `stream.StreamEvalImages` read from disk at every evaluation).
    """

    def __init__(self, bank, test, image_size: int, k: int, temperature: float, num_classes: int | None = None,
                 val=None):
        self.bank = bank
        self.queries = {"test": test} if val is None else {"val": val, "test": test}
        self.num_classes = num_classes
        self.image_size = image_size
        self.k = k
        self.temperature = temperature
        self._extractors = {}

    def __call__(self, backbone: keras.Model) -> dict[str, float]:
        """Top-1 per query split: {"test": ..., "val": ...} (no "val" without one)."""
        if id(backbone) not in self._extractors:
            self._extractors[id(backbone)] = FeatureExtractor(backbone, self.image_size)
        extract = self._extractors[id(backbone)]
        bank, bank_labels = extract.embed_split(self.bank)
        top1 = {}
        for name, split in self.queries.items():
            queries, labels = extract.embed_split(split)
            num_classes = max(self.num_classes or 0, int(max(bank_labels.max(), labels.max())) + 1)
            top1[name] = knn.knn_accuracy(bank, bank_labels, queries, labels, num_classes, self.k, self.temperature)
        return top1


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
    validation split (when the probe has one).

    Before training, BatchNorm statistics are first estimated from the bank
    (`calibrate_batchnorm`), so "before" measures the random network fairly. Every
    worker calibrates, so that their BatchNorm statistics stay identical; only the chief
    evaluates.
    """

    def __init__(self, probe: KnnProbe, every: int, epochs: int, initial_epoch: int = 0, is_chief: bool = True,
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
            print(f"kNN top-1 before training: {self.initial_top1:.4f} on the test split (random init, BatchNorm "
                  "statistics from data)", flush=True)

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
            print(line, flush=True)


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the weights with the best `logs["knn_val_top1"]` in checkpoints/best/.

    Chosen on the validation split, never on the test split it is reported on, and never
    by the self-supervised loss, which a collapsed model minimises. Adds
    `knn_val_top1_best`, `knn_best_epoch` and `knn_top1_val_selected` (the chosen
    checkpoint's test top-1) to every epoch's logs once a result exists.
    """

    def __init__(self, logdir: str, is_chief: bool = True, previous: dict | None = None):
        super().__init__()
        self.logdir = logdir
        self.is_chief = is_chief
        previous = previous or {}
        self.best = previous.get("knn_val_top1_best")
        self.best_epoch = previous.get("knn_best_epoch") if self.best is not None else None
        self.test_at_best = previous.get("knn_top1_val_selected") if self.best is not None else None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or _diverged(self.model):
            return
        val = logs.get("knn_val_top1")
        if val is not None and (self.best is None or val > self.best):
            self.best, self.best_epoch, self.test_at_best = val, epoch + 1, logs.get("knn_top1")
            if self.is_chief:
                best_dir = os.path.join(self.logdir, BEST_DIR)
                os.makedirs(best_dir, exist_ok=True)
                _save_weights_atomic(self.model, os.path.join(best_dir, WEIGHTS_FILE))
                write_json_atomic(
                    os.path.join(best_dir, "info.json"),
                    {"epoch": epoch + 1, "selected_on": "val", "knn_val_top1": val, "knn_top1": self.test_at_best},
                )
        if self.best is not None:
            logs["knn_val_top1_best"] = self.best
            logs["knn_best_epoch"] = self.best_epoch
            logs["knn_top1_val_selected"] = self.test_at_best


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard scalars and the preview of augmented views.

    Tags: train/loss, train/z_std, train/lr every `log_every` steps; epoch/loss,
    epoch/z_std, epoch/lr; knn/test_top1 (the model of that epoch; step 0 = before
    training), knn/val_top1, and knn/test_top1_val_selected (the test top-1 of the
    checkpoint the validation split has chosen so far); data/skipped_images when files
    could not be decoded; images views/pairs (view 1 | view 2 per row). Written by the
    chief only.
    """

    def __init__(self, logdir: str, steps_per_epoch: int, log_every: int, view_pairs=None,
                 knn: KnnMonitor | None = None, is_chief: bool = True):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        self.view_pairs = view_pairs
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
        if self.view_pairs is not None:
            x1, x2 = self.view_pairs
            mean, std = np.array(aug.IMAGENET_MEAN), np.array(aug.IMAGENET_STD)
            pairs = np.concatenate([x1, x2], axis=2) * std + mean
            with self.writer.as_default():
                tf.summary.image("views/pairs", np.clip(pairs, 0, 1), step=0, max_outputs=len(pairs))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if logs and step % self.log_every == 0:
            for key in ("loss", "z_std", "lr"):
                if key in logs:
                    self._scalar(f"train/{key}", np.ravel(logs[key])[0], step)

    def on_epoch_end(self, epoch, logs=None):
        if _diverged(self.model) or self.writer is None:
            return
        logs = logs or {}
        step = (epoch + 1) * self.steps_per_epoch
        for key in ("loss", "z_std", "lr"):
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


class SkippedImages(keras.callbacks.Callback):
    """Counts images the input could not decode while training (`skipped_in_training`),
    as `logs["skipped_images"]`, with one warning line whenever the count grows."""

    def __init__(self, training_input, previous: int = 0):
        super().__init__()
        self.input = training_input
        self.previous = previous  # from the summary of the run being resumed
        self._warned = 0

    def on_epoch_end(self, epoch, logs=None):
        now = self.input.skipped_in_training()
        if now > self._warned:
            print(
                f"\nwarning: {now - self._warned} image(s) could not be decoded in epoch {epoch + 1} and were "
                f"skipped ({now} so far); the epoch was topped up with other images",
                file=sys.stderr,
                flush=True,
            )
            self._warned = now
        if logs is not None:
            logs["skipped_images"] = self.previous + now


class ServiceDelivery(keras.callbacks.Callback):
    """Images the tf.data service did not deliver, per epoch of the data stream, as
    `logs["images_missed"]` (the run's total), with one warning line per short epoch.

    The service streams the whole run without breaks (`data_service`), so the images of
    a data epoch reach the trainer a little before or after the training epoch of the
    same number. A data epoch is counted once all its images have arrived, or once a
    whole training epoch has gone by in which none of its images arrived while later
    ones did: images still on their way would have kept arriving. Missed images were
    held by a worker that stopped, or could not be decoded.
    """

    def __init__(self, service_input, initial_epoch: int, previous: int = 0, is_chief: bool = True):
        super().__init__()
        self.input = service_input
        self.next_epoch = initial_epoch  # the first data epoch not yet counted (0-based)
        self.missed = previous
        self.is_chief = is_chief
        self._before = None  # images received per data epoch at the previous epoch end

    def on_train_begin(self, logs=None):
        self.input.reset_delivered()

    def count_closed(self, strategy=None) -> list[tuple[int, int]]:
        """(data epoch, images received) of the data epochs that closed since the last call."""
        received = self.input.delivered(strategy)
        if received is None:
            return []
        closed = []
        while self.next_epoch < len(received) - 1:
            d = self.next_epoch
            complete = received[d] >= self.input.num_train
            stalled = self._before is not None and received[d] == self._before[d] and received[d + 1:].sum() > 0
            if not (complete or stalled):
                break
            closed.append((d, int(received[d])))
            self.next_epoch += 1
        self._before = received.copy()
        return closed

    def on_epoch_end(self, epoch, logs=None):
        total = self.input.num_train
        for data_epoch, got in self.count_closed(self.model.distribute_strategy):
            self.missed += total - got
            if got < total and self.is_chief:
                print(
                    f"\nwarning: the tf.data service delivered {got:,} of the {total:,} images of epoch "
                    f"{data_epoch + 1}: {total - got:,} missed (held by a service worker that stopped, or "
                    "undecodable); training went on with the rest",
                    file=sys.stderr,
                    flush=True,
                )
        if logs is not None:
            logs["images_missed"] = self.missed


class DispatcherWatchdog(keras.callbacks.Callback):
    """Stops the process when the tf.data service dispatcher has been unreachable for
    `grace_s` seconds during training.

    Without its dispatcher the service hands out no new work and TensorFlow's client
    waits for it for an hour inside `fit`, where Python cannot interrupt it; a dispatcher
    back within the grace period (fault-tolerant mode recovers its jobs) lets training go
    on untouched. Otherwise the process prints one line and exits with code
    `data_service.EXIT_DISPATCHER_LOST`: checkpoints are written by rename, so the last
    one is intact, and `--resume` continues once the dispatcher is back.
    """

    def __init__(self, target: str, grace_s: float, backup_dir: str, logdir: str, poll_s: float = 2.0, exit=os._exit):
        super().__init__()
        self.target, self.grace_s, self.poll_s = target, grace_s, poll_s
        self.backup_dir, self.logdir = backup_dir, logdir
        self._exit = exit
        self._stop = threading.Event()
        self._thread = None

    def _watch(self):
        from simsiam_tf import data_service

        _, host, port = data_service.split_target(self.target)
        lost_since = None
        while not self._stop.wait(self.poll_s):
            if data_service.reachable(host, port):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= self.grace_s:
                print(
                    f"\ntrain.py: error: the tf.data service dispatcher at {host}:{port} has been unreachable "
                    f"for {self.grace_s:.0f} s; training stopped. The last complete checkpoint (epoch "
                    f"{completed_epochs(self.backup_dir)}) is intact in {self.backup_dir}. Restart the "
                    f"dispatcher with the same --work-dir, then run: python train.py --resume {self.logdir}",
                    file=sys.stderr,
                    flush=True,
                )
                sys.stdout.flush()
                self._exit(data_service.EXIT_DISPATCHER_LOST)
                return

    def on_train_begin(self, logs=None):
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="dispatcher-watchdog")
        self._thread.start()

    def on_train_end(self, logs=None):
        self._stop.set()


class RunSummary(keras.callbacks.Callback):
    """summary.json, rewritten atomically after every epoch.

    Fields: epochs_completed, epochs, loss, z_std, z_std_reference; kNN top-1 on the
    test split of the last model (knn_top1), of the random initial one (knn_top1_init)
    and of the checkpoint chosen on the validation split (knn_top1_val_selected, from
    epoch knn_best_epoch, where the validation top-1 was knn_val_top1_best); the last
    model's validation top-1 (knn_val_top1); skipped_images, train_images_per_sec,
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
