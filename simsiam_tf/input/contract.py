"""What a training input is: the contract memory, stream and the tf.data service keep.

`training.run` and `evaluate.py` use inputs only through these two protocols; which of
the three they hold (`kind`) is recorded in config.json and summary.json and never
branched on.

An input reads the splits its dataset's catalog decided (`catalog.decide_splits`):
the same training, validation and test images on every path. Its training batches are
in the one batch format (`batches`): uint8 [B, 2, S, S, 3], two views per image.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np


class EvalSplit(Protocol):
    """One split for evaluation: its images in a fixed order, in the form
    `augment.eval_preprocess` takes (uint8 [R, R, 3]), with their labels."""

    labelled: bool

    def __len__(self) -> int:
        """Images in the split, before any fails to decode."""

    def batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(uint8 images, int32 labels or None) in order; images that cannot be decoded
        are left out and counted in `skipped`."""

    def calibration_batches(self, steps: int, batch_size: int) -> Iterator[np.ndarray]:
        """`steps` batches of its images, for BatchNorm statistics (seed 0, wrapping)."""

    def materialize(self) -> tuple[np.ndarray, np.ndarray | None]:
        """All of it: (uint8 [N, R, R, 3], labels or None)."""

    @property
    def skipped(self) -> int:
        """Images of the split that could not be decoded in the last full pass."""


@dataclasses.dataclass
class RunContext:
    """What an input's callbacks need to know of the run."""

    logdir: str
    backup_dir: str
    initial_epoch: int
    previous: dict
    chief: bool
    grace_s: float = 60.0


class TrainingInput(Protocol):
    """A dataset as the trainer reads it.

    Attributes:
        kind: "memory", "stream" or "service".
        name: the dataset as shown to users.
        num_train: images in the training split.
        class_names: names of the label ids ([] when unlabelled).
        skipped: files left out before training because they could not be decoded.
    """

    kind: str
    name: str
    num_train: int
    class_names: list[str]
    skipped: list[str]

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        """Steps every worker runs per epoch (the last partial batch is dropped)."""

    def batches(self, strategy, global_batch: int, spec, seed: int, epochs: int, initial_epoch: int = 0,
                augment_on: str = "host"):
        """The training batches of epochs initial_epoch..epochs-1 for `strategy`, in the
        batch format; every random choice follows from (seed, epoch, image)."""

    def eval_split(self, name: str, limit: int = 0) -> EvalSplit | None:
        """"train", "val" or "test" (with `limit`, a fixed random subset of that many),
        or None when the dataset has no such split."""

    def callbacks(self, run: RunContext) -> list:
        """The Keras callbacks this input needs beside training (what it watches and
        reports), in the order they run; they add to each epoch's logs."""

    def preview(self, spec, seed: int, count: int = 8) -> np.ndarray | None:
        """The fully augmented views of the first `count` images of the first epoch,
        uint8 [count, 2, S, S, 3], or None when there are fewer images."""

    def shards(self) -> list[str]:
        """The TFRecord files it reads (to name a damaged one after a DataLossError)."""


def labelled(training_input: TrainingInput, name: str) -> bool:
    """Whether `training_input` has a labelled split `name` with images in it."""
    split = training_input.eval_split(name)
    return split is not None and split.labelled and len(split) > 0


def can_monitor_knn(training_input: TrainingInput) -> bool:
    """kNN monitoring needs labelled train and test splits."""
    return labelled(training_input, "train") and labelled(training_input, "test")
