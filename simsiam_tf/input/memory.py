"""The in-memory input (`--input memory`): every image decoded once and held as uint8.

Each split's members are decoded once into the evaluation form
(`augment.storage_resize_uint8`: the image itself below 96 px, the centre square at
the evaluation side above). Every epoch then reads them in the epoch's order and makes
each image's two views from its seed (`order`), exactly as the stream does from the
files: below 96 px, where the stored image is the original, the two paths give the
same views. Fast, and the right input for small images that fit in memory.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import tensorflow as tf

from simsiam_tf.errors import UsageError
from simsiam_tf.input import batches, catalog, decode, order


class ArrayEvalSplit:
    """One split held in memory (`contract.EvalSplit`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, skipped: int = 0):
        self.images = images
        self.labels = labels
        self.labelled = labels is not None
        self._skipped = skipped

    def __len__(self) -> int:
        return len(self.images) + self._skipped

    @property
    def skipped(self) -> int:
        return self._skipped

    def batches(self, batch_size: int = 256):
        for start in range(0, len(self.images), batch_size):
            labels = None if self.labels is None else self.labels[start : start + batch_size]
            yield self.images[start : start + batch_size], labels

    def calibration_batches(self, steps: int, batch_size: int):
        """`steps` batches of random images (sorted within a batch), seed 0, with wrap-around."""
        shuffled = np.random.default_rng(0).permutation(len(self.images))
        for step in range(steps):
            idx = np.take(shuffled, range(step * batch_size, (step + 1) * batch_size), mode="wrap")
            yield self.images[np.sort(idx)]

    def materialize(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.images, self.labels


class MemoryInput:
    """A dataset decoded into memory, as a training input (`contract.TrainingInput`)."""

    kind = "memory"

    def __init__(self, source, splits: dict[str, catalog.Members], image_size: int, verbose: bool = True):
        self.name = source.name
        self.class_names = source.class_names
        self.image_size = image_size
        self.skipped: list[str] = []
        self._splits = {}
        started = time.time()
        for name, members in splits.items():
            images, labels, positions, failed = source.images(members.stored, members.indices, image_size)
            self.skipped += failed
            self._splits[name] = (images, labels if members.labelled else None, members.indices[positions], members)
        if verbose and source.streamable:
            total = sum(len(m) for m in splits.values())
            print(f"Decoded {total:,} images of {self.name} in {time.time() - started:.0f} s", file=sys.stderr)
        self.num_train = len(self._splits["train"][0])
        if self.num_train == 0:
            raise UsageError(f"none of the {len(splits['train'])} training images of {self.name} could be decoded")

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        return self.num_train // global_batch

    def eval_split(self, name: str, limit: int = 0) -> ArrayEvalSplit | None:
        """The split's decoded images; with `limit`, those of a fixed random subset of its
        members (`catalog.subset`, the stream's subset too)."""
        if name not in self._splits:
            return None
        images, labels, kept, members = self._splits[name]
        chosen = members.indices[catalog.subset(len(members), limit)]
        rows = np.flatnonzero(np.isin(kept, chosen))
        return ArrayEvalSplit(images[rows], None if labels is None else labels[rows], len(chosen) - len(rows))

    def worker_batches(self, global_batch: int, worker: int, workers: int, spec, seed: int, epochs: int,
                       initial_epoch: int = 0, augment_on: str = "host") -> tf.data.Dataset:
        """One worker's share (rows worker*local.. of every global batch) of the training
        batches of epochs initial_epoch..epochs-1, in the batch format."""
        steps = self.steps_per_epoch(global_batch)
        if steps < 1:
            raise UsageError(
                f"--batch-size {global_batch} is larger than the {self.num_train} training images; "
                f"use --batch-size {max(2, self.num_train // 2)} or less"
            )
        local = global_batch // workers
        images, _, kept, _ = self._splits["train"]
        stored, ids, n = tf.constant(images), tf.constant(kept), self.num_train
        positions = tf.reshape(tf.range(steps * global_batch, dtype=tf.int64), [steps, workers, local])[:, worker]
        positions = tf.reshape(positions, [-1])

        def epoch_rows(epoch):
            rows = tf.reshape(order.shuffled(positions, seed, epoch, n), [-1, local])
            return tf.data.Dataset.from_tensor_slices(rows).map(lambda batch_rows: (epoch, batch_rows))

        per_image, per_batch = decode.view_stage(spec, augment_on)
        one = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), per_image(stored[0], order.image_seed(0, 0, 0)))

        def views(epoch, batch_rows):
            # Image by image inside one call per batch: a third faster at 32 px than a
            # dataset element per image (each image's few small ops dominate there).
            parts = tf.map_fn(
                lambda row: per_image(stored[row], order.image_seed(seed, epoch, ids[row])), batch_rows,
                fn_output_signature=one, parallel_iterations=32,
            )
            return batches.pack(per_batch(parts))

        return (
            tf.data.Dataset.range(initial_epoch, epochs)
            .flat_map(epoch_rows)
            .map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def batches(self, strategy, global_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        def make(worker, workers, local_batch):
            return self.worker_batches(global_batch, worker, workers, spec, seed, epochs, initial_epoch, augment_on)

        return batches.distribute(strategy, global_batch, make)

    def callbacks(self, run) -> list:
        return []  # images that failed to decode were left out, and reported, before training

    def shards(self) -> list[str]:
        return []

    def preview(self, spec, seed: int, count: int = 8):
        if self.num_train < count:
            return None
        return next(iter(self.worker_batches(count, 0, 1, spec, seed, 1))).numpy()
