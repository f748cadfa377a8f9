"""Write CIFAR-10 (or another labelled TFDS image dataset) as the image folder train.py reads.

    python make_cifar10_folder.py --out data/cifar10                 # where the docs' commands look
    python make_cifar10_folder.py --out data/cifar10 --data-dir ~/tensorflow_datasets
    python make_cifar10_folder.py --out data/cifar10-small --limit 1000
    python train.py --dataset folder:data/cifar10

--out receives train/<class>/<n>.jpg and test/<class>/<n>.jpg, <n> counting from 0000
in each class and class names taken from the dataset's label feature (airplane,
automobile, ...). tensorflow-datasets downloads and prepares the dataset into --data-dir
(default: its own, ~/tensorflow_datasets) when it is not prepared there; offline, copy
a folder made on a connected machine, or pass a --data-dir prepared elsewhere.

Images are JPEG at quality 95: the layout the docs and `--dataset folder:PATH`'s
messages name is *.jpg, and training then decodes only the
crop box of each image (`tf.io.decode_and_crop_jpeg`) as it does on any folder. CIFAR
is stored losslessly; quality 95 moved a pixel by 2 levels of 255 on average (100 CIFAR-10
images, 1.2 KB each against 2.3 KB as PNG), far less than the augmentation's colour jitter.

The images go to a sibling DIR.partial-XXXX first and are renamed to DIR at the end, so
DIR is either complete or absent. Bad input, an existing non-empty DIR without
--overwrite, or a dataset TFDS cannot get exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser

QUALITY = 95


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="make_cifar10_folder.py", description=__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write: DIR/train/<class>/*.jpg, DIR/test/...")
    p.add_argument("--dataset", default="cifar10", help="tensorflow-datasets name (default cifar10)")
    p.add_argument("--data-dir", help="TFDS data_dir to read or prepare it in (default: TFDS's own)")
    p.add_argument("--limit", type=_count, default=0, metavar="N", help="at most N images per split (default 0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DIR")
    return p


def _command(args) -> str:
    dataset = f" --dataset {args.dataset}" if args.dataset != "cifar10" else ""
    return f"python make_cifar10_folder.py --out DIR{dataset}"


def _builder(args):
    """The prepared builder of --dataset, downloaded when it is not prepared and can be."""
    import tensorflow_datasets as tfds

    from simsiam_tf.errors import UsageError
    from simsiam_tf.input import tfds_data

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json" for a data_dir not prepared yet
    try:
        found = tfds.builder(args.dataset, data_dir=args.data_dir)
        prepared = found.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(f"--dataset {args.dataset!r} is not a tensorflow-datasets name (see tfds.list_builders())")
    finally:
        absl.setLevel(level)
    if not prepared and tfds_data.manual_download(found) is None and not tfds_data.network_available():
        raise UsageError(
            f"tensorflow-datasets could not get {args.dataset} (no network, and it is not prepared in "
            f"{found.data_dir}): run `{_command(args)}` on a machine with network and copy DIR here, "
            "or pass --data-dir where it is prepared"
        )
    found = tfds_data.builder(args.dataset, args.data_dir)  # downloads; its errors are one line too
    features = found.info.features
    if "image" not in features or "label" not in features or not getattr(features["label"], "names", None):
        raise UsageError(f"tensorflow-datasets {args.dataset!r} has no 'image' and class 'label' features")
    return found


def _write_split(found, split: str, folder: str, limit: int) -> int:
    """Every image of `split` (the first `limit`) as folder/<class>/<n>.jpg; the count."""
    import tensorflow as tf

    names = found.info.features["label"].names
    ds = found.as_dataset(split=split, shuffle_files=False)
    if limit:
        ds = ds.take(limit)
    ds = ds.map(
        lambda ex: (tf.io.encode_jpeg(ex["image"], quality=QUALITY), ex["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    per_class = [0] * len(names)
    for jpeg, label in ds.as_numpy_iterator():
        if not per_class[label]:  # a class --limit leaves out gets no empty folder
            os.makedirs(os.path.join(folder, names[label]))
        with open(os.path.join(folder, names[label], f"{per_class[label]:04d}.jpg"), "wb") as f:
            f.write(jpeg)
        per_class[label] += 1
    return sum(per_class)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.errors import UsageError

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"make_cifar10_folder.py: error: --out {args.out!r} is a file, not a folder", file=sys.stderr)
        return 2
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        print(
            f"make_cifar10_folder.py: error: --out {args.out!r} exists and is not empty; "
            "pass --overwrite to replace it, or choose another --out",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    try:
        with tf_quiet.first_import():  # tensorflow-datasets imports TensorFlow only if it must prepare
            found = _builder(args)
    except UsageError as e:
        print(f"make_cifar10_folder.py: error: {e}", file=sys.stderr)
        return 2
    from simsiam_tf.input import tfds_data

    splits = {"train": "train", "test": tfds_data.test_split(found)}
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        partial = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    except OSError as e:
        print(f"make_cifar10_folder.py: error: cannot write beside --out {args.out!r}: {e.strerror}", file=sys.stderr)
        return 2
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 would stay on DIR after the rename
    counts = {}
    tf_quiet.import_tensorflow()  # _write_split's images pass through TensorFlow
    try:
        for folder, split in splits.items():
            if split is None:
                continue
            split_started = time.time()
            counts[folder] = _write_split(found, split, os.path.join(partial, folder), args.limit)
            print(f"{folder}: {counts[folder]:,} images from {args.dataset} {split!r} ({time.time() - split_started:.1f} s)")
        if os.path.isdir(out):  # empty, or --overwrite: the old folder goes only once the new one is whole
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
            os.rename(out, os.path.join(old, "folder"))
            os.rename(partial, out)
            shutil.rmtree(old)
        else:
            os.rename(partial, out)
    except KeyboardInterrupt:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"\ninterrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    classes = len(found.info.features["label"].names)
    written = " and ".join(f"{n:,} {folder}" for folder, n in counts.items())
    print(
        f"Wrote {written} images of {args.dataset} ({classes} classes, JPEG quality {QUALITY}) to {args.out} "
        f"in {time.time() - started:.1f} s; train on them with: python train.py --dataset folder:{args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
