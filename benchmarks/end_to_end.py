"""train.py's training loop on CIFAR-10: input wait, throughput and memory across epochs.

    python benchmarks/end_to_end.py                       # 3 epochs of 10 steps, batch 256
    python benchmarks/end_to_end.py --quick               # 2 epochs of 4 steps, batch 128
    python benchmarks/end_to_end.py --precision bfloat16
    python benchmarks/end_to_end.py --input stream --augment-on device
    python benchmarks/end_to_end.py --photos 2048 --backbone resnet50 --width 8   # 224 px photos, streamed

Runs `simsiam_tf.training.run` (what train.py runs) on a fixed subset of
data/cifar10 (`python make_cifar10_folder.py --out data/cifar10`, or the folder
$SIMSIAM_CIFAR10 names), kNN and diagnostics off, and records the time of every
step and the process RSS at every epoch end. Then, in the same process, the same model
trains the same number of steps on one constant batch already in memory (random uint8
views in the batch format, [B, 2, S, S, 3]): no input pipeline at all. The input wait is the fraction of the real step time that the
constant-batch steps do not need: 1 - t_constant / t_real.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cifar_folder, Parser, batch_size, nonnegative_int, photo_folder, positive_int, report  # noqa: E402
from step_clock import StepClock, rss_mb  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simsiam_tf import training  # noqa: E402
from simsiam_tf.config import make_config  # noqa: E402


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--precision", default="float32")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=10, help="steps per epoch")
    p.add_argument("--batch", type=batch_size, default=256)
    p.add_argument("--width", type=positive_int, default=64)
    p.add_argument("--backbone", default="resnet18", choices=("resnet18", "resnet50"),
                   help="resnet18 is the CIFAR variant (no downsampling stem: far too costly at 224 px)")
    p.add_argument("--input", default="memory", choices=("memory", "stream"))
    p.add_argument("--augment-on", default="host", choices=("host", "device"))
    p.add_argument("--photos", type=nonnegative_int, default=0,
                   help="train at 224 px on N CIFAR-10 images upscaled to 500 x 375 photos, streamed")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.batch = 2, 4, 128
    cifar = cifar_folder()  # a missing folder: one line naming how to make it, exit 2
    dataset, size, limit = f"folder:{cifar}", 32, args.steps * args.batch
    if args.photos:
        dataset, size, args.input = f"folder:{photo_folder(args.photos)}", 224, "stream"
    config = make_config(
        "cifar", dataset=dataset, image_size=size, precision=args.precision, epochs=args.epochs,
        batch_size=args.batch, width=args.width, backbone=args.backbone, train_limit=limit, knn_every=0, diag_every=0,
        projector_images=0, input=args.input, augment_on=args.augment_on,
        val_fraction=0.0,  # a speed measurement: every image of the --steps x --batch subset trains
    )
    clock = StepClock()
    rss_start = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        training.run(config, os.path.join(tmp, "run"), verbose=0, extra_callbacks=[clock])
        wall = time.perf_counter() - started
    # Steady state: leave out the first epoch (tracing, pipeline warm-up).
    real = float(np.median(clock.steps[args.steps:])) if args.epochs > 1 else float(np.median(clock.steps[1:]))

    from simsiam_tf.model import build_simsiam
    from simsiam_tf.optim import make_optimizer

    model = build_simsiam(config)
    model.compile(optimizer=make_optimizer(model, config, args.steps), jit_compile=False)
    # One batch in the batch format (uint8 [B, 2, S, S, 3], both views), which train_step
    # unpacks, normalises and (with --augment-on device) augments itself.
    x = tf.cast(tf.random.uniform([args.batch, 2, size, size, 3], 0, 256, tf.int32), tf.uint8)
    constant = StepClock()
    model.fit(tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=args.steps, epochs=2,
              verbose=0, callbacks=[constant], shuffle=False)
    ideal = float(np.median(constant.steps[args.steps:]))

    rows = [
        {"measure": "step time, real pipeline (median, s)", "value": real},
        {"measure": "step time, constant batch (median, s)", "value": ideal},
        {"measure": "input wait (1 - constant/real)", "value": max(0.0, 1 - ideal / real)},
        {"measure": "pairs/s, real pipeline", "value": args.batch / real},
        {"measure": "RSS before training (MiB)", "value": rss_start[0]},
        *({"measure": f"RSS after epoch {i + 1} (MiB)", "value": r[0]} for i, r in enumerate(clock.rss)),
        {"measure": "peak RSS (MiB)", "value": clock.rss[-1][1]},
    ]
    report(
        "end_to_end", rows, [("measure", "measure"), ("value", "value")],
        {"precision": args.precision, "input": args.input, "augment_on": args.augment_on, "image_size": size,
         "batch": args.batch, "steps_per_epoch": args.steps, "epochs": args.epochs,
         "width": args.width, "backbone": args.backbone, "wall_s": round(wall, 1),
         "rss_growth_mb_after_first_epoch": round(clock.rss[-1][0] - clock.rss[0][0], 1)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
