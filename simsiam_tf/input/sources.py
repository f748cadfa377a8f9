"""Where the images are stored, and how their records are read.

A source knows its stored splits (`stored`: count, labelled, labels), which of them
is the test split and whether the dataset has its own validation split; the catalog
decides the members of each split from that (`catalog.decide_splits`). Every read
takes members (positions in a stored split) and yields records `(index, item, label)`:
`index` the member's stored position (int64), `item` what `load` turns into encoded
bytes (a file path for folders, the bytes themselves for shards), `label` int32 (-1
unlabelled).

- `ArraySource`: images already decoded in memory (memory only): scikit-learn's
  bundled digits (`digits_source`), or arrays a caller has.
- `FolderSource`: PATH/train/<class>/* and PATH/test/<class>/* (`catalog.scan_folder`).
- `ShardSource`: TFRecord shards, in the TF Model Garden layout (`prepare.py`'s, any
  glob) or tensorflow-datasets' prepared files (`tfds_data`), read in shard order.

Reading for training (`epoch_records`, `units`) follows `order`: an epoch's order,
and each worker's share of it, come from (seed, epoch) alone.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.errors import UsageError
from simsiam_tf.input import catalog, decode, order, records

SHUFFLE_BUFFER = 4096  # records (encoded images), per worker
INTERLEAVE = 16  # shards read at once
FILES_PER_UNIT = 64  # a folder's unit of work for the tf.data service


def _mask(count: int, indices: np.ndarray) -> tf.Tensor | None:
    """A bool [count] membership mask, or None when every record is a member."""
    if len(indices) == count:
        return None
    mask = np.zeros(count, bool)
    mask[indices] = True
    return tf.constant(mask)


def decode_members(source, split: str, indices: np.ndarray, image_size: int):
    """Decode the members of `split` once, in the evaluation form (`decode.eval_form`).

    Returns (uint8 [N, R, R, 3], int32 labels [N], the positions in `indices` that
    decoded, and a description of each record that did not).
    """
    keep = tf.constant(np.arange(len(indices), dtype=np.int64))
    records_ = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(keep), source.records(split, indices)))
    ds = decode.decoded(
        records_.map(lambda k, record: (k, record[1], record[2])),
        lambda k, item, label: (k, decode.eval_form(source.load(item), image_size), label),
    ).batch(1024).prefetch(2)
    positions, images, labels = [], [], []
    for k, x, y in ds:
        positions.append(k.numpy())
        images.append(x.numpy())
        labels.append(y.numpy())
    side = aug.eval_resize_side(image_size)
    if not images:
        return np.zeros([0, side, side, 3], np.uint8), np.zeros([0], np.int32), np.zeros([0], np.int64), \
            [source.describe(split, i) for i in indices]
    positions = np.concatenate(positions)
    failed = np.setdiff1d(np.arange(len(indices)), positions)
    return np.concatenate(images), np.concatenate(labels), positions, [source.describe(split, indices[i]) for i in failed]


# ---------------------------------------------------------------------------


class ArraySource:
    """Images already decoded and held in memory, uint8 [N, H, W, 3] per stored split
    (with int32 labels, or None): the in-memory input only.

    Args:
        splits: stored split -> (images, labels or None).
        resize: images, image_size -> uint8 [N, R, R, 3], how the images are brought to
            the training size (the in-memory store's `augment.storage_resize_uint8` by
            default).
    """

    test_split = "test"
    own_val = None
    streamable = False

    def __init__(self, name: str, splits: dict, class_names=(), resize=None):
        self.name = name
        self.class_names = list(class_names)
        self._splits = {s: (np.asarray(images, np.uint8), labels) for s, (images, labels) in splits.items()}
        self._resize = resize or (lambda images, size: aug.storage_resize_uint8(images, size).numpy())
        self.stored = {
            s: catalog.Stored(len(images), labels is not None, None if labels is None else np.asarray(labels, np.int32))
            for s, (images, labels) in self._splits.items()
        }

    def images(self, split: str, indices: np.ndarray, image_size: int):
        """As `decode_members`; nothing fails to decode."""
        images, labels = self._splits[split]
        labels = np.full(len(indices), -1, np.int32) if labels is None else np.asarray(labels, np.int32)[indices]
        return self._resize(images[indices], image_size), labels, np.arange(len(indices), dtype=np.int64), []


def digits_source() -> ArraySource:
    """scikit-learn's bundled 8x8 digits, upsampled to RGB at the training size (bilinear),
    split 75/25 (stratified, random_state=0: every run sees the same 1,347 training and
    450 test images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; 0..255 before any resize.
    small = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)

    def upsample(images, size):
        out = tf.image.resize(images, (size, size), method="bilinear")
        return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)

    splits = {"train": (small[train], labels[train]), "test": (small[test], labels[test])}
    return ArraySource("digits", splits, [str(d) for d in range(10)], resize=upsample)


class FolderSource:
    """Image files in a folder (`catalog.scan_folder`), read one file per record."""

    test_split = "test"
    own_val = None
    streamable = True

    def __init__(self, path: str):
        found = catalog.scan_folder(path)
        self.name = f"folder:{path}"
        self.class_names = found.class_names
        self._files = {s: split.files for s, split in found.splits.items()}
        # Encoded once here: the per-epoch functions are traced by tf.data.
        self._paths = {s: np.array([os.fsencode(f) for f in files], dtype=object) for s, files in self._files.items()}
        self._labels = {
            s: np.asarray(split.labels if split.labels is not None else [-1] * len(split.files), np.int32)
            for s, split in found.splits.items()
        }
        self.stored = {
            s: catalog.Stored(len(split.files), split.labels is not None, self._labels[s])
            for s, split in found.splits.items()
        }

    def describe(self, split: str, index: int) -> str:
        return self._files[split][int(index)]

    def all_shards(self) -> list[str]:
        return []  # files, not shards

    def images(self, split: str, indices: np.ndarray, image_size: int):
        return decode_members(self, split, indices, image_size)

    @staticmethod
    def load(path: tf.Tensor) -> tf.Tensor:
        """The encoded image of a record (a path): read where decoding errors are caught,
        so an unreadable file is skipped like an undecodable one."""
        return tf.io.read_file(path)

    def records(self, split: str, indices: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            (indices.astype(np.int64), self._paths[split][indices], self._labels[split][indices])
        )

    def _members(self, indices: np.ndarray, positions: tf.Tensor, epoch, seed: int) -> tf.data.Dataset:
        members = tf.constant(indices.astype(np.int64))
        ids = tf.gather(members, order.shuffled(positions, seed, epoch, len(indices)))
        return tf.data.Dataset.from_tensor_slices(
            (ids, tf.gather(tf.constant(self._paths["train"], tf.string), ids),
             tf.gather(tf.constant(self._labels["train"]), ids))
        )

    def worker_counts(self, indices: np.ndarray, workers: int) -> list[int]:
        return [len(indices) // workers] * workers

    def epoch_records(self, indices: np.ndarray, seed: int, epoch, worker: int, workers: int) -> tf.data.Dataset:
        """One worker's training records of one epoch: every workers-th position of the
        epoch's order (`order.shuffled`), so the workers' shares are disjoint and equal."""
        per_worker = len(indices) // workers
        positions = tf.range(per_worker, dtype=tf.int64) * workers + worker
        return self._members(indices, positions, epoch, seed)

    def units(self, indices: np.ndarray, seed: int, per_unit: int = FILES_PER_UNIT):
        """The training members as units for the tf.data service: unit u of epoch e is
        positions u * per_unit .. of that epoch's order, so the units are regrouped
        every epoch. Returns (units per epoch, (epoch, u) -> records)."""
        n = len(indices)

        def unit(epoch, u):
            positions = tf.range(u * per_unit, tf.minimum((u + 1) * per_unit, n), dtype=tf.int64)
            return self._members(indices, positions, epoch, seed)

        return -(-n // per_unit), unit


class ShardSource:
    """Records in TFRecord shards, one tf.train.Example per image, read in shard order.

    Args:
        shards: stored split -> shard paths, in order.
        counts: stored split -> records per shard.
        keys: the image and label features (Model Garden's `image/encoded`,
            `image/class/label`; tensorflow-datasets' `image`, `label`); label None for
            datasets without labels.
        labels: stored split -> labels in shard order (from prepare.py's index), where
            known without reading the records.
    """

    streamable = True

    def __init__(self, name, shards, counts, keys, class_names, labelled, labels=None, test_split="test",
                 own_val=None):
        self.name = name
        self.class_names = class_names
        self.test_split = test_split if test_split in shards else None
        self.own_val = own_val if own_val in shards else None
        self._shards = shards
        self._counts = {s: list(c) for s, c in counts.items()}
        self._offsets = {s: np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for s, c in self._counts.items()}
        self._keys = keys
        known = labels or {}
        self.stored = {
            s: catalog.Stored(
                sum(self._counts[s]), labelled[s],
                known[s] if s in known else (lambda s=s: self._read_labels(s)) if labelled[s] else None,
            )
            for s in shards
        }

    def all_shards(self) -> list[str]:
        return [p for paths in self._shards.values() for p in paths]

    def describe(self, split: str, index: int) -> str:
        k = int(np.searchsorted(self._offsets[split], index, side="right")) - 1
        return f"record {int(index - self._offsets[split][k])} of {self._shards[split][k]}"

    def images(self, split: str, indices: np.ndarray, image_size: int):
        return decode_members(self, split, indices, image_size)

    @staticmethod
    def load(raw: tf.Tensor) -> tf.Tensor:
        return raw  # records hold the encoded image

    def _read_labels(self, split: str) -> np.ndarray:
        """Every record's label, in shard order: one pass over the split's records."""
        label_key = self._keys[1]
        spec = {label_key: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
        ds = tf.data.TFRecordDataset(self._shards[split], num_parallel_reads=1).map(
            lambda s: tf.cast(tf.io.parse_single_example(s, spec)[label_key], tf.int32),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).batch(8192)
        print(
            f"note: reading the labels of {self.stored[split].count:,} {split} records of {self.name} once "
            "(to hold out a stratified validation split)",
            file=sys.stderr, flush=True,
        )
        return np.concatenate([b.numpy() for b in ds]) if self.stored[split].count else np.zeros([0], np.int32)

    def _shard(self, split: str, u) -> tf.data.Dataset:
        """(index, encoded image, label) of shard u of `split`."""
        paths = tf.constant(self._shards[split], tf.string)
        offsets = tf.constant(self._offsets[split])
        return (
            tf.data.TFRecordDataset(paths[u])
            .map(lambda serialized: records.parse(serialized, *self._keys))
            .enumerate(offsets[u])
            .map(lambda i, record: (i, record[0], record[1]))
        )

    @staticmethod
    def _members_only(ds: tf.data.Dataset, mask) -> tf.data.Dataset:
        return ds if mask is None else ds.filter(lambda i, raw, label: mask[i])

    def records(self, split: str, indices: np.ndarray) -> tf.data.Dataset:
        mask = _mask(self.stored[split].count, indices)
        shards = tf.data.Dataset.range(len(self._shards[split]))
        return self._members_only(shards.flat_map(lambda u: self._shard(split, u)), mask)

    def _worker_shards(self, worker: int, workers: int) -> np.ndarray:
        count = len(self._shards["train"])
        if count < workers:
            raise UsageError(
                f"{self.name} has {count} shard(s), which cannot be split over {workers} workers; "
                f"write at least {workers} shards (prepare.py --shards {workers * 4})"
            )
        return np.arange(worker, count, workers)

    def worker_counts(self, indices: np.ndarray, workers: int) -> list[int]:
        """Members in each worker's shards (every workers-th shard)."""
        shard_of = np.searchsorted(self._offsets["train"], indices, side="right") - 1
        return [int(np.isin(shard_of, self._worker_shards(w, workers)).sum()) for w in range(workers)]

    def epoch_records(self, indices: np.ndarray, seed: int, epoch, worker: int, workers: int) -> tf.data.Dataset:
        """One worker's training records of one epoch: its shards in the epoch's order,
        16 read at a time, shuffled in a bounded buffer seeded from (seed, epoch, worker)."""
        mine = self._worker_shards(worker, workers)
        n = len(self._shards["train"])
        ordered = order.shuffled(tf.range(n, dtype=tf.int64), seed, epoch, n)
        ordered = tf.boolean_mask(ordered, tf.equal(ordered % workers, worker))
        mask = _mask(self.stored["train"].count, indices)
        ds = tf.data.Dataset.from_tensor_slices(ordered).interleave(
            lambda u: self._shard("train", u), cycle_length=min(INTERLEAVE, len(mine)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
        return order.shuffle_buffer(self._members_only(ds, mask), seed, epoch, SHUFFLE_BUFFER, stream=worker)

    def units(self, indices: np.ndarray, seed: int):
        """The training shards as units for the tf.data service, in a new order every
        epoch. Returns (units per epoch, (epoch, u) -> records)."""
        n = len(self._shards["train"])
        mask = _mask(self.stored["train"].count, indices)

        def unit(epoch, u):
            return self._members_only(self._shard("train", order.shuffled(u, seed, epoch, n)), mask)

        return n, unit


# ---------------------------------------------------------------------------
# Opening a source.


def tfrecord_source(spec: str) -> ShardSource:
    """`tfrecord:GLOB`, or `tfrecord:DIR` holding prepare.py's index.json."""
    name = f"tfrecord:{spec}"
    is_dir = tf.io.gfile.isdir(spec)
    index_dir = spec if is_dir else os.path.dirname(spec)
    index = records.read_index(index_dir) if index_dir else None
    if is_dir:
        if index is None:
            raise UsageError(
                f"{name} is a directory without {records.INDEX_FILE}; pass a glob of the "
                f"shards (tfrecord:'{spec}/train-*') or a directory written by prepare.py"
            )
        train = [os.path.join(spec, s["file"]) for s in index["splits"]["train"]["shards"]]
    else:
        train = sorted(tf.io.gfile.glob(spec))
        if not train:
            raise UsageError(
                f"{name} matches no files; check the path and quote the glob so the shell "
                "does not expand it (--dataset 'tfrecord:data/train-*.tfrecord')"
            )
    records.check_first_record(train[0])
    shards = {"train": train}
    for split in ("val", "test"):
        if index is not None and split in index["splits"]:
            shards[split] = [os.path.join(index_dir, s["file"]) for s in index["splits"][split]["shards"]]
    counts = {s: records.shard_counts(index_dir, index, s, paths) for s, paths in shards.items()}
    class_names = list((index or {}).get("class_names", []))
    labelled = {s: bool(class_names) for s in shards}
    if index is None:  # third-party shards: labelled when the first record says so
        labelled = {s: records.first_label(paths[0]) >= 0 for s, paths in shards.items()}
    labels = records.index_labels(index, shards) if index is not None else {}
    return ShardSource(name, shards, counts, ("image/encoded", "image/class/label"), class_names, labelled,
                       labels, own_val="val")
