"""Checkpoints of a run: the crash-safe backup every epoch, and the best checkpoint
chosen on the validation split. Where each file goes is `simsiam_tf.rundir`'s."""

from __future__ import annotations

import os

import keras

from simsiam_tf.config import write_json_atomic
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
    """Writes `backup`'s state at the end of every whole epoch (see AtomicBackupAndRestore).

    An epoch cut short is not one: saving it would make `--resume` skip the steps it
    lacks. When the input ran out of data (Keras ends the epoch quietly, calls the
    epoch-end callbacks as if it were complete, and would start the input again from
    its first batch in the next epoch), training stops here and `cut_short` records
    (epoch, steps it trained), the epoch 1-based. An epoch another callback stopped
    (a divergence) is only left unsaved.
    """

    def __init__(self, backup: AtomicBackupAndRestore, steps_per_epoch: int):
        super().__init__()
        self.backup = backup
        self.steps_per_epoch = steps_per_epoch
        self.cut_short = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if self._steps < self.steps_per_epoch:
            if not self.model.stop_training:
                self.cut_short = (epoch + 1, self._steps)
                self.model.stop_training = True
            return
        self.backup._save_model()


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
        if logs is None or getattr(self.model, "diverged", None):
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
