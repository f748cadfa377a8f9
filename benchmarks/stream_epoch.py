"""One whole streaming epoch at 224 px: its rate and the process's peak memory.

    python benchmarks/stream_epoch.py                      # all 50,000 CIFAR-10 images as photos
    python benchmarks/stream_epoch.py --images 2048 --source tfrecord

The images are CIFAR-10 upscaled to 500 x 375 and re-encoded as JPEG quality 90 in a
temp dir (`common.photo_folder`; the first run writes them, about 2.5 GB for 50,000).
They are made in a child process, so the peak memory reported is the epoch's (with
TensorFlow's own). The epoch is what training reads:
`simsiam_tf.input.stream.StreamInput.worker_batches` at batch 256, in the one batch
format (uint8 [B, 2, S, S, 3]), the whole augmentation on the host (or `--augment-on
device`: decode, crop and resize only), every batch pulled to NumPy as `fit()` would.
Peak RSS is the process's high water mark (ru_maxrss), sampled after every batch, so
it includes TensorFlow itself; the RSS just before the epoch (TensorFlow, the pipeline
built) is reported beside it. Held in memory at 224 px the same images would need
images x 224 x 224 x 3 bytes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    cifar_folder, Parser, batch_size, current_rss_mb, peak_rss_mb, photo_folder, positive_int, report, training_input,
)

from simsiam_tf import augment as aug  # noqa: E402
from simsiam_tf.input import records  # noqa: E402


def prepare(images: int, source: str) -> tuple[str, str]:
    """The photo folder and (for tfrecord) its shards, made if missing."""
    root = photo_folder(images)
    shards = root + "-shards"
    if source == "tfrecord" and records.read_index(shards) is None:
        records.write_records(root, shards, overwrite=True)
    return root, shards


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--images", type=positive_int, default=50_000, help="training images (default: all 50,000)")
    p.add_argument("--source", default="folder", choices=("folder", "tfrecord"))
    p.add_argument("--augment-on", default="host", choices=("host", "device"))
    p.add_argument("--batch", type=batch_size, default=256)
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cifar_folder()  # a missing folder: one line naming how to make it, exit 2
    if args.images < args.batch or args.batch < 2:
        print("stream_epoch.py: error: --images must be at least --batch, and --batch at least 2", file=sys.stderr)
        return 2
    size = 224
    if args.prepare_only:
        prepare(args.images, args.source)
        return 0
    # Photos and shards are made in a child process, so that this process's peak memory
    # is the epoch's (and TensorFlow's) alone.
    subprocess.run([sys.executable, __file__, "--prepare-only", "--images", str(args.images),
                    "--batch", str(args.batch), "--source", args.source], check=True)
    root, shards = prepare(args.images, args.source)
    inp = training_input(f"tfrecord:{shards}" if args.source == "tfrecord" else f"folder:{root}", size, "stream")
    steps = inp.steps_per_epoch(args.batch)
    ds = inp.worker_batches(args.batch, aug.AugmentSpec.for_image_size(size), 0, 1, augment_on=args.augment_on)
    rss_start = current_rss_mb()
    started = time.perf_counter()
    peak, done = rss_start, 0
    for i, batch in enumerate(ds):
        batch.numpy()
        done += args.batch
        peak = max(peak, peak_rss_mb())
        if i % 20 == 0:
            print(f"  {done:,}/{steps * args.batch:,} pairs, peak RSS {peak:,.0f} MiB", flush=True)
    seconds = time.perf_counter() - started
    cores = os.cpu_count()
    row = {
        "images": inp.num_train, "source": args.source, "augment_on": args.augment_on, "pairs": done,
        "seconds": seconds, "pairs_per_s": done / seconds, "pairs_per_s_per_core": done / seconds / cores,
        "rss_before_epoch_mb": rss_start, "peak_rss_mb": peak,
        "in_memory_would_need_mb": inp.num_train * size * size * 3 / 2**20,
    }
    report(
        "stream_epoch", [row],
        [("images", "images"), ("source", "source"), ("augment_on", "augment on"), ("seconds", "s"),
         ("pairs_per_s_per_core", "pairs/s/core"), ("rss_before_epoch_mb", "RSS before MiB"), ("peak_rss_mb", "peak RSS MiB"),
         ("in_memory_would_need_mb", "in memory MiB")],
        {"batch": args.batch, "size": size, "skipped": inp.skipped_in_training()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
