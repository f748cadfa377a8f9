"""The dataset's rules, decided once for every path that reads it.

Memory, stream, the tf.data service and `evaluate.py` all take from here:

- what `--dataset` names (`parse_dataset`, the only parser of that string);
- the image files of a folder (`scan_folder`, the only folder scan; `prepare.py` and
  the preset's image-size sample use it too);
- which stored records each split takes (`decide_splits`): the training split after
  `--train-limit` (a fixed random subset), the validation split held out of it (fixed,
  stratified by label, the same for every `--seed`) or the dataset's own, and the test
  split.

A split is a set of *members*: positions in one of the dataset's stored splits (the
sorted files of a folder split, the records of a TFRecord or tensorflow-datasets split
in shard order). Readers take the members and nothing else, so every path reads the
same images.

This module imports neither TensorFlow nor tensorflow-datasets: bad paths fail before
either starts.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from simsiam_tf.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VAL_SEED = 0  # the validation split is the same whatever --seed a run uses
LIMIT_SEED = 0  # so is the --train-limit subset


# ---------------------------------------------------------------------------
# What --dataset names.


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A parsed `--dataset`: kind "digits", "folder" (a path), "tfrecord" (a glob or a
    directory written by prepare.py) or "tfds" (a tensorflow-datasets name)."""

    kind: str
    location: str = ""

    @property
    def text(self) -> str:
        """The `--dataset` string this came from."""
        if self.kind in ("folder", "tfrecord"):
            return f"{self.kind}:{self.location}"
        return self.location or self.kind


def parse_dataset(text: str) -> DatasetRef:
    """`--dataset` as a `DatasetRef`.

    Raises:
        UsageError: an empty value, or folder:/tfrecord: without a path.
    """
    if text == "digits":
        return DatasetRef("digits", "digits")
    if text.startswith("folder:"):
        if not text[len("folder:"):]:
            raise UsageError("--dataset folder: needs a path, e.g. --dataset folder:data/cifar10")
        return DatasetRef("folder", text[len("folder:"):])
    if text.startswith("tfrecord:"):
        if not text[len("tfrecord:"):]:
            raise UsageError("--dataset tfrecord: needs a glob or a directory, e.g. tfrecord:data/train-*.tfrecord")
        return DatasetRef("tfrecord", text[len("tfrecord:"):])
    if not text:
        raise UsageError("--dataset needs a value: digits, folder:PATH, tfrecord:GLOB or a tensorflow-datasets name")
    return DatasetRef("tfds", text)


# ---------------------------------------------------------------------------
# The one folder scan.


def image_files(directory: str) -> list[str]:
    """Image files under `directory`, sorted; symlinked directories are not followed."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


@dataclasses.dataclass
class FolderSplit:
    """The files of one split folder, sorted; `labels` index the train split's class
    folders, None for loose images."""

    root: str
    files: list[str]
    labels: list[int] | None


@dataclasses.dataclass
class FolderFiles:
    """An image folder as `scan_folder` finds it: its stored splits ("train" and, when
    PATH/test exists, "test") and the train split's class names ([] when unlabelled)."""

    path: str
    splits: dict[str, FolderSplit]
    class_names: list[str]


def train_root(path: str) -> str:
    """PATH/train when it exists, else PATH itself (a folder of loose images)."""
    root = os.path.join(path, "train")
    return root if os.path.isdir(root) else path


def _scan_split(root: str) -> tuple[list[str], list[int] | None, list[str]]:
    """Files, labels and class names of one split folder: labelled by subfolder when
    it has image-holding subfolders, else a folder of loose, unlabelled images."""
    # Symlinked folders are not classes: a link back up the tree would repeat images.
    classes = sorted(
        d for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not os.path.islink(os.path.join(root, d))
        and image_files(os.path.join(root, d))
    )
    if not classes:
        return image_files(root), None, []
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = image_files(os.path.join(root, name))
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    return files, labels, classes


def require_folder(path: str, flag: str = "--dataset folder:PATH") -> None:
    """UsageError unless `path` is a directory: checked before anything is imported or
    printed about the folder (train.py), and again when it is read."""
    if not os.path.isdir(path):
        raise UsageError(f"image folder {path!r} does not exist or is not a directory; check {flag}")


def scan_folder(path: str, flag: str = "--dataset folder:PATH") -> FolderFiles:
    """PATH/train/<class>/* and PATH/test/<class>/* (test labels are train class
    indices), or PATH itself when it has no train folder.

    Args:
        flag: how the user gave PATH, for the error messages.
    Raises:
        UsageError: a missing or empty folder, or test classes the train split lacks.
    """
    require_folder(path, flag)
    root = train_root(path)
    files, labels, classes = _scan_split(root)
    if not files:
        raise UsageError(
            f"image folder {root!r} holds no .jpg, .jpeg or .png files; "
            "expected PATH/train/<class>/*.jpg or a folder of images"
        )
    splits = {"train": FolderSplit(root, files, labels)}
    test_root = os.path.join(path, "test")
    if root != path and os.path.isdir(test_root):
        test_files, test_labels, test_classes = _scan_split(test_root)
        if test_labels is not None and labels is not None:
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise UsageError(
                    f"test classes {unknown} in {test_root!r} are not among the train classes; "
                    "the test split must use the train split's class folders"
                )
            remap = [classes.index(name) for name in test_classes]
            test_labels = [remap[label] for label in test_labels]
        else:
            test_labels = None  # without train classes there are no indices to give them
        if test_files:
            splits["test"] = FolderSplit(test_root, test_files, test_labels)
    return FolderFiles(path, splits, classes)


# ---------------------------------------------------------------------------
# The rules: which members each split takes.


def subset(n: int, limit: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """A fixed random subset of range(n) of size `limit`, sorted (all of it when
    `limit` is 0 or at least n); independent of --seed."""
    if not limit or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit]).astype(np.int64)


def hold_out(labels, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, held-out positions) of a labelled list, both sorted.

    Stratified and fixed: of each class's n images, round(fraction * n) drawn at random
    from `VAL_SEED` are held out (never all of them), so every class keeps its share in
    both parts and every run of a dataset holds out the same images.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(VAL_SEED)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held.extend(rng.permutation(members)[:count].tolist())
    held = np.sort(np.asarray(held, np.int64))
    return np.setdiff1d(np.arange(len(labels), dtype=np.int64), held), held


@dataclasses.dataclass(frozen=True)
class Stored:
    """One stored split of a dataset: its record count, whether it is labelled, and
    its labels (int32 [count]) when they are known without reading the images, or a
    function that reads them (for records, whose labels are only inside them; called
    only when a validation split has to be held out of them)."""

    count: int
    labelled: bool
    labels: object = None

    def read_labels(self) -> np.ndarray | None:
        labels = self.labels() if callable(self.labels) else self.labels
        return None if labels is None else np.asarray(labels, np.int32)


@dataclasses.dataclass(frozen=True)
class Members:
    """The records of one stored split that a split takes.

    Attributes:
        stored: the stored split's name ("train", "test", "validation", ...).
        indices: int64, sorted positions in that stored split.
        labelled: whether its records carry class labels.
        labels: int32 label of each member where known before reading (folders,
            digits, a held-out validation split), else None: readers take the labels
            from the records.
    """

    stored: str
    indices: np.ndarray
    labelled: bool
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)


def decide_splits(
    stored: dict[str, Stored],
    train_limit: int = 0,
    val_fraction: float = 0.0,
    test: str | None = "test",
    own_val: str | None = None,
) -> dict[str, Members]:
    """The members of "train", and of "val" and "test" where the dataset has them.

    - train: the stored "train" split; with `train_limit`, a fixed random subset of that
      many (`subset`), the validation split then coming out of it.
    - val (when `val_fraction` > 0): the dataset's own validation split `own_val` when
      given, else `hold_out` of the (limited) labelled training members. None for an
      unlabelled training split.
    - test: the stored split `test`, whole.
    """

    def whole(name):
        split = stored[name]
        known = None if callable(split.labels) else split.read_labels()
        return Members(name, np.arange(split.count, dtype=np.int64), split.labelled, known)

    train = stored["train"]
    indices = subset(train.count, train_limit)
    splits = {}
    if val_fraction and own_val and own_val in stored:
        splits["val"] = whole(own_val)
    labels = None
    if train.labelled and (val_fraction and "val" not in splits or not callable(train.labels)):
        labels = train.read_labels()[indices]
    if val_fraction and "val" not in splits and labels is not None:
        kept, held = hold_out(labels, val_fraction)
        splits["val"] = Members("train", indices[held], True, labels[held])
        indices, labels = indices[kept], labels[kept]
    splits["train"] = Members("train", indices, train.labelled, labels)
    if test and test in stored and stored[test].count:
        splits["test"] = whole(test)
    return {name: splits[name] for name in ("train", "val", "test") if name in splits}
