"""Where the time of one augmented view goes at 224 px: each step on its own.

    python benchmarks/augment_profile.py

The photometric half of the recipe runs per image, one XLA program per view: what
every input's host augmentation (`simsiam_tf.input.decode.image_views`) and CPU
replicas under `--augment-on device` run. Here it runs through
`augment.ViewAugment(per_image=True)` on a batch of 128 random 224 x 224 crops, with
each step's probability set to 0 or 1 in turn; then the crop half
(`simsiam_tf.input.decode.decode_crops`, two views per photo) on the benchmark photos
(`common.photo_folder`). Costs are milliseconds per view per core: wall time x cores /
views, so they add up to what one core spends on a view.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cifar_folder, Parser, photo_folder, report  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simsiam_tf import augment as aug  # noqa: E402
from simsiam_tf.input import decode  # noqa: E402

SIZE, BATCH = 224, 128


def photometric_ms(spec: aug.AugmentSpec, repeats: int) -> float:
    layer = aug.ViewAugment(spec, per_image=True)
    views = tf.constant(np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8))
    run = tf.function(lambda x, s: layer(x, seed=s))
    run(views, tf.constant([0, 0], tf.int64)).numpy()
    started = time.perf_counter()
    for i in range(repeats):
        out = run(views, tf.constant([0, i + 1], tf.int64))
    out.numpy()
    return (time.perf_counter() - started) * os.cpu_count() / (repeats * BATCH) * 1000


def crops_ms(count: int, batches: int) -> float:
    files = tf.io.gfile.glob(os.path.join(photo_folder(count), "train", "*", "*.jpg"))
    spec = aug.AugmentSpec.for_image_size(SIZE)
    ds = (
        tf.data.Dataset.from_tensor_slices(files).repeat().enumerate()
        .map(lambda i, f: decode.decode_crops(tf.io.read_file(f), tf.stack([tf.constant(0, tf.int64), i]), spec),
             num_parallel_calls=tf.data.AUTOTUNE)
        .batch(BATCH).prefetch(1)
    )
    it = iter(ds)
    next(it)
    started = time.perf_counter()
    for _ in range(batches):
        out = next(it)
    out.numpy()
    return (time.perf_counter() - started) * os.cpu_count() / (batches * BATCH * 2) * 1000


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    args = p.parse_args(argv)
    cifar_folder()  # a missing folder: one line naming how to make it, exit 2
    repeats = 1 if args.quick else 4
    none = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    recipe = aug.AugmentSpec.for_image_size(SIZE)
    cases = [
        ("no step drawn (cast, normalise, per-image call)", dataclasses.replace(recipe, **none)),
        ("+ flip always", dataclasses.replace(recipe, **{**none, "flip_prob": 1.0})),
        ("+ colour jitter always", dataclasses.replace(recipe, **{**none, "jitter_prob": 1.0})),
        ("+ grayscale always", dataclasses.replace(recipe, **{**none, "grayscale_prob": 1.0})),
        ("+ blur always", dataclasses.replace(recipe, **{**none, "blur_prob": 1.0})),
        ("the recipe (flip 0.5, jitter 0.8, grey 0.2, blur 0.5)", recipe),
    ]
    rows = []
    for name, spec in cases:
        ms = photometric_ms(spec, repeats)
        rows.append({"step": name, "ms_per_view_core": ms})
        print(f"  {name:<55} {ms:6.2f} ms per view per core", flush=True)
    ms = crops_ms(64 if args.quick else 1024, 2 if args.quick else 6)
    rows.append({"step": "decode at the crop + resize (JPEG 500x375)", "ms_per_view_core": ms})
    print(f"  {rows[-1]['step']:<55} {ms:6.2f} ms per view per core", flush=True)
    report("augment_profile", rows, [("step", "step"), ("ms_per_view_core", "ms/view/core")], {"size": SIZE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
