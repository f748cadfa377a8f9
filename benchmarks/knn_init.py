"""kNN top-1 of an untrained encoder, with and without BatchNorm statistics from data:
why the "before training" figure calibrates BatchNorm first (README, Monitoring).

    python benchmarks/knn_init.py                       # digits preset, seed 0
    python benchmarks/knn_init.py --dataset folder:../shared/datasets/cifar10 --preset digits --seeds 0,1,2

A freshly initialised network keeps BatchNorm's moving mean 0 and variance 1, so its
inference-mode features are not normalised at all. train.py's kNN monitor first
estimates those statistics on the training images (`callbacks.calibrate_batchnorm`,
no weight changes) and then measures. This script builds the preset's model at each
seed, with the initial weights training would start from, and prints the test-split
kNN top-1 (the monitor's k and temperature, the train split less the validation split
as the bank) before and after that calibration.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, report  # noqa: E402


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds such as 0,1,2, got {text!r}")
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def main(argv=None) -> int:
    p = Parser(prog="knn_init.py", description=__doc__)
    p.add_argument("--dataset", default="digits", help="as train.py's --dataset (default digits)")
    p.add_argument("--preset", default=None, help="as train.py's --preset (default: chosen from --dataset)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated (default 0)")
    args = p.parse_args(argv)

    import keras

    from simsiam_tf import callbacks as cb
    from simsiam_tf import inputs
    from simsiam_tf.config import UsageError, make_config
    from simsiam_tf.model import build_model

    rows = []
    for seed in args.seeds:
        try:
            config = make_config(args.preset, dataset=args.dataset, seed=seed)
            training_input = inputs.open_input(config, inputs.resolve_input(config)[0])
        except UsageError as e:
            print(f"knn_init.py: error: {e}", file=sys.stderr)
            return 2
        if not training_input.has_knn_splits:
            print("knn_init.py: error: the dataset needs labelled train and test splits for kNN", file=sys.stderr)
            return 2
        probe = cb.KnnProbe(
            training_input.eval_images("train", config.knn_train_limit), training_input.eval_images("test"),
            config.image_size, config.knn_k, config.knn_temperature, len(training_input.class_names) or None,
        )
        keras.utils.set_random_seed(config.seed)  # as training.run, so these are its initial weights
        model = build_model(config)
        raw = probe(model.backbone)["test"]
        cb.calibrate_batchnorm(model.backbone, probe.bank, config.image_size)
        calibrated = probe(model.backbone)["test"]
        rows.append({"seed": seed, "knn_top1_raw_init": raw, "knn_top1_calibrated_init": calibrated})
    report(
        "knn_init",
        rows,
        [("seed", "seed"), ("knn_top1_raw_init", "kNN top-1, init as built"),
         ("knn_top1_calibrated_init", "kNN top-1, BatchNorm statistics from data")],
        {"dataset": args.dataset},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
