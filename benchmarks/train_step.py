"""SimSiam train_step against a plain forward and backward pass of its backbone.

Times are medians over the timed steps, after `warmup` steps that trace and compile.

    python benchmarks/train_step.py            # ResNet-18 (CIFAR variant), 32 px, global batch 256
    python benchmarks/train_step.py --quick    # batch 64, fewer steps
    python benchmarks/train_step.py --preset imagenet --batch 32 --precision float32 --xla off   # ResNet-50, 224 px

For float32 and bfloat16, with XLA off and on, in one process:
- fit step: `SimSiam.train_step` through `fit()`, as training runs it, on one batch
  of random uint8 views in the batch format ([B, 2, S, S, 3]: unpacking and normalising
  them, both views through backbone, projector and predictor, the symmetric loss,
  gradients, the SGD update), timed per step by a callback;
- direct step: the same `train_step` called in a `tf.function`, without `fit()`;
- backbone: the same backbone's forward and backward pass on the same two views,
  normalised beforehand (gradient of the sum of its features), nothing else.
The ratio step / backbone is the cost of SimSiam's heads, loss and update; the target
is at most 1.15. Speeds are view pairs per second (one pair = two images at the preset's size).

Against PyTorch, one command (docs/performance.md, "Against PyTorch"):

    python benchmarks/train_step.py --batch 128 --xla off --torch --rounds 2

--torch runs the PyTorch SimSiam our speed is compared with
(../shared/peers/torch_simsiam.py --step-bench, channels_last, autocast for bfloat16)
at the same batch, width and thread count, alternating with ours for --rounds rounds,
and prints ours / PyTorch's per precision. It runs in its own process, with this
Python if it can import torch, else with $SIMSIAM_TORCH_PYTHON (PyTorch is never
installed into the project; the install command is in benchmarks/torch_parity.py):
one process per framework keeps their thread pools apart. Without either, the
PyTorch rows are skipped with a note. The PyTorch figure is the mean over its timed
steps after 5 warm-up steps, ours the median: a step is seconds long here, so
both are the steady step time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, REPO, Parser, batch_size, median_seconds, missing_cifar, positive_int, report  # noqa: E402
from step_clock import StepClock  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simsiam_tf.config import make_config  # noqa: E402
from simsiam_tf.input.batches import unpack  # noqa: E402
from simsiam_tf.model import build_simsiam, normalize_uint8  # noqa: E402
from simsiam_tf.optim import make_optimizer  # noqa: E402


def measure(precision: str, jit: bool, batch: int, steps: int, warmup: int, width: int, preset: str = "cifar",
            image_size: int | None = None, fit_only: bool = False, batches: tf.data.Dataset | None = None,
            augment_on: str = "host", rewrite: bool = False) -> dict:
    """Pairs per second of the fit step, the direct step and the backbone alone (see
    the module docstring), for `preset` at its image size or `image_size`.

    fit_only: time the fit step alone (one compilation instead of three: what
    gpu_check.py needs within its time budget).
    batches: fit on these (a training input's batches, in the batch format, at least
    warmup + steps of them) instead of one constant batch: the step end to end, input
    included; `augment_on` as the input was made (device: train_step augments).
    rewrite (bfloat16 only): a float32 model that grappler's
    auto_mixed_precision_onednn_bfloat16 pass rewrites to bfloat16 when the step is
    traced, instead of Keras's mixed_bfloat16 policy. It stays on for the process.
    """
    sized = {"image_size": image_size} if image_size else {}
    if rewrite:
        if precision != "bfloat16":
            raise ValueError("rewrite=True is a way to compute in bfloat16: pass precision='bfloat16'")
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
        precision = "float32"  # the model as built; grappler makes its step bfloat16
    config = make_config(preset, precision=precision, batch_size=batch, width=width, augment_on=augment_on, **sized)
    keras.utils.set_random_seed(0)
    model = build_simsiam(config)
    model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=100), jit_compile=jit)
    size = config.image_size
    # The batch format: both views in one uint8 [B, 2, S, S, 3] tensor, as every input delivers.
    views = tf.cast(tf.random.uniform([batch, 2, size, size, 3], 0, 256, tf.int32, seed=1), tf.uint8)
    ds = tf.data.Dataset.from_tensors(views).repeat() if batches is None else batches
    # One fit() call, as in training, timed per step by a callback: every separate fit()
    # call can retrace the train function (measured: +20 s on the second call), which
    # is not a cost of the step.
    clock = StepClock()
    model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[clock])
    step = float(np.median(clock.steps[warmup:]))
    precision = "bfloat16" if rewrite else precision
    if fit_only:
        return {"precision": precision, "xla": jit, "step_pairs_per_s": batch / step}

    # The same train_step called directly in a tf.function: SimSiam's own cost without
    # the per-step work of Keras's fit() loop (iterator, callbacks, metrics plumbing).
    direct_step = tf.function(model.train_step, jit_compile=jit)
    direct = median_seconds(lambda: direct_step(views)["loss"].numpy(), warmup, steps)

    backbone = model.backbone
    x1, x2 = (normalize_uint8(x) for x in unpack(views))  # the float views train_step makes

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


PEER = os.path.join(os.path.dirname(REPO), "shared", "peers", "torch_simsiam.py")


def torch_step(python: str, precision: str, batch: int, steps: int, width: int, threads: int,
               data: str = CIFAR, device: str = "cpu") -> float:
    """Pairs per second of the PyTorch reference's full training step, run by `python`
    on `device` ("cpu" or "cuda"). Its step benchmark times random tensors, but it
    opens `data` (any folder with train/<class>/ and test/<class>/) before it starts."""
    cmd = [python, PEER, "--data", data, "--step-bench", str(steps), "--batch-size", str(batch),
           "--width", str(width), "--threads", str(threads), "--device", device]
    if precision == "bfloat16":
        cmd.append("--bf16")
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the PyTorch reference failed ({last}): {' '.join(cmd)}")
    return float(json.loads(lines[-1])["train_images_per_sec"])


def torch_python(data: str = CIFAR) -> tuple[str | None, str]:
    """The interpreter for --torch, or None and why the PyTorch rows are skipped
    (`data`: the folder torch_step will hand the reference)."""
    from torch_parity import Usage, resolve_torch_python

    if not os.path.isfile(PEER):
        return None, f"skipped PyTorch: no reference at {PEER}"
    why = missing_cifar(data)
    if why:
        return None, f"skipped PyTorch: its step benchmark opens a CIFAR-10 folder first: {why}"
    try:
        return resolve_torch_python(None), ""
    except Usage as e:
        return None, f"skipped PyTorch: {e}"


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="batch 64, 2 timed steps")
    p.add_argument("--batch", type=batch_size, default=256)
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--width", type=positive_int, default=64, help="backbone width (64 = ResNet-18)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16", "both"), default="both")
    p.add_argument("--xla", choices=("off", "on", "both"), default="both")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch reference and print the ratio")
    p.add_argument("--preset", choices=("cifar", "imagenet"), default="cifar",
                   help="the model and image size: cifar (ResNet-18 CIFAR variant, 32 px; default) or imagenet "
                   "(ResNet-50, 224 px, 3-layer projector)")
    p.add_argument("--rounds", type=positive_int, default=1, help="repeat everything, alternating frameworks")
    p.add_argument("--fit-only", action="store_true", help="time the fit step only (no direct step, no backbone)")
    p.add_argument("--rewrite", action="store_true",
                   help="bfloat16 by grappler's auto_mixed_precision_onednn_bfloat16 rewrite of a float32 model "
                        "instead of Keras's mixed_bfloat16 policy (with --precision bfloat16)")
    args = p.parse_args(argv)
    if args.rewrite and args.precision != "bfloat16":
        p.error("--rewrite is a way to compute in bfloat16: pass --precision bfloat16 with it")
    if min(args.batch, args.steps, args.width, args.rounds) < 1:
        p.error("--batch, --steps, --width and --rounds must be at least 1")
    if args.torch and args.preset != "cifar":
        p.error("--torch compares the cifar preset only (the PyTorch reference is a CIFAR ResNet-18)")
    batch, steps, warmup = (64, 2, 2) if args.quick else (args.batch, args.steps, 2)
    precisions = ("float32", "bfloat16") if args.precision == "both" else (args.precision,)
    xla = {"off": (False,), "on": (True,), "both": (False, True)}[args.xla]
    python, note = torch_python() if args.torch else (None, "")
    if note:
        print(note, flush=True)
    threads = int(tf.config.threading.get_intra_op_parallelism_threads()) or os.cpu_count()
    rows = []
    for rnd in range(1, args.rounds + 1):
        for precision in precisions:
            for jit in xla:
                row = {"framework": "simsiam_tf", "round": rnd,
                       **measure(precision, jit, batch, steps, warmup, args.width, args.preset, fit_only=args.fit_only,
                                 rewrite=args.rewrite)}
                rows.append(row)
                rest = ("" if args.fit_only else
                        f"   direct step {row['direct_step_pairs_per_s']:6.1f}   backbone {row['backbone_pairs_per_s']:6.1f}   "
                        f"ratios {row['step_over_backbone']:.3f} / {row['direct_over_backbone']:.3f}")
                print(f"  round {rnd} ours    {precision:<9} xla={str(jit):<5} fit step {row['step_pairs_per_s']:6.1f} pairs/s"
                      + rest, flush=True)
            if python:
                speed = torch_step(python, precision, batch, steps, args.width, threads)
                rows.append({"framework": "pytorch", "round": rnd, "precision": precision, "step_pairs_per_s": speed})
                print(f"  round {rnd} PyTorch {precision:<9} step {speed:6.1f} pairs/s", flush=True)
    extra = {"batch": batch, "width": args.width, "threads": threads, "preset": args.preset, "rewrite": args.rewrite}

    def best(precision, framework="simsiam_tf", jit=None):
        speeds = [r["step_pairs_per_s"] for r in rows if r["framework"] == framework and r["precision"] == precision
                  and (jit is None or r.get("xla") == jit)]
        return max(speeds) if speeds else None

    if len(precisions) == 2:
        extra["bf16_over_fp32_best"] = round(best("bfloat16") / best("float32"), 3)
        if False in xla:
            extra["bf16_over_fp32_no_xla"] = round(best("bfloat16", jit=False) / best("float32", jit=False), 3)
    if python:
        # Best of the rounds for each framework: noise on a shared machine only slows.
        extra["ours_over_pytorch"] = {q: round(best(q) / best(q, "pytorch"), 3) for q in precisions}
        for q, ratio in extra["ours_over_pytorch"].items():
            print(f"  {q}: ours {best(q):.1f} pairs/s, PyTorch {best(q, 'pytorch'):.1f}: {ratio:.2f}x", flush=True)
    elif args.torch:
        extra["pytorch_skipped"] = note
    report(
        "train_step", rows,
        [("framework", "framework"), ("round", "round"), ("precision", "precision"), ("xla", "xla"),
         ("step_pairs_per_s", "fit() step pairs/s"),
         ("direct_step_pairs_per_s", "direct step pairs/s"), ("backbone_pairs_per_s", "backbone pairs/s"),
         ("step_over_backbone", "fit step/backbone"), ("direct_over_backbone", "direct step/backbone")],
        extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
