"""kNN top-1 of an untrained encoder, with and without BatchNorm statistics from data:
why the "before training" figure calibrates BatchNorm first (README, Monitoring).

    python benchmarks/knn_init.py                       # digits preset, seed 0
    python benchmarks/knn_init.py --dataset folder:data/cifar10 --preset digits --seeds 0,1,2
    python benchmarks/knn_init.py --dataset folder:data/cifar10 --preset digits \
        --val-fraction 0 --precision-at 10       # the untrained side of serving/README.md's precision@10

A freshly initialised network keeps BatchNorm's moving mean 0 and variance 1, so its
inference-mode features are not normalised at all. train.py's kNN monitor first
estimates those statistics on the training images
(`diagnostics.embed.calibrate_batchnorm`, no weight changes) and then measures. This
script builds the preset's model at each seed, with the initial weights training would
start from, and prints the test-split kNN top-1 (the monitor's k and temperature, the
train split less the validation split as the bank) before and after that calibration.
With `--precision-at K`, also the retrieval precision@K of the test split against that
bank by cosine similarity (`serving.similar`'s exact search), as serving/README.md
measures a trained encoder.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, nonnegative_float, nonnegative_int, report  # noqa: E402


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds such as 0,1,2, got {text!r}")
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def _precision_at(backbone, probe, image_size: int, k: int) -> float:
    """Precision@k of the probe's test split against its bank, by exact cosine search."""
    from serving.similar import precision_at, top_k
    from simsiam_tf.diagnostics.embed import FeatureExtractor

    extract = FeatureExtractor(backbone, image_size)
    bank, bank_labels = extract.embed_split(probe.bank)
    queries, labels = extract.embed_split(probe.queries["test"])
    indices, _ = top_k(queries, bank, k)
    return precision_at(bank_labels, labels, indices)


def main(argv=None) -> int:
    p = Parser(prog="knn_init.py", description=__doc__)
    p.add_argument("--dataset", default="digits", help="as train.py's --dataset (default digits)")
    p.add_argument("--preset", default=None, help="as train.py's --preset (default: chosen from --dataset)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated (default 0)")
    p.add_argument("--val-fraction", type=nonnegative_float, help="as train.py's (0: the whole train split is the bank)")
    p.add_argument("--precision-at", type=nonnegative_int, default=0, metavar="K",
                   help="also retrieval precision@K of the test split against the bank (0 = off)")
    args = p.parse_args(argv)

    import keras

    from simsiam_tf.config import UsageError, make_config
    from simsiam_tf.diagnostics.embed import calibrate_batchnorm
    from simsiam_tf.diagnostics.knn import KnnProbe
    from simsiam_tf.input import contract, open_input
    from simsiam_tf.model import build_model

    rows = []
    for seed in args.seeds:
        try:
            overrides = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
            config = make_config(args.preset, dataset=args.dataset, seed=seed, **overrides)
            training_input, _ = open_input(config)
        except UsageError as e:
            print(f"knn_init.py: error: {e}", file=sys.stderr)
            return 2
        if not contract.can_monitor_knn(training_input):
            print("knn_init.py: error: the dataset needs labelled train and test splits for kNN", file=sys.stderr)
            return 2
        probe = KnnProbe(
            training_input.eval_split("train", config.knn_train_limit), training_input.eval_split("test"),
            config.image_size, config.knn_k, config.knn_temperature, len(training_input.class_names) or None,
        )
        keras.utils.set_random_seed(config.seed)  # as training.run, so these are its initial weights
        model = build_model(config)
        row = {"seed": seed}
        for state in ("raw", "calibrated"):
            if state == "calibrated":
                calibrate_batchnorm(model.backbone, probe.bank, config.image_size)
            row[f"knn_top1_{state}_init"] = probe(model.backbone)["test"]
            if args.precision_at:
                row[f"precision_at_k_{state}_init"] = _precision_at(model.backbone, probe, config.image_size, args.precision_at)
        rows.append(row)
    columns = [("seed", "seed"), ("knn_top1_raw_init", "kNN top-1, init as built"),
               ("knn_top1_calibrated_init", "kNN top-1, BatchNorm statistics from data")]
    if args.precision_at:
        columns += [("precision_at_k_raw_init", f"precision@{args.precision_at}, as built"),
                    ("precision_at_k_calibrated_init", f"precision@{args.precision_at}, calibrated")]
    report("knn_init", rows, columns, {"dataset": args.dataset, "precision_at": args.precision_at})
    return 0


if __name__ == "__main__":
    sys.exit(main())
