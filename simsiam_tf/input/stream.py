"""The streamed input (`--input stream`): datasets larger than memory, read from disk
every epoch.

Images stay encoded until their two crops are decoded (`decode.image_views`), so memory
use is bounded by the shuffle buffer and the prefetched batches, not by the dataset.
Each epoch a worker reads its share of the training members in the epoch's order
(`sources`: a folder's files in a full random permutation, shards in a new order,
interleaved and shuffled in a bounded buffer), every image exactly once, then the epoch
is cut to a whole number of batches (the dropped remainder). The order and every crop
follow from (--seed, epoch, image), so `--resume` continues the same stream from the
epoch it restarts. Under MultiWorkerMirroredStrategy the workers read disjoint shares
(every worker-th file of each epoch's order, every worker-th shard) and all run the
steps of the smallest share.

A file that cannot be decoded is skipped and counted (`SkippedImages`), never a crash;
the epoch is topped up from its own first images so that it keeps its number of steps.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.errors import UsageError
from simsiam_tf.input import batches, catalog, decode, order


class StreamEvalSplit:
    """One split read from disk for evaluation (`contract.EvalSplit`): decoded into the
    evaluation form in a fixed order; nothing is kept between passes."""

    def __init__(self, source, members: catalog.Members, image_size: int, limit: int = 0):
        self.source = source
        self.members = members
        self.indices = members.indices[catalog.subset(len(members), limit)]
        self.image_size = image_size
        self.labelled = members.labelled
        self._skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def skipped(self) -> int:
        return self._skipped

    def dataset(self, batch_size: int = 256) -> tf.data.Dataset:
        size, load = self.image_size, self.source.load
        return (
            decode.decoded(
                self.source.records(self.members.stored, self.indices),
                lambda index, item, label: (decode.eval_form(load(item), size), label),
            )
            .batch(batch_size)
            .prefetch(2)
        )

    def batches(self, batch_size: int = 256):
        seen = 0
        for images, labels in self.dataset(batch_size):
            seen += len(images)
            yield images.numpy(), labels.numpy() if self.labelled else None
        self._skipped = len(self.indices) - seen

    def calibration_batches(self, steps: int, batch_size: int):
        """The first `steps` batches (cycled when the split is smaller)."""
        done = 0
        while done < steps:
            for images, _ in self.batches(batch_size):
                yield images
                done += 1
                if done == steps:
                    return

    def materialize(self) -> tuple[np.ndarray, np.ndarray | None]:
        xs, ys = [], []
        for x, y in self.batches():
            xs.append(x)
            ys.append(y)
        side = aug.eval_resize_side(self.image_size)
        images = np.concatenate(xs) if xs else np.zeros([0, side, side, 3], np.uint8)
        labels = np.concatenate(ys) if ys and self.labelled else (np.zeros([0], np.int32) if self.labelled else None)
        return images, labels


class StreamInput:
    """A dataset streamed from disk, as a training input (`contract.TrainingInput`)."""

    kind = "stream"

    def __init__(self, source, splits: dict[str, catalog.Members], image_size: int):
        if not source.streamable:
            raise UsageError(f"--dataset {source.name} is bundled in memory and cannot stream; use --input memory (or auto)")
        self.source = source
        self.splits = splits
        self.image_size = image_size
        self.name = source.name
        self.class_names = source.class_names
        self.num_train = len(splits["train"])
        self.skipped: list[str] = []  # nothing is decoded up front
        # Files that fail to decode while training: counted by the pipeline itself.
        self._skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_images")

    def worker_counts(self, workers: int) -> list[int]:
        return self.source.worker_counts(self.splits["train"].indices, workers)

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        """Steps every worker runs per epoch: the smallest share's whole batches."""
        return min(self.worker_counts(workers)) // (global_batch // workers)

    def skipped_in_training(self) -> int:
        """Images this process skipped because they could not be decoded, since it started."""
        return int(self._skipped.numpy())

    def eval_split(self, name: str, limit: int = 0) -> StreamEvalSplit | None:
        if name not in self.splits:
            return None
        return StreamEvalSplit(self.source, self.splits[name], self.image_size, limit)

    def worker_batches(self, local_batch: int, spec, seed: int, epochs: int, initial_epoch: int = 0,
                       augment_on: str = "host", worker: int = 0, workers: int = 1,
                       steps: int | None = None) -> tf.data.Dataset:
        """One worker's training batches of epochs initial_epoch..epochs-1, in the batch format."""
        if steps is None:
            steps = self.steps_per_epoch(local_batch * workers, workers)
        count = self.worker_counts(workers)[worker]
        if steps < 1:
            raise UsageError(
                f"--batch-size {local_batch * workers} is larger than the {min(self.worker_counts(workers))} "
                f"images each worker reads per epoch; use a smaller --batch-size"
            )
        source, skipped, members = self.source, self._skipped, self.splits["train"].indices
        per_image, per_batch = decode.view_stage(spec, augment_on)

        def epoch_batches(epoch):
            records = source.epoch_records(members, seed, epoch, worker, workers)

            def views(position, index, item):
                return position, per_image(source.load(item), order.image_seed(seed, epoch, index))

            def decoded(indexed):
                return decode.decoded(indexed.map(lambda p, record: (p, record[0], record[1])), views)

            # Top-up: the epoch's own first images again (other positions, so counted
            # apart), used only when more files failed than the dropped remainder, so
            # the epoch keeps its steps.
            images = decoded(records.enumerate()).concatenate(decoded(records.take(local_batch).enumerate(count)))

            def gap(previous, element):
                # Images of the epoch missing between this one and the one before; the
                # top-up (positions from `count` on) repeats images and is not counted.
                position, pair = element
                missed = tf.minimum(position, count) - tf.minimum(previous + 1, count)
                return position, (missed, pair)

            def count_skipped(missed, parts):
                with tf.control_dependencies([skipped.assign_add(missed)]):
                    return tf.nest.map_structure(tf.identity, parts)

            return (
                images.scan(tf.constant(-1, tf.int64), gap)
                .map(count_skipped)
                .take(steps * local_batch)
                .batch(local_batch, drop_remainder=True)
                .map(lambda parts: batches.pack(per_batch(parts)))
            )

        return tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches).prefetch(2)

    def batches(self, strategy, global_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        def make(worker, workers, local_batch):
            steps = self.steps_per_epoch(global_batch, workers)
            return self.worker_batches(local_batch, spec, seed, epochs, initial_epoch, augment_on, worker, workers, steps)

        return batches.distribute(strategy, global_batch, make)

    def callbacks(self, run) -> list:
        return [SkippedImages(self, run.previous.get("skipped_images", 0))]

    def shards(self) -> list[str]:
        return self.source.all_shards()

    def preview(self, spec, seed: int, count: int = 8):
        if self.num_train < count:
            return None
        return next(iter(self.worker_batches(count, spec, seed, 1, steps=1))).numpy()


class SkippedImages(keras.callbacks.Callback):
    """Counts images the stream could not decode while training, as
    `logs["skipped_images"]`, with one warning line whenever the count grows."""

    def __init__(self, stream_input: StreamInput, previous: int = 0):
        super().__init__()
        self.input = stream_input
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
