"""Evaluate a trained encoder: weighted kNN and a linear probe on frozen features.

    python evaluate.py --run runs/20261128-034500                  # the checkpoint chosen on validation
    python evaluate.py --saved-model exports/simsiam/1             # exactly what is served, on its run's dataset
    python evaluate.py --saved-model exports/simsiam/1 --dataset folder:../shared/datasets/cifar10

kNN and the linear probe are scored on the test split. With --run, which checkpoint is
printed: "val-selected" (chosen by kNN on the run's validation split, never on the test
split) or "last". The run's validation split stays out of the kNN bank and the probe's
training set.

Prints kNN top-1 (k = 200, T = 0.1) and linear-probe top-1 (l2-regularised logistic
regression, C chosen on a held-out 20% of the training split; see docs/evaluation.md)
and writes them as JSON: RUN/evaluation.json for --run, ./evaluation.json otherwise
(or --json PATH). Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from simsiam_tf.cli import Parser  # no TensorFlow: bad arguments fail at once

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser():
    p = Parser(prog="evaluate.py", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory written by train.py")
    source.add_argument("--saved-model", help="SavedModel version written by export.py (EXPORT_DIR/N, or EXPORT_DIR for the latest)")
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help="with --run: best = the checkpoint chosen by kNN on the validation split (the last one when the run "
        "has none), or last",
    )
    p.add_argument(
        "--dataset",
        help="digits, folder:PATH, tfrecord:GLOB or a tensorflow-datasets name (default: the one the run, or the "
        "export's run, trained on). Read in memory or streamed, as train.py --input auto chooses",
    )
    p.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    p.add_argument("--train-limit", type=_count, default=0, help="use a fixed random subset of N training images (0 = all)")
    p.add_argument("--json", help="where to write the results (default: RUN/evaluation.json, or ./evaluation.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError, write_json_atomic

    try:
        if args.run and not os.path.isdir(args.run):
            raise UsageError(f"--run {args.run!r} is not a directory")
        from simsiam_tf import input as input_lib  # imports TensorFlow: only for a plausible command
        from simsiam_tf.config import TrainConfig
        from simsiam_tf.diagnostics import evaluation

        if args.run:
            embed, source = evaluation.run_encoder(args.run, args.checkpoint)
            dataset = args.dataset or source["dataset"]
            data_dir = args.data_dir or source["data_dir"]
            # The run's own validation split stays out of the kNN bank and the probe's
            # training set, as in training; on another dataset there is nothing to hold out.
            val_fraction = source["val_fraction"] if dataset == source["dataset"] else 0.0
            out = args.json or os.path.join(args.run, "evaluation.json")
        else:
            embed, source = evaluation.saved_model_encoder(args.saved_model)
            # The export's metadata names the dataset its run trained on (exports of
            # older versions do not: digits then, unless --dataset says otherwise).
            dataset = args.dataset or source["dataset"] or "digits"
            data_dir = args.data_dir or (source["data_dir"] if dataset == source["dataset"] else None)
            val_fraction = source["val_fraction"] if dataset == source["dataset"] else 0.0
            out = args.json or "evaluation.json"
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--json {out!r}: directory {out_dir!r} does not exist")
        config = TrainConfig(dataset=dataset, image_size=source["image_size"], data_dir=data_dir,
                             train_limit=args.train_limit, val_fraction=val_fraction)
        data, _ = input_lib.open_input(config)
        result = {"source": source, **evaluation.evaluate(embed, data)}
        write_json_atomic(out, result)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    probe = result["linear_probe"]
    described = source["path"] + (f" ({source['selection']}: {source['checkpoint']})" if source["kind"] == "run" else "")
    print(
        f"{described} on {result['dataset']}: {result['train_images']:,} train / {result['test_images']:,} "
        f"test images, {result['embedding_dim']}-d embedding"
    )
    print(f"kNN top-1 (k={result['knn']['k']}, T={result['knn']['temperature']}) on the test split: {result['knn']['top1']:.4f}")
    print(
        f"linear probe top-1: {probe['top1']:.4f} (C={probe['C']:g}, chosen on "
        f"{probe['validation_images']:,} held-out training images)"
    )
    print(f"wrote {out}")
    line = {"knn_top1": result["knn"]["top1"], "linear_probe_top1": probe["top1"]}
    if source["kind"] == "run":
        line["checkpoint"] = source["selection"]
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
