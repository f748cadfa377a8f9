"""SimSiam train_step against a plain forward and backward pass of its backbone.

Times are medians over the timed steps, after `warmup` steps that trace and compile.

    python benchmarks/train_step.py            # ResNet-18 (CIFAR variant), 32 px, global batch 256
    python benchmarks/train_step.py --quick    # batch 64, fewer steps

For float32 and bfloat16, with XLA off and on, in one process:
- fit step: `SimSiam.train_step` through `fit()`, as training runs it (both views
  through backbone, projector and predictor, the symmetric loss, gradients, the SGD
  update), timed per step by a callback;
- direct step: the same `train_step` called in a `tf.function`, without `fit()`;
- backbone: the same backbone's forward and backward pass on the same two views
  (gradient of the sum of its features), nothing else.
The ratio step / backbone is the cost of SimSiam's heads, loss and update; the target
is at most 1.15. Speeds are view pairs per second (one pair = two 32 px images).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_seconds, report  # noqa: E402
from step_clock import StepClock  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simsiam_tf.config import make_config  # noqa: E402
from simsiam_tf.model import build_simsiam  # noqa: E402
from simsiam_tf.optim import make_optimizer  # noqa: E402


def measure(precision: str, jit: bool, batch: int, steps: int, warmup: int, width: int) -> dict:
    config = make_config("cifar", precision=precision, batch_size=batch, width=width)
    keras.utils.set_random_seed(0)
    model = build_simsiam(config)
    model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=100), jit_compile=jit)
    x1 = tf.random.normal([batch, 32, 32, 3], seed=1)
    x2 = tf.random.normal([batch, 32, 32, 3], seed=2)
    ds = tf.data.Dataset.from_tensors((x1, x2)).repeat()
    # One fit() call, as in training, timed per step by a callback: every separate fit()
    # call can retrace the train function (measured: +20 s on the second call), which
    # is not a cost of the step.
    clock = StepClock()
    model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[clock])
    step = float(np.median(clock.steps[warmup:]))

    # The same train_step called directly in a tf.function: SimSiam's own cost without
    # the per-step work of Keras's fit() loop (iterator, callbacks, metrics plumbing).
    direct_step = tf.function(model.train_step, jit_compile=jit)
    direct = median_seconds(lambda: direct_step((x1, x2))["loss"].numpy(), warmup, steps)

    backbone = model.backbone

    @tf.function(jit_compile=jit)
    def forward_backward(a, b):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(backbone(a, training=True)) + tf.reduce_sum(backbone(b, training=True))
        return tape.gradient(total, backbone.trainable_variables)

    plain = median_seconds(lambda: forward_backward(x1, x2)[0].numpy(), warmup, steps)
    return {
        "precision": precision,
        "xla": jit,
        "step_pairs_per_s": batch / step,
        "direct_step_pairs_per_s": batch / direct,
        "backbone_pairs_per_s": batch / plain,
        "step_over_backbone": step / plain,
        "direct_over_backbone": direct / plain,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 64, 2 timed steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=64, help="backbone width (64 = ResNet-18)")
    args = p.parse_args(argv)
    batch, steps, warmup = (64, 2, 2) if args.quick else (args.batch, args.steps, 2)
    rows = []
    for precision in ("float32", "bfloat16"):
        for jit in (False, True):
            row = measure(precision, jit, batch, steps, warmup, args.width)
            rows.append(row)
            print(
                f"  {precision:<9} xla={str(jit):<5} fit step {row['step_pairs_per_s']:6.1f} pairs/s   "
                f"direct step {row['direct_step_pairs_per_s']:6.1f}   backbone {row['backbone_pairs_per_s']:6.1f}   "
                f"ratios {row['step_over_backbone']:.3f} / {row['direct_over_backbone']:.3f}",
                flush=True,
            )
    by = {(r["precision"], r["xla"]): r for r in rows}
    best32 = max(by[("float32", False)]["step_pairs_per_s"], by[("float32", True)]["step_pairs_per_s"])
    best16 = max(by[("bfloat16", False)]["step_pairs_per_s"], by[("bfloat16", True)]["step_pairs_per_s"])
    report(
        "train_step", rows,
        [("precision", "precision"), ("xla", "xla"), ("step_pairs_per_s", "fit() step pairs/s"),
         ("direct_step_pairs_per_s", "direct step pairs/s"), ("backbone_pairs_per_s", "backbone pairs/s"),
         ("step_over_backbone", "fit step/backbone"), ("direct_over_backbone", "direct step/backbone")],
        {"batch": batch, "width": args.width, "bf16_over_fp32_best": round(best16 / best32, 3),
         "bf16_over_fp32_no_xla": round(by[("bfloat16", False)]["step_pairs_per_s"] / by[("float32", False)]["step_pairs_per_s"], 3)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
