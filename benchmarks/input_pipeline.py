"""Augmented view pairs per second, per CPU core, for the SimSiam input pipeline.

    python benchmarks/input_pipeline.py            # 32, 96 and 224 px, then photos at 224 px
    python benchmarks/input_pipeline.py --quick    # fewer batches

Four pipelines, all producing two augmented views per image, batch 256:
- memory: the in-memory training input (`simsiam_tf.input.memory.MemoryInput.worker_batches`,
  what `train.py --input memory` runs): uint8 images held in memory, each image's two
  views made from its own seed, batches in the one batch format (uint8 [B, 2, S, S, 3],
  normalised later by `train_step` on the device);
- batched keras-cv layer: the vectorised keras-cv layer (`augment.SimSiamAugment`) on
  batches gathered by index from the same uint8 images, every random parameter drawn
  for the whole batch; normalised float32 view pairs (what training ran before the
  per-image input, kept for comparison);
- jpeg: the batched keras-cv layer, but every image is decoded from JPEG bytes and
  resized each time (what a dataset too large for memory costs);
- naive keras-cv: `RandomCropAndResize` + `RandomFlip` + `RandomApply(RandomColorJitter)`
  + `RandomApply(Grayscale)` on the images in memory; the first and the RandomApply
  layers run one image at a time.
At 32 px the images are CIFAR-10 from data/cifar10 (`python make_cifar10_folder.py --out
data/cifar10`, or the folder $SIMSIAM_CIFAR10 names); at 96 and 224 px the
same images upscaled (and, for the jpeg rows, re-encoded as JPEG at quality 90).
`memory_over_naive_32px` and `cached_over_naive_32px` are the 32 px rates of memory and
of the batched keras-cv layer (the former "cached" pipeline) over naive keras-cv.

Then photos at 224 px (`--photos N`, 0 to skip): CIFAR-10 upscaled to ImageNet's typical
500 x 375 and re-encoded as JPEG quality 90 in a temp dir (`common.photo_folder`), read
by each training input (`simsiam_tf.input.open_input`) with each placement of the
augmentation:
- memory: decoded once into memory (`MemoryInput`: the centre 256 x 256 square);
- stream folder / stream tfrecord: read every time (`simsiam_tf.input.stream.StreamInput`),
  each image decoded only at its two crops, drawn on the 500 x 375 original; the
  TFRecord shards are written by `simsiam_tf.input.records.write_records` (what
  prepare.py runs);
- work "full": the whole augmentation in tf.data (`--augment-on host`); "crops": decode,
  crop and resize only, what `--augment-on device` leaves to the CPU.
Per-core figures divide by the machine's cores, which tf.data uses in parallel.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    cifar_folder, Parser, batch_size, nonnegative_float, nonnegative_int, photo_folder, report, training_input,
)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simsiam_tf import augment as aug  # noqa: E402
from simsiam_tf.input import catalog, records, sources  # noqa: E402
from simsiam_tf.input.memory import MemoryInput  # noqa: E402

BATCH = 256


def _rate(ds: tf.data.Dataset, batches: int, warmup: int = 3) -> float:
    """Pairs per second over `batches` batches, after `warmup` batches."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(it)  # uint8 [B, 2, S, S, 3] (the batch format), or a float (x1, x2) pair
    (batch[0] if isinstance(batch, tuple) else batch).numpy()
    return batches * BATCH / (time.perf_counter() - started)


def memory(images, size, epochs=10_000):
    """The in-memory training input on `images` (unlabelled), as train.py reads it."""
    def resize(images, size):  # the default's storage resize, 256 images at a time
        return np.concatenate([aug.storage_resize_uint8(images[i : i + 256], size).numpy()
                               for i in range(0, len(images), 256)])

    source = sources.ArraySource("cifar10", {"train": (images, None)}, resize=resize)
    inp = MemoryInput(source, catalog.decide_splits(source.stored), size)
    return inp.worker_batches(BATCH, 0, 1, aug.AugmentSpec.for_image_size(size), seed=0, epochs=epochs)


def batched_layer(images, size, epochs=10_000):
    """`augment.SimSiamAugment` on batches gathered from `images`: each epoch a stateless
    shuffle, each batch's two views drawn from (seed 0, step), float32 (x1, x2)."""
    layer = aug.SimSiamAugment(aug.AugmentSpec.for_image_size(size))
    stored, n = tf.constant(images), len(images)
    steps = n // BATCH

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int32), seed=tf.stack([tf.constant(0, tf.int64), epoch]))
        step = epoch * steps + tf.range(steps, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((tf.reshape(order[: steps * BATCH], [steps, BATCH]), step))

    def views(index, step):
        return aug.two_views(layer, tf.gather(stored, index), tf.stack([tf.constant(0, tf.int64), 1 + step]))

    return (
        tf.data.Dataset.range(epochs).flat_map(epoch_batches)
        .map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def from_jpeg(jpegs, size):
    layer = aug.SimSiamAugment(aug.AugmentSpec.for_image_size(size))

    def decode(raw):
        image = tf.io.decode_jpeg(raw, channels=3)
        return aug.resize_uint8(image[None], size)[0]

    return (
        tf.data.Dataset.from_tensor_slices(jpegs).repeat()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(BATCH, drop_remainder=True)
        .enumerate()
        .map(lambda step, x: aug.two_views(layer, x, tf.stack([tf.constant(0, tf.int64), step])),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def naive(images, size):
    layer = aug.naive_keras_cv_augment(aug.AugmentSpec.for_image_size(size))
    stored = tf.constant(images)
    n = len(images)

    def views(index):
        x = tf.cast(tf.gather(stored, index), tf.float32)
        return layer(x), layer(x)

    return (
        tf.data.Dataset.range(10**9).map(lambda i: i % n).batch(BATCH)
        .map(views, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def load_cifar(folder: str, count: int) -> tuple[np.ndarray, list[bytes]]:
    """`count` CIFAR-10 training images of `folder` (uint8) and their JPEG files' bytes."""
    files = catalog.image_files(os.path.join(folder, "train"))
    files = [files[i] for i in catalog.subset(len(files), count)]
    raw = [open(f, "rb").read() for f in files]
    images = np.stack([tf.io.decode_jpeg(r, channels=3).numpy() for r in raw])
    return images, raw


def photo_pipelines(count: int, grain: float = 0.0):
    """(input, work, dataset) at 224 px for each training input and placement."""
    import tempfile

    size = 224
    spec = aug.AugmentSpec.for_image_size(size)
    root = photo_folder(count, grain)
    shards = os.path.join(tempfile.gettempdir(), "simsiam-tf-bench", f"shards-{os.path.basename(root)}")
    if records.read_index(shards) is None:
        records.write_records(root, shards, shards=16, overwrite=True)
    in_memory = training_input(f"folder:{root}", size, "memory")
    inputs = {
        "memory": lambda on: in_memory.worker_batches(BATCH, 0, 1, spec, 0, 10_000, augment_on=on),
        "stream folder": lambda on: training_input(f"folder:{root}", size, "stream").worker_batches(
            BATCH, spec, 0, 10_000, augment_on=on),
        "stream tfrecord": lambda on: training_input(f"tfrecord:{shards}", size, "stream").worker_batches(
            BATCH, spec, 0, 10_000, augment_on=on),
    }
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
    for name, make in inputs.items():
        for work, on in (("full", "host"), ("crops", "device")):
            yield name, work, make(on), float(np.mean(sizes)) / 1024


def main(argv=None) -> int:
    global BATCH
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer batches, 32 and 96 px only, 256 photos")
    p.add_argument("--sizes", default=None, help='comma-separated sizes (default 32,96,224; "" for photos only)')
    p.add_argument("--photos", type=nonnegative_int, default=None, help="photos for the 224 px inputs (default 2048; 0: skip)")
    p.add_argument("--grain", type=nonnegative_float, default=0.0, help="noise std added to the photos (bigger JPEGs)")
    p.add_argument("--batch", type=batch_size, default=BATCH, help=f"pairs per batch (default {BATCH})")
    args = p.parse_args(argv)
    cifar = cifar_folder()  # a missing folder: one line naming how to make it, exit 2
    if args.batch < 2 or (args.photos is not None and args.photos < 0):
        print("input_pipeline.py: error: --batch must be at least 2 and --photos at least 0", file=sys.stderr)
        return 2
    BATCH = args.batch
    default = "32,96" if args.quick else "32,96,224"
    sizes = [int(s) for s in (default if args.sizes is None else args.sizes).split(",") if s]
    batches = {32: 40, 96: 12, 224: 4} if not args.quick else {32: 10, 96: 4, 224: 2}
    naive_batches = {32: 6, 96: 3, 224: 2} if not args.quick else {32: 2, 96: 1, 224: 1}
    cores = os.cpu_count()
    rows = []
    if sizes:
        base, base_jpegs = load_cifar(cifar, 2048)
    for size in sizes:
        if size == 32:
            images, jpegs = base, base_jpegs
        else:
            images = aug.resize_uint8(base, size).numpy()
            jpegs = [tf.io.encode_jpeg(im, quality=90).numpy() for im in images]
        n = batches.get(size, 4)
        for name, ds, count in (
            ("memory", memory(images, size), n),
            ("batched keras-cv layer", batched_layer(images, size), n),
            ("jpeg", from_jpeg(jpegs, size), n),
            ("naive keras-cv", naive(images, size), naive_batches.get(size, 1)),
        ):
            rate = _rate(ds, count)
            rows.append({"size": size, "pipeline": name, "pairs_per_s": rate, "pairs_per_s_per_core": rate / cores})
            print(f"  {size:>3} px  {name:<22} {rate:>9,.0f} pairs/s  ({rate / cores:,.0f} per core)", flush=True)
    extra = {"batch": BATCH}

    def rate32(pipeline):
        return next((r["pairs_per_s"] for r in rows if r["size"] == 32 and r["pipeline"] == pipeline), None)

    if rate32("naive keras-cv"):
        extra["memory_over_naive_32px"] = round(rate32("memory") / rate32("naive keras-cv"), 2)
        extra["cached_over_naive_32px"] = round(rate32("batched keras-cv layer") / rate32("naive keras-cv"), 2)
    photos = args.photos if args.photos is not None else (256 if args.quick else 2048)
    if photos:
        count = 2 if args.quick else 8
        for name, work, ds, kib in photo_pipelines(photos, args.grain):
            rate = _rate(ds, count, warmup=2)
            rows.append({
                "size": 224, "pipeline": name, "work": work, "pairs_per_s": rate,
                "pairs_per_s_per_core": rate / cores, "photo_kib": round(kib, 1),
            })
            print(f"  224 px  {name:<22} {work:<5} {rate:>9,.0f} pairs/s  ({rate / cores:,.0f} per core)", flush=True)
        extra.update(photos=photos, grain=args.grain, photo_size="500x375", photo_quality=90)
    report(
        "input_pipeline", rows,
        [("size", "px"), ("pipeline", "pipeline"), ("work", "work"), ("pairs_per_s", "pairs/s"),
         ("pairs_per_s_per_core", "pairs/s/core")],
        extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
