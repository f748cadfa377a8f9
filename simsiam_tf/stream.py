"""Streaming input: datasets larger than memory, read from disk every epoch.

The second training input beside the in-memory one (`data.MemoryInput`), with the same
methods. Images stay encoded until a worker needs them; each is decoded only at its two
crops (`crop_decode`), so memory use is bounded by the shuffle buffer and the prefetched
batches, not by the dataset.

Sources (`open_source`):

- `folder:PATH`: the layout of the in-memory path (PATH/train/<class>/*, PATH/test/...).
  Every epoch reads the files in a full random permutation drawn from (seed, epoch).
- `tfrecord:GLOB` (or `tfrecord:DIR` holding `prepare.py`'s index.json): TFRecord shards
  in the TF Model Garden classification layout (`image/encoded`, `image/class/label`).
  Every epoch shuffles the shard order from (seed, epoch), interleaves 16 shards and
  shuffles records in a bounded buffer seeded from (seed, epoch). `prepare.py` mixes
  classes across shards, so a bounded buffer is enough.
- a tensorflow-datasets name: the prepared records read with `tfds.decode.SkipDecoding`
  (images stay encoded) and `tfds.ReadConfig(input_context=...)` (each worker reads its
  own files), then the same per-epoch shuffle buffer.

Each epoch delivers every image of a worker's share exactly once, then is cut to a whole
number of batches (the dropped remainder); the order and every crop follow from
(--seed, epoch, worker), so `--resume` continues the same stream from the epoch it
restarts. Under MultiWorkerMirroredStrategy the workers read disjoint shares: every
worker-th file of each epoch's permutation for folders, every worker-th shard for
TFRecords and TFDS; all run the steps of the smallest share.

A file that cannot be decoded is skipped and counted (`StreamInput.skipped_in_training`),
never a crash; the epoch is topped up from its own first images so that it keeps its
number of steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf import crop_decode
from simsiam_tf import data as data_lib
from simsiam_tf import records
from simsiam_tf.config import UsageError

SHUFFLE_BUFFER = 4096  # records (encoded images), per worker
INTERLEAVE = 16  # shards read at once
SHUFFLE_GRAPH_SEED = 20201120  # see _shuffle
# Records per decoding dataset, and chunks decoded at once: 32 x 4 keeps ~128 images in
# flight (as fast as 64 x 4, 0.3 GB less at 224 px: docs/data.md).
DECODE_CHUNK, DECODE_CYCLE = 32, 4


def _epoch_seed(seed: int, epoch, worker: int) -> tf.Tensor:
    """int64 [2]: the seed of one worker's epoch (file order, shuffle buffer, crops)."""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, worker)


def _shuffle(ds: tf.data.Dataset, seed: tf.Tensor) -> tf.data.Dataset:
    """`ds.shuffle` in a `SHUFFLE_BUFFER`, its order a function of the [2] seed alone.

    tf.data pairs an op seed with the graph-level seed, and TF 2.21 cannot take a tensor
    op seed when that graph seed is 0 (`random_seed.get_seed` compares the pair with
    (0, 0) in Python), which `--seed 0` makes it. Inside the per-epoch dataset function
    (a graph of its own) the graph seed is fixed here, so the order depends on the
    epoch's seed only, not on whatever global seed the process has.
    """
    if not tf.executing_eagerly():
        tf.random.set_seed(SHUFFLE_GRAPH_SEED)
    op_seed = tf.random.stateless_uniform([], seed, minval=1, maxval=2**62, dtype=tf.int64)
    return ds.shuffle(SHUFFLE_BUFFER, seed=op_seed)


# ---------------------------------------------------------------------------
# Sources: encoded images and labels, one worker's share of one epoch.


@dataclasses.dataclass
class Split:
    """The records of one split, in the storage order."""

    count: int
    labelled: bool


class FolderSource:
    """Image files in a folder (`data.scan_folder`).

    Every source has the same methods: `splits` (count, labelled), `class_names`,
    `worker_counts(workers)`, `epoch_records(seed, epoch, worker, workers)` (one worker's
    (item, label) records of one epoch, in that epoch's order), `load(item)` (the
    encoded image of an item: a file read here, the record itself for shards) and
    `eval_records(split, limit)` ((encoded image, label) in a fixed order).
    """

    def __init__(self, path: str, train_limit: int = 0, val_fraction: float = 0.0):
        found = data_lib.scan_folder(path, train_limit, val_fraction)
        self.name = f"folder:{path}"
        self.class_names = found.class_names
        self._files = {"train": found.train_files, "val": found.val_files, "test": found.test_files}
        given = {"train": found.train_labels, "val": found.val_labels, "test": found.test_labels}
        self._labels = {s: given[s] if given[s] is not None else [-1] * len(f) for s, f in self._files.items()}
        # Encoded once here: the per-epoch functions below are traced by tf.data.
        self._paths = {s: np.array([os.fsencode(f) for f in files], dtype=object) for s, files in self._files.items()}
        self.splits = {"train": Split(len(found.train_files), found.train_labels is not None)}
        for split in ("val", "test"):
            if self._files[split]:
                self.splits[split] = Split(len(self._files[split]), given[split] is not None)

    def worker_counts(self, workers: int) -> list[int]:
        return [self.splits["train"].count // workers] * workers

    def epoch_records(self, seed: int, epoch, worker: int, workers: int) -> tf.data.Dataset:
        paths = tf.constant(self._paths["train"], tf.string)
        labels = tf.constant(self._labels["train"], tf.int32)
        n = self.splits["train"].count
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int32), seed=_epoch_seed(seed, epoch, 0)
        )
        mine = tf.reshape(order[: (n // workers) * workers], [-1, workers])[:, worker]
        return tf.data.Dataset.from_tensor_slices((tf.gather(paths, mine), tf.gather(labels, mine)))

    @staticmethod
    def load(path: tf.Tensor) -> tf.Tensor:
        """The encoded image of a record (a path): read where decoding errors are caught,
        so an unreadable file is skipped like an undecodable one."""
        return tf.io.read_file(path)

    def units(self, seed: int, files_per_unit: int = 64):
        """The training split as units for the tf.data service (`data_service`): fixed
        groups of `files_per_unit` files drawn at random from `seed`. Returns (number of
        units, unit -> dataset of (image id, path))."""
        n = self.splits["train"].count
        count = -(-n // files_per_unit)
        table = np.full(count * files_per_unit, -1, np.int64)
        table[:n] = np.random.default_rng([seed, 64]).permutation(n)
        table = tf.constant(table.reshape(count, files_per_unit))
        paths = tf.constant(self._paths["train"], tf.string)

        def unit(u):
            ids = table[u]
            ids = tf.boolean_mask(ids, ids >= 0)
            return tf.data.Dataset.from_tensor_slices((ids, tf.gather(paths, ids)))

        return count, unit

    def eval_records(self, split: str, limit: int = 0) -> tf.data.Dataset:
        keep = data_lib.subset(len(self._files[split]), limit)
        paths = self._paths[split][keep]
        labels = np.asarray(self._labels[split], np.int32)[keep]
        return tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels)).map(
            lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=tf.data.AUTOTUNE
        )

    def eval_count(self, split: str, limit: int = 0) -> int:
        return len(data_lib.subset(self.splits[split].count, limit))


class TFRecordSource:
    """TFRecord shards of tf.train.Examples with `image/encoded` and `image/class/label`."""

    def __init__(self, spec: str, train_limit: int = 0, val_fraction: float = 0.0):
        # A validation split is read from prepare.py's index when it holds one ("val");
        # shards are not split by label here, so `val_fraction` alone adds none.
        if not spec:
            raise UsageError("--dataset tfrecord: needs a glob or a directory, e.g. tfrecord:data/train-*.tfrecord")
        self.name = f"tfrecord:{spec}"
        index_dir = spec if tf.io.gfile.isdir(spec) else os.path.dirname(spec)
        self.index = records.read_index(index_dir) if index_dir else None
        if tf.io.gfile.isdir(spec):
            if self.index is None:
                raise UsageError(
                    f"tfrecord:{spec} is a directory without {records.INDEX_FILE}; pass a glob of the "
                    f"shards (tfrecord:'{spec}/train-*') or a directory written by prepare.py"
                )
            train = [os.path.join(spec, s["file"]) for s in self.index["splits"]["train"]["shards"]]
        else:
            train = sorted(tf.io.gfile.glob(spec))
            if not train:
                raise UsageError(
                    f"tfrecord:{spec} matches no files; check the path and quote the glob so the shell "
                    "does not expand it (--dataset 'tfrecord:data/train-*.tfrecord')"
                )
        records.check_first_record(train[0])
        self.class_names = list((self.index or {}).get("class_names", []))
        self._shards = {"train": train}
        self._counts = {"train": self._shard_counts(train, "train")}
        for split in ("val", "test") if val_fraction else ("test",):
            files = self._index_split_files(index_dir, split)
            if files:
                self._shards[split] = files
                self._counts[split] = self._shard_counts(files, split)
        if train_limit:
            raise UsageError(
                "--train-limit is not available for tfrecord: datasets (their shards are read whole); "
                "write a subset with prepare.py instead"
            )
        labelled = bool(self.class_names)
        self.splits = {s: Split(sum(c), labelled) for s, c in self._counts.items()}

    def _index_split_files(self, directory, split):
        if self.index is None or split not in self.index.get("splits", {}):
            return []
        return [os.path.join(directory, s["file"]) for s in self.index["splits"][split]["shards"]]

    def _shard_counts(self, shards, split) -> list[int]:
        """Records per shard: from prepare.py's index (sizes checked), else counted."""
        if self.index is not None and split in self.index.get("splits", {}):
            by_file = {s["file"]: s["count"] for s in self.index["splits"][split]["shards"]}
            if all(os.path.basename(p) in by_file for p in shards):
                records.check_shard_sizes(os.path.dirname(shards[0]), self.index, split)
                return [by_file[os.path.basename(p)] for p in shards]
        print(
            f"note: counting the records of {len(shards)} shard(s) (no {records.INDEX_FILE} from prepare.py "
            "beside them); this reads them once",
            file=sys.stderr,
        )
        counts = []
        for path in shards:
            try:
                counts.append(int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)))
            except tf.errors.DataLossError as e:
                raise UsageError(f"TFRecord shard {path} is damaged ({str(e).splitlines()[0][:120]}); rewrite it")
        return counts

    def _worker_shards(self, worker: int, workers: int) -> tuple[list[str], int]:
        shards = self._shards["train"]
        if len(shards) < workers:
            raise UsageError(
                f"{len(shards)} TFRecord shard(s) cannot be split over {workers} workers; "
                f"write at least {workers} shards (prepare.py --shards {workers * 4})"
            )
        mine = list(range(worker, len(shards), workers))
        return [shards[i] for i in mine], sum(self._counts["train"][i] for i in mine)

    def worker_counts(self, workers: int) -> list[int]:
        return [self._worker_shards(w, workers)[1] for w in range(workers)]

    @staticmethod
    def load(raw: tf.Tensor) -> tf.Tensor:
        return raw  # records hold the encoded image

    def epoch_records(self, seed: int, epoch, worker: int, workers: int) -> tf.data.Dataset:
        shards, _ = self._worker_shards(worker, workers)
        epoch_seed = _epoch_seed(seed, epoch, worker)
        order = tf.random.experimental.stateless_shuffle(tf.constant(shards, tf.string), seed=epoch_seed)
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(INTERLEAVE, len(shards)),
                block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            .map(records.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .apply(lambda ds: _shuffle(ds, epoch_seed))
        )

    def units(self, seed: int):
        """The training split as units for the tf.data service (`data_service`): one per
        shard. Returns (number of units, unit -> dataset of (image id, encoded image)),
        image ids numbering the records of all shards in order."""
        shards = self._shards["train"]
        offsets = tf.constant(np.concatenate([[0], np.cumsum(self._counts["train"])[:-1]]), tf.int64)
        paths = tf.constant(shards, tf.string)

        def unit(u):
            return (
                tf.data.TFRecordDataset(paths[u])
                .map(lambda record: records.parse(record)[0])
                .enumerate()
                .map(lambda i, raw: (offsets[u] + i, raw))
            )

        return len(shards), unit

    def eval_records(self, split: str, limit: int = 0) -> tf.data.Dataset:
        ds = tf.data.TFRecordDataset(self._shards[split]).map(records.parse, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.take(limit) if limit else ds

    def eval_count(self, split: str, limit: int = 0) -> int:
        count = self.splits[split].count
        return min(count, limit) if limit else count

    def all_shards(self) -> list[str]:
        return [p for shards in self._shards.values() for p in shards]


class TFDSSource:
    """A prepared tensorflow-datasets image dataset, read without decoding its images."""

    def __init__(self, name: str, data_dir: str | None, train_limit: int = 0, val_fraction: float = 0.0):
        self.builder = data_lib.tfds_builder(name, data_dir)
        features = self.builder.info.features
        if "image" not in features:
            raise UsageError(f"tensorflow-datasets {name!r} has no 'image' feature; it is not an image dataset")
        self.name = name
        self._has_label = "label" in features
        self.class_names = list(features["label"].names) if self._has_label and hasattr(features["label"], "names") else []
        self._split_names = {"train": f"train[:{train_limit}]" if train_limit else "train"}
        own_val = data_lib.tfds_val_split(self.builder) if val_fraction and self._has_label else None
        if own_val:
            self._split_names["val"] = own_val
        elif val_fraction and self._has_label:
            # Streamed, the labels are not known up front: the validation split is the
            # last `val_fraction` of the (limited) training split, a random but not a
            # stratified sample (TFDS shuffles examples when it writes them).
            total = self.builder.info.splits[self._split_names["train"]].num_examples
            cut = total - min(int(round(val_fraction * total)), total - 1)
            self._split_names["train"] = f"train[:{cut}]"
            self._split_names["val"] = f"train[{cut}:{train_limit or total}]"
        test = data_lib.tfds_test_split(self.builder)
        if test:
            self._split_names["test"] = test
        self.splits = {
            s: Split(self.builder.info.splits[n].num_examples, self._has_label) for s, n in self._split_names.items()
        }

    def _read(self, split: str, worker: int = 0, workers: int = 1) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(
            input_context=tf.distribute.InputContext(workers, worker, 1) if workers > 1 else None,
            interleave_cycle_length=INTERLEAVE,
            try_autocache=False,
            skip_prefetch=True,
        )
        ds = self.builder.as_dataset(
            split=self._split_names[split],
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        has_label = self._has_label
        return ds.map(
            lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32))
        )

    def worker_counts(self, workers: int) -> list[int]:
        """Records each worker reads: TFDS gives worker w every workers-th file instruction."""
        instructions = self.builder.info.splits[self._split_names["train"]].file_instructions
        if workers > 1 and len(instructions) < workers:
            raise UsageError(
                f"tensorflow-datasets {self.name!r} has {len(instructions)} file(s) for its train split, "
                f"fewer than the {workers} workers; use fewer workers or prepare it with more shards"
            )
        return [sum(i.take for i in instructions[w::workers]) for w in range(workers)]

    @staticmethod
    def load(raw: tf.Tensor) -> tf.Tensor:
        return raw  # records hold the encoded image

    def epoch_records(self, seed: int, epoch, worker: int, workers: int) -> tf.data.Dataset:
        # Files are read in their fixed order (TFDS shuffled the examples when it wrote
        # them); the order of an epoch comes from the buffer, seeded from (seed, epoch).
        return _shuffle(self._read("train", worker, workers), _epoch_seed(seed, epoch, worker))

    def eval_records(self, split: str, limit: int = 0) -> tf.data.Dataset:
        ds = self._read(split)
        return ds.take(limit) if limit else ds

    def eval_count(self, split: str, limit: int = 0) -> int:
        count = self.splits[split].count
        return min(count, limit) if limit else count


def open_source(dataset: str, data_dir: str | None = None, train_limit: int = 0, val_fraction: float = 0.0):
    """The streaming source of `--dataset` (folder:PATH, tfrecord:GLOB or a TFDS name)."""
    if dataset.startswith("folder:"):
        return FolderSource(dataset[len("folder:"):], train_limit, val_fraction)
    if dataset.startswith("tfrecord:"):
        return TFRecordSource(dataset[len("tfrecord:"):], train_limit, val_fraction)
    if dataset == "digits":
        raise UsageError("--dataset digits is bundled in memory and cannot stream; use --input memory (the default)")
    return TFDSSource(dataset, data_dir, train_limit, val_fraction)


# ---------------------------------------------------------------------------
# The pipelines.


def image_views(raw: tf.Tensor, image_seed: tf.Tensor, spec: aug.AugmentSpec, augment_on: str, uint8_out=False):
    """The two views of one encoded image, every random choice drawn from `image_seed`.

    With augment_on="host": float32, normalised, fully augmented (uint8 before the
    normalisation with `uint8_out`); with "device": the uint8 crops, for
    `augment.ViewAugment` in `train_step`.
    """
    crop_seed, seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(image_seed, 3))
    crops = crop_decode.decode_crops(raw, crop_seed, spec)
    if augment_on == "device":
        return crops[0], crops[1]
    return (
        aug.photometric_image(crops[0], aug.image_params(seed1, spec), spec, uint8_out),
        aug.photometric_image(crops[1], aug.image_params(seed2, spec), spec, uint8_out),
    )


def _decode_for_eval(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image -> uint8 [R, R, 3], the form `augment.eval_preprocess` takes."""
    return aug.storage_resize_uint8(data_lib._decode(raw, image_size)[None], image_size)[0]


class StreamEvalImages:
    """One split streamed for evaluation: decoded, brought to the evaluation storage form,
    in a fixed order; nothing is kept between passes."""

    def __init__(self, source, split: str, image_size: int, limit: int = 0):
        self.source = source
        self.split = split
        self.image_size = image_size
        self.limit = limit

    def __len__(self) -> int:
        return self.source.eval_count(self.split, self.limit)

    def dataset(self, batch_size: int = 256) -> tf.data.Dataset:
        size = self.image_size
        return (
            self.source.eval_records(self.split, self.limit)
            .map(lambda raw, label: (_decode_for_eval(raw, size), label), num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()
            .batch(batch_size)
            .prefetch(2)
        )

    def batches(self, batch_size: int = 256):
        for images, labels in self.dataset(batch_size):
            yield images.numpy(), labels.numpy()

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
        labels = np.concatenate(ys) if ys else np.zeros([0], np.int32)
        labelled = self.source.splits[self.split].labelled
        return images, labels if labelled else None


class StreamInput:
    """A dataset streamed from disk as a training input (same methods as `data.MemoryInput`)."""

    kind = "stream"

    def __init__(self, source, image_size: int):
        self.source = source
        self.image_size = image_size
        self.name = source.name
        self.num_train = source.splits["train"].count
        self.skipped: list[str] = []  # nothing is decoded up front
        self.class_names = source.class_names
        self.has_knn_splits = (
            source.splits["train"].labelled and "test" in source.splits and source.splits["test"].count > 0
        )
        self.has_val = "val" in source.splits and source.splits["val"].labelled and source.splits["val"].count > 0
        # Files that fail to decode while training: counted by the pipeline itself.
        self._skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_images")

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        """Steps every worker runs per epoch: the smallest share's whole batches."""
        return min(self.source.worker_counts(workers)) // (global_batch // workers)

    def skipped_in_training(self) -> int:
        """Images this process skipped because they could not be decoded, since it started."""
        return int(self._skipped.numpy())

    def worker_pairs(
        self,
        local_batch: int,
        spec: aug.AugmentSpec,
        seed: int,
        epochs: int,
        initial_epoch: int = 0,
        augment_on: str = "host",
        worker: int = 0,
        workers: int = 1,
        steps: int | None = None,
    ) -> tf.data.Dataset:
        """One worker's batches of two views ((x1, x2)) for epochs initial_epoch..epochs-1.

        With augment_on="host" the views are float32, normalised, fully augmented; with
        "device" they are the uint8 crops, for `augment.ViewAugment` in `train_step`.
        """
        if steps is None:
            steps = self.steps_per_epoch(local_batch * workers, workers)
        if steps < 1:
            raise UsageError(
                f"--batch-size {local_batch * workers} is larger than the {min(self.source.worker_counts(workers))} "
                f"images each worker reads per epoch; use a smaller --batch-size"
            )
        count = self.source.worker_counts(workers)[worker]
        source, skipped = self.source, self._skipped

        def views(index, raw, epoch_seed):
            return image_views(raw, tf.random.experimental.stateless_fold_in(epoch_seed, index), spec, augment_on)

        def epoch_pairs(epoch):
            epoch_seed = _epoch_seed(seed, epoch, worker)
            records_ = source.epoch_records(seed, epoch, worker, workers)

            def decode_chunk(indices, items):
                # ignore_errors on a dataset of this chunk's records alone: a file that
                # cannot be read or decoded is dropped, while an error in reading the
                # records themselves (a truncated shard) still stops the run. Chunks keep
                # the per-dataset overhead off every image (a dataset per image halves
                # the rate).
                return (
                    tf.data.Dataset.from_tensor_slices((indices, items))
                    .map(
                        lambda i, item: (i, views(i, source.load(item), epoch_seed)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
                    )
                    .ignore_errors()
                )

            def decoded(indexed_records):
                return indexed_records.map(lambda i, record: (i, record[0])).batch(DECODE_CHUNK).interleave(
                    decode_chunk, cycle_length=DECODE_CYCLE, block_length=DECODE_CHUNK,
                    num_parallel_calls=DECODE_CYCLE, deterministic=True,
                )

            # Top-up: the epoch's own first images again (other crops), used only when
            # more files failed than the dropped remainder, so the epoch keeps its steps.
            images = decoded(records_.enumerate()).concatenate(decoded(records_.take(local_batch).enumerate(count)))

            def gap(previous, element):
                # Images of the epoch missing between this one and the one before; the
                # top-up (indices from `count` on) repeats images and is not counted.
                index, pair = element
                missed = tf.minimum(index, count) - tf.minimum(previous + 1, count)
                return index, (missed, pair)

            def count_skipped(missed, pair):
                with tf.control_dependencies([skipped.assign_add(missed)]):
                    return tf.nest.map_structure(tf.identity, pair)

            return (
                images.scan(tf.constant(-1, tf.int64), gap)
                .map(count_skipped)
                .take(steps * local_batch)
                .batch(local_batch, drop_remainder=True)
            )

        # One float32 batch of 256 pairs at 224 px is 0.3 GB: one ready batch is enough
        # to overlap with the step; uint8 crops are a quarter of that.
        ready = 2 if augment_on == "device" else 1
        return tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_pairs).prefetch(ready)

    def pairs(self, strategy, global_batch, spec: aug.AugmentSpec, seed, epochs, initial_epoch=0, augment_on="host"):
        """`worker_pairs` for `strategy` (`data.distribute_pairs`)."""

        def make(worker, workers, local_batch):
            steps = self.steps_per_epoch(global_batch, workers)
            return self.worker_pairs(local_batch, spec, seed, epochs, initial_epoch, augment_on, worker, workers, steps)

        return data_lib.distribute_pairs(strategy, global_batch, make)

    def eval_images(self, split: str, limit: int = 0) -> StreamEvalImages:
        return StreamEvalImages(self.source, split, self.image_size, limit)

    def preview(self, spec: aug.AugmentSpec, seed: int, count: int = 8):
        """Both views (host augmentation) of the first `count` images of epoch 1."""
        if self.num_train < count:
            return None
        ds = self.worker_pairs(count, spec, seed, 1, steps=1)
        return tuple(v.numpy() for v in next(iter(ds)))
