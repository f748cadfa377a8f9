"""Image sources (bundled digits, tensorflow-datasets, image folders) and the tf.data
pipeline that turns them into pairs of augmented views.

This is the in-memory path (`--input memory`): every source is decoded once, brought to
the training size with `augment.storage_resize_uint8` (the evaluation resize), and held in
memory as uint8. Each training step then gathers a batch of images by index and augments
it on the batch, so JPEGs are never decoded twice. Datasets larger than memory stream
instead (`simsiam_tf.stream`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.config import UsageError
from simsiam_tf.image_sizes import IMAGE_EXTENSIONS  # one list, for training and for choosing the preset
OFFLINE_ALTERNATIVES = (
    "offline alternatives: --dataset digits (bundled with scikit-learn), "
    "--dataset folder:PATH (PATH/train/<class>/*.jpg), "
    "or --data-dir pointing at a TFDS data_dir prepared on a machine with network"
)


@dataclasses.dataclass
class ImageData:
    """A dataset held in memory.

    Attributes:
        train_images, test_images: uint8 [N, S, S, 3]; test_images may be None.
        train_labels, test_labels: int32 [N], or None where the split is unlabelled.
        class_names: names of the label ids, [] when unlabelled.
        skipped: files that could not be decoded and were left out.
        val_images, val_labels: the validation split held out of the training split
            (`hold_out`), or None.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def has_knn_splits(self) -> bool:
        """True when kNN monitoring is possible: labelled train and test splits."""
        return (
            self.train_labels is not None
            and self.test_images is not None
            and self.test_labels is not None
            and len(self.test_images) > 0
        )

    @property
    def has_val(self) -> bool:
        """True when a labelled validation split exists to choose checkpoints on."""
        return self.val_labels is not None and len(self.val_labels) > 0


def load(
    dataset: str,
    image_size: int,
    data_dir: str | None = None,
    train_limit: int = 0,
    memory_fraction: float = 0.5,
    val_fraction: float = 0.0,
) -> ImageData:
    """Load `dataset` into memory at `image_size`.

    Args:
        dataset: "digits", "folder:PATH", or a tensorflow-datasets name ("cifar10").
        data_dir: the TFDS data_dir (ignored by the other sources).
        train_limit: keep a fixed random subset of this many training images (0 = all).
        memory_fraction: refuse datasets whose images need more than this fraction of
            the machine's memory.
        val_fraction: hold this stratified fraction of the (limited) labelled training
            split out as the validation split (`hold_out`); a TFDS dataset with both a
            test and a validation split keeps its own.

    Raises:
        UsageError: unknown dataset, missing or empty folder, no network for a TFDS
            download, or a dataset that does not fit in memory.
    """
    if dataset == "digits":
        data = load_digits(image_size)
    elif dataset.startswith("folder:"):
        data = load_folder(dataset[len("folder:"):], image_size, memory_fraction, train_limit, val_fraction)
    else:
        data = load_tfds(dataset, image_size, data_dir, memory_fraction, val_fraction, train_limit)
    if train_limit and train_limit < len(data.train_images) and not dataset.startswith("folder:"):
        keep = subset(len(data.train_images), train_limit)
        data.train_images = data.train_images[keep]
        if data.train_labels is not None:
            data.train_labels = data.train_labels[keep]
    if val_fraction and data.val_images is None and data.train_labels is not None:
        train, val = hold_out(data.train_labels, val_fraction)
        data.val_images, data.val_labels = data.train_images[val], data.train_labels[val]
        data.train_images, data.train_labels = data.train_images[train], data.train_labels[train]
    return data


VAL_SEED = 0  # the validation split is the same whatever --seed a run uses


def hold_out(labels, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a labelled split, both sorted.

    Stratified and fixed: of each class's n images, round(fraction * n) drawn at random
    from `VAL_SEED` go to validation (never all of them), so every class keeps its share
    in both parts and every run of a dataset holds out the same images.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(VAL_SEED)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(int(round(fraction * len(members))), len(members) - 1)
        val.extend(rng.permutation(members)[:count].tolist())
    val = np.sort(np.asarray(val, np.int64))
    return np.setdiff1d(np.arange(len(labels)), val), val


def subset(n: int, limit: int) -> np.ndarray:
    """A fixed random subset of range(n) of size `limit`, sorted; independent of --seed."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


# ---------------------------------------------------------------------------
# Sources.


def load_digits(image_size: int = 32) -> ImageData:
    """scikit-learn's bundled 8x8 digits, upsampled to RGB `image_size`, split 75/25.

    The split is stratified and fixed (random_state=0), so every run and every test sees
    the same 1,347 training and 450 test images.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    # Pixel values are 0..16; scale to 0..255 before resizing.
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(small[..., None], 3, axis=-1)
    images = tf.image.resize(rgb, (image_size, image_size), method="bilinear")
    images = np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=0
    )
    return ImageData(
        name="digits",
        train_images=x_train,
        train_labels=y_train,
        test_images=x_test,
        test_labels=y_test,
        class_names=[str(d) for d in range(10)],
    )


def _image_files(directory: str) -> list[str]:
    """Image files under `directory`, sorted; symlinked directories are not followed."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        found.extend(
            os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


def _scan_split(root: str) -> tuple[list[str], list[int] | None, list[str]]:
    """Files, labels and class names of one split folder.

    A folder with image-holding subfolders is labelled by subfolder name; a folder of
    loose images is unlabelled.
    """
    # Symlinked folders are not classes: a link back up the tree would repeat images.
    classes = sorted(
        d for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not os.path.islink(os.path.join(root, d))
        and _image_files(os.path.join(root, d))
    )
    if classes:
        files, labels = [], []
        for label, name in enumerate(classes):
            class_files = _image_files(os.path.join(root, name))
            files.extend(class_files)
            labels.extend([label] * len(class_files))
        return files, labels, classes
    return _image_files(root), None, []


@dataclasses.dataclass
class FolderFiles:
    """The image files of a folder dataset, as `scan_folder` finds them.

    Labels are class indices into `class_names` (the train split's class folders), or
    None for a folder of loose images.
    """

    path: str
    train_root: str
    train_files: list[str]
    train_labels: list[int] | None
    test_files: list[str]
    test_labels: list[int] | None
    class_names: list[str]
    val_files: list[str] = dataclasses.field(default_factory=list)
    val_labels: list[int] | None = None


def scan_folder(path: str, train_limit: int = 0, val_fraction: float = 0.0) -> FolderFiles:
    """Find the images of PATH/train/<class>/* and PATH/test/<class>/*, or of loose images.

    With `train_limit`, a fixed random subset of the training files (`subset`); with
    `val_fraction`, that part of the labelled training files held out as the validation
    split (`hold_out`; by file, so the in-memory and the streaming input hold out the
    same images).

    Raises:
        UsageError: missing or empty folder, or test classes the train split lacks.
    """
    if not path:
        raise UsageError("--dataset folder: needs a path, e.g. --dataset folder:../shared/datasets/cifar10")
    if not os.path.isdir(path):
        raise UsageError(f"image folder {path!r} does not exist or is not a directory; check --dataset folder:PATH")
    train_root = os.path.join(path, "train")
    if not os.path.isdir(train_root):
        train_root = path
    train_files, train_labels, classes = _scan_split(train_root)
    if not train_files:
        raise UsageError(
            f"image folder {train_root!r} holds no .jpg, .jpeg or .png files; "
            "expected PATH/train/<class>/*.jpg or a folder of images"
        )
    test_files, test_labels = [], None
    test_root = os.path.join(path, "test")
    if train_root != path and os.path.isdir(test_root):
        test_files, test_labels, test_classes = _scan_split(test_root)
        if test_labels is not None and train_labels is not None:
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise UsageError(
                    f"test classes {unknown} in {test_root!r} are not among the train classes; "
                    "the test split must use the train split's class folders"
                )
            remap = [classes.index(name) for name in test_classes]
            test_labels = [remap[label] for label in test_labels]
    if train_limit:
        keep = subset(len(train_files), train_limit)
        train_files = [train_files[i] for i in keep]
        train_labels = None if train_labels is None else [train_labels[i] for i in keep]
    found = FolderFiles(path, train_root, train_files, train_labels, test_files, test_labels, classes)
    if val_fraction and train_labels is not None:
        train, val = hold_out(train_labels, val_fraction)
        found.val_files, found.val_labels = [train_files[i] for i in val], [train_labels[i] for i in val]
        found.train_files, found.train_labels = [train_files[i] for i in train], [train_labels[i] for i in train]
    return found


def load_folder(
    path: str, image_size: int, memory_fraction: float = 0.5, train_limit: int = 0, val_fraction: float = 0.0
) -> ImageData:
    """Read an image folder: PATH/train/<class>/* and PATH/test/<class>/*, or loose images.

    Files that cannot be decoded are skipped and listed in `ImageData.skipped`. With
    `train_limit`, only that many training files (a fixed random subset) are decoded;
    `val_fraction` as in `scan_folder`.
    """
    found = scan_folder(path, train_limit, val_fraction)
    train_root, classes = found.train_root, found.class_names
    train_files, train_labels = found.train_files, found.train_labels
    test_files, test_labels = found.test_files, found.test_labels
    _check_memory(len(train_files) + len(test_files) + len(found.val_files), image_size, memory_fraction, path)

    name = f"folder:{path}"
    started = time.time()
    x_train, y_train, bad_train = decode_files(train_files, train_labels, image_size)
    x_test, y_test, bad_test = (None, None, [])
    if test_files:
        x_test, y_test, bad_test = decode_files(test_files, test_labels, image_size)
    x_val, y_val, bad_val = (None, None, [])
    if found.val_files:
        x_val, y_val, bad_val = decode_files(found.val_files, found.val_labels, image_size)
    print(
        f"Decoded {len(train_files) + len(test_files) + len(found.val_files):,} images from {path} "
        f"in {time.time() - started:.0f} s",
        file=sys.stderr,
    )
    if len(x_train) == 0:
        raise UsageError(f"none of the {len(train_files)} image files in {train_root!r} could be decoded")
    return ImageData(
        name=name,
        train_images=x_train,
        train_labels=y_train,
        test_images=x_test,
        test_labels=y_test,
        class_names=classes,
        skipped=bad_train + bad_val + bad_test,
        val_images=x_val,
        val_labels=y_val,
    )


MAX_PIXELS = 250_000_000  # larger images are skipped rather than risk running out of memory


def _decode(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3]; large JPEGs are decoded at 1/2-1/8 scale.

    libjpeg can decode at a reduced scale for almost nothing, so a 10,000 px photo never
    takes 300 MB as full-size pixels when 32 px are wanted.
    """

    def jpeg():
        hw = tf.io.extract_jpeg_shape(raw)
        fold = tf.minimum(hw[0], hw[1]) // aug.eval_resize_side(image_size)
        branch = tf.cast(fold >= 2, tf.int32) + tf.cast(fold >= 4, tf.int32) + tf.cast(fold >= 8, tf.int32)
        return tf.switch_case(
            branch, [lambda r=r: tf.io.decode_jpeg(raw, channels=3, ratio=r) for r in (1, 2, 4, 8)]
        )

    def other():
        image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    tf.debugging.assert_less_equal(
        tf.cast(tf.shape(image)[0], tf.int64) * tf.cast(tf.shape(image)[1], tf.int64),
        tf.constant(MAX_PIXELS, tf.int64),
        message="image too large",
    )
    return image


def decode_files(files: list[str], labels: list[int] | None, image_size: int):
    """Decode and resize image files in parallel with tf.data.

    Files that cannot be decoded (empty, truncated, not images, unreadable, too large)
    are left out and returned. Grayscale, RGBA, 16-bit PNG and CMYK JPEG all decode to
    RGB uint8 (tests/test_reliability.py builds such a folder).

    Returns:
        (uint8 [N, S, S, 3], int32 [N] or None, list of the files that failed).
    """
    paths = np.array([os.fsencode(f) for f in files], dtype=object)
    index = np.arange(len(files), dtype=np.int64)

    def read(path, i):
        image = _decode(tf.io.read_file(path), image_size)
        return aug.storage_resize_uint8(image[None], image_size)[0], i

    ds = (
        tf.data.Dataset.from_tensor_slices((paths, index))
        .map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(1024)
        .prefetch(2)
    )
    chunks, kept = [], []
    for images, i in ds:
        chunks.append(images.numpy())
        kept.append(i.numpy())
    kept_idx = np.concatenate(kept) if kept else np.zeros([0], np.int64)
    side = aug.eval_resize_side(image_size)
    images = np.concatenate(chunks) if chunks else np.zeros([0, side, side, 3], np.uint8)
    failed = sorted(set(range(len(files))) - set(kept_idx.tolist()))
    out_labels = None if labels is None else np.asarray(labels, np.int32)[kept_idx]
    return images, out_labels, [files[i] for i in failed]


def memory_needed(count: int, image_size: int) -> int:
    """Bytes the in-memory path needs for `count` images at `image_size` (uint8 storage)."""
    side = aug.eval_resize_side(image_size)
    return count * side * side * 3


def memory_total() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(count: int, image_size: int, fraction: float, what: str) -> None:
    needed = memory_needed(count, image_size)
    total = memory_total()
    if needed > fraction * total:
        raise UsageError(
            f"{what}: {count:,} images at {image_size} px need {needed / 2**30:.1f} GiB in memory, "
            f"more than {fraction:.0%} of this machine's {total / 2**30:.0f} GiB; "
            "stream it from disk with --input stream (or auto), or use a smaller --image-size"
        )


def network_available(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """Whether the host TFDS downloads from can be reached at all (one quick connect)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tfds_builder(name: str, data_dir: str | None):
    """The prepared tensorflow-datasets builder of `name` (downloading it if it can).

    Raises:
        UsageError: unknown name, or not prepared and no network to download it.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(
            f"unknown dataset {name!r}: not 'digits', not 'folder:PATH', not 'tfrecord:GLOB' and not a "
            f"tensorflow-datasets name; {OFFLINE_ALTERNATIVES}"
        )
    if not builder.is_prepared():
        manual = manual_download(builder)
        if manual is not None and not manual[1]:
            raise UsageError(manual_download_message(name, builder, manual[0]))
        if manual is None and not network_available():
            raise UsageError(
                f"tensorflow-datasets cannot download {name!r}: no network, and it is not "
                f"prepared in {builder.data_dir!r}; {OFFLINE_ALTERNATIVES}"
            )
        try:
            builder.download_and_prepare()
        except Exception as e:  # TFDS raises many unrelated types for a failed download
            if manual is not None:  # files there, but not the right ones
                raise UsageError(manual_download_message(name, builder, manual[0], e))
            raise UsageError(
                f"tensorflow-datasets could not download {name!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); {OFFLINE_ALTERNATIVES}"
            )
    return builder


def manual_download(builder) -> tuple[str, bool] | None:
    """For a dataset whose files must be downloaded by hand (imagenet2012, ...): TFDS's
    manual_dir, `<data_dir>/downloads/manual`, and whether anything is in it; else None."""
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return None
    path = os.path.join(str(builder.data_dir_root), "downloads", "manual")
    return path, os.path.isdir(path) and bool(os.listdir(path))


def manual_download_message(name: str, builder, manual_dir: str, error: Exception | None = None) -> str:
    """One line: the dataset needs a manual download, where the files go, what else works."""
    instructions = " ".join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
    if len(instructions) > 300:
        instructions = instructions[:297] + "..."
    problem = (
        f"preparing it from the files in {manual_dir} failed ({type(error).__name__}: "
        f"{' '.join(str(error).split())[:160]})" if error is not None else f"{manual_dir} is missing or empty"
    )
    return (
        f"tensorflow-datasets {name!r} needs a manual download and {problem}. TFDS says: {instructions} "
        f"Put those files in {manual_dir} (TFDS's manual_dir under --data-dir) and run the same command again; "
        f"or train on the images directly: --dataset folder:PATH (PATH/train/<class>/*.jpg), or "
        f"python prepare.py --src PATH --out SHARDS, then --dataset tfrecord:SHARDS"
    )


def tfds_test_split(builder) -> str | None:
    """The split evaluation uses as the test split: "test", else "validation", else None."""
    # Without split metadata (tfds.testing.mock_data) the builder still serves both.
    splits = list(builder.info.splits.keys()) or ["train", "test"]
    return next((s for s in ("test", "validation") if s in splits), None)


def tfds_val_split(builder) -> str | None:
    """The dataset's own validation split, when it has one beside its test split."""
    splits = list(builder.info.splits.keys())
    return "validation" if "validation" in splits and tfds_test_split(builder) == "test" else None


def load_tfds(
    name: str,
    image_size: int,
    data_dir: str | None,
    memory_fraction: float = 0.5,
    val_fraction: float = 0.0,
    train_limit: int = 0,
) -> ImageData:
    """Load a tensorflow-datasets image classification dataset ("train" and "test" splits,
    and with `val_fraction` its "validation" split where it has one beside "test").

    With `train_limit`, only the fixed subset `subset` keeps of the "train" split is
    decoded, and only it counts against `memory_fraction` (with the test and validation
    splits), so a limit makes a large dataset fit.
    """
    builder = tfds_builder(name, data_dir)
    supervised = builder.info.supervised_keys is not None
    label_feature = builder.info.features["label"] if "label" in builder.info.features else None
    class_names = list(label_feature.names) if label_feature is not None else []

    test_split = tfds_test_split(builder)
    val_split = tfds_val_split(builder) if val_fraction and supervised else None
    splits = builder.info.splits
    keep = None  # train indices to hold; None: all, or unknown (no split metadata, tfds.testing.mock_data)
    if "train" in splits:
        num_train = splits["train"].num_examples
        keep = subset(num_train, train_limit) if train_limit and train_limit < num_train else None
        count = num_train if keep is None else len(keep)
        count += sum(splits[s].num_examples for s in (test_split, val_split) if s)
        _check_memory(count, image_size, memory_fraction, f"tensorflow-datasets {name!r}")

    def materialise(split, keep=None):
        ds = builder.as_dataset(split=split, as_supervised=supervised)
        if keep is not None:  # the subset `load` would take afterwards, without decoding the rest
            wanted = np.zeros(splits[split].num_examples, bool)
            wanted[keep] = True
            wanted = tf.constant(wanted)
            ds = ds.enumerate().filter(lambda i, example: wanted[i]).map(lambda i, example: example)
        if not supervised:
            ds = ds.map(lambda ex: (ex["image"], tf.constant(-1, tf.int64)))
        ds = ds.map(
            lambda x, y: (aug.storage_resize_uint8(_to_rgb(x)[None], image_size)[0], tf.cast(y, tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).batch(1024)
        xs, ys = [], []
        for x, y in ds:
            xs.append(x.numpy())
            ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = materialise("train", keep)
    x_test, y_test = materialise(test_split) if test_split else (None, None)
    x_val, y_val = materialise(val_split) if val_split else (None, None)
    if not supervised:
        y_train = y_test = None
    return ImageData(
        name=name,
        train_images=x_train,
        train_labels=y_train,
        test_images=x_test,
        test_labels=y_test,
        class_names=class_names,
        val_images=x_val,
        val_labels=y_val,
    )


def _to_rgb(image):
    """TFDS image features declare their channels: 1 (grey), 3 (RGB) or 4 (RGBA)."""
    image = tf.cast(image, tf.uint8)
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


# ---------------------------------------------------------------------------
# The training pipeline.


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    """Full batches per epoch; the last partial batch is dropped, as in the official code."""
    return num_images // global_batch


def pair_dataset(
    images: np.ndarray,
    global_batch: int,
    augment: aug.SimSiamAugment,
    seed: int,
    epochs: int,
    initial_epoch: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """Batches of two augmented views, ((x1, x2)), for epochs initial_epoch..epochs-1.

    The order and every augmentation are drawn from stateless seeds derived from
    (seed, epoch) and (seed, step), so a resumed run sees exactly the batches an
    uninterrupted run would have seen. Both views of an image come from the same gathered
    uint8 batch in one `map`.

    With `shard=(i, n)`, each element is the i-th of n equal slices of the global batch
    (one worker's share), with exactly the views the unsharded pipeline makes for those
    rows.
    """
    num = len(images)
    steps = steps_per_epoch(num, global_batch)
    if steps < 1:
        raise UsageError(
            f"--batch-size {global_batch} is larger than the {num} training images; "
            f"use --batch-size {max(2, num // 2)} or less"
        )
    index, count = shard
    if global_batch % count:
        raise UsageError(f"--batch-size {global_batch} is not divisible by the {count} input shards")
    local = global_batch // count
    stored = tf.constant(images)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num, dtype=tf.int32), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        batches = tf.reshape(order[: steps * global_batch], [steps, global_batch])
        step = epoch * steps + tf.range(steps, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((batches[:, index * local : (index + 1) * local], step))

    def make_views(batch_index, step):
        batch_seed = tf.stack([tf.constant(seed, tf.int64), tf.constant(1, tf.int64) + step])
        images_ = tf.gather(stored, batch_index)
        if count == 1:
            return aug.two_views(augment, images_, batch_seed)
        return aug.two_views(augment, images_, batch_seed, offset=index * local, total=global_batch)

    return (
        tf.data.Dataset.range(initial_epoch, epochs)
        .flat_map(epoch_batches)
        .map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def distribute_pairs(strategy: tf.distribute.Strategy, global_batch: int, make) -> tf.data.Dataset:
    """The pair pipeline for `strategy`, from `make(worker, workers, local_batch)`.

    Single-worker strategies get `make(0, 1, global_batch)` (Keras splits each global
    batch over the local replicas). Under MultiWorkerMirroredStrategy each worker builds
    only its own share, so no worker decodes or augments another's images; its elements
    are the two views stacked on the channel axis, [B, S, S, 6] (`model.split_views`).
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make(0, 1, global_batch)

    def worker_dataset(ctx: tf.distribute.InputContext):
        local = global_batch // ctx.num_input_pipelines
        ds = make(ctx.input_pipeline_id, ctx.num_input_pipelines, local)
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        if per_replica != local:  # several replicas per worker
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        # One tensor per element: Keras's fit() reduces a peeked batch with
        # strategy.reduce, which MultiWorkerMirroredStrategy cannot do on a tuple, nor
        # on uint8 (collectives take int32 and floats): uint8 views travel as int32 and
        # SimSiam.train_step casts them back.
        def stack(x1, x2):
            views = tf.concat([x1, x2], axis=-1)
            return tf.cast(views, tf.int32) if views.dtype == tf.uint8 else views

        return ds.map(stack)

    return strategy.distribute_datasets_from_function(worker_dataset)


def distributed_pairs(strategy: tf.distribute.Strategy, images, global_batch, augment, seed, epochs, initial_epoch=0):
    """`pair_dataset` for `strategy` (`distribute_pairs`): under MultiWorkerMirroredStrategy
    each worker makes its slice of every global batch, so together the workers see exactly
    the batches of a single-process run."""

    def make(worker, workers, local_batch):
        return pair_dataset(images, global_batch, augment, seed, epochs, initial_epoch, shard=(worker, workers))

    return distribute_pairs(strategy, global_batch, make)


def eval_batches(images: np.ndarray, image_size: int, batch_size: int = 256) -> tf.data.Dataset:
    """Evaluation-preprocessed batches of `images`, in order, for feature extraction."""
    return (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(batch_size)
        .map(lambda x: aug.eval_preprocess(x, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


# ---------------------------------------------------------------------------
# The in-memory path as a training input (`simsiam_tf.inputs` chooses between it and
# `simsiam_tf.stream.StreamInput`, which has the same methods).


class ArrayEvalImages:
    """One split's images in memory, already in the form `augment.eval_preprocess` takes.

    Attributes:
        images: uint8 [N, R, R, 3]; labels: int32 [N] or None.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int = 256):
        """(uint8 images, labels) batches in order."""
        for start in range(0, len(self.images), batch_size):
            labels = None if self.labels is None else self.labels[start : start + batch_size]
            yield self.images[start : start + batch_size], labels

    def calibration_batches(self, steps: int, batch_size: int):
        """`steps` batches of random images (sorted within a batch), seed 0, with wrap-around."""
        order = np.random.default_rng(0).permutation(len(self.images))
        for step in range(steps):
            idx = np.take(order, range(step * batch_size, (step + 1) * batch_size), mode="wrap")
            yield self.images[np.sort(idx)]

    def materialize(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.images, self.labels


class MemoryInput:
    """A dataset held in memory (`ImageData`) as a training input.

    Fast and exact: every epoch is a permutation of the stored images drawn from
    (seed, epoch), and crops are drawn on the stored images (the originals for 32 px
    datasets; see `augment.storage_resize_uint8` for larger sizes).
    """

    kind = "memory"

    def __init__(self, data: ImageData, image_size: int):
        self.data = data
        self.image_size = image_size
        self.name = data.name
        self.num_train = len(data.train_images)
        self.skipped = data.skipped
        self.class_names = data.class_names
        self.has_knn_splits = data.has_knn_splits
        self.has_val = data.has_val

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        return steps_per_epoch(self.num_train, global_batch)

    def pairs(self, strategy, global_batch, spec: aug.AugmentSpec, seed, epochs, initial_epoch=0, augment_on="host"):
        """`distributed_pairs` of the stored images; with augment_on="device", uint8 crops."""
        layer = aug.SimSiamAugment(spec) if augment_on == "host" else aug.SimSiamCrop(spec)
        return distributed_pairs(strategy, self.data.train_images, global_batch, layer, seed, epochs, initial_epoch)

    def eval_images(self, split: str, limit: int = 0) -> ArrayEvalImages:
        """A fixed subset (`subset`, independent of --seed) of the train, val or test split."""
        images = getattr(self.data, f"{split}_images")
        labels = getattr(self.data, f"{split}_labels")
        keep = subset(len(images), limit)
        return ArrayEvalImages(images[keep], None if labels is None else labels[keep])

    def preview(self, spec: aug.AugmentSpec, seed: int, count: int = 8):
        """Both views of the first `count` training images, float32 normalised, or None."""
        if self.num_train < count:
            return None
        ds = pair_dataset(self.data.train_images[:count], count, aug.SimSiamAugment(spec), seed, 1)
        return tuple(v.numpy() for v in next(iter(ds)))

    def skipped_in_training(self) -> int:
        """Images skipped while training (a decoded array never fails): 0."""
        return 0
