"""Evaluate a trained encoder: weighted kNN and a linear probe on frozen features.

    python evaluate.py --run runs/20261128-034500                  # the checkpoint chosen on validation
    python evaluate.py --run runs/20261128-034500 --checkpoint init  # the same protocol before training
    python evaluate.py --saved-model exports/simsiam/1             # exactly what is served, on its run's dataset
    python evaluate.py --saved-model exports/simsiam/1 --dataset folder:data/cifar10

kNN and the linear probe are scored on the test split. With --run, which checkpoint is
printed: "val-selected" (chosen by kNN on the run's validation split, never on the test
split) or "last". On the run's own dataset, everything about the data is the run's
(config.json, or the export's metadata): its training subset (--train-limit), its
validation split (held out of the kNN bank and the probe's training set), its input
(memory or stream) and its kNN monitor's bank (--knn-bank-size), k and temperature, so
the kNN top-1 is the one the run recorded for the same checkpoint.

Prints kNN top-1 (the run's k and T, the presets' k = 200 and T = 0.1) and linear-probe top-1 (l2-regularised logistic
regression, C chosen on a held-out 20% of the training split; see docs/evaluation.md)
and writes them as JSON: RUN/evaluation.json for --run, ./evaluation.json otherwise
(or --json PATH). Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser


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
        choices=("best", "last", "init"),
        help="with --run: best = the checkpoint chosen by kNN on the validation split (the last one when the run "
        "has none), last, or init = the weights the run started from (its seed; BatchNorm statistics from the kNN "
        "bank, as the run's 'before training' kNN)",
    )
    p.add_argument(
        "--dataset",
        help="digits, folder:PATH, tfrecord:GLOB or a tensorflow-datasets name (default: the one the run, or the "
        "export's run, trained on, with its splits and input). Another dataset is read whole, in memory or "
        "streamed as train.py --input auto chooses",
    )
    p.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    p.add_argument(
        "--train-limit", type=_count, default=None, metavar="N",
        help="a fixed random subset of N images of the training split for the bank and the probe (0 = all; "
        "default: the run's own). On the run's own dataset its validation part is held out of the N, as in train.py",
    )
    p.add_argument("--json", help="where to write the results (default: RUN/evaluation.json, or ./evaluation.json)")
    return p


def _data_config(args, source: dict):
    """What evaluation reads: the run's data as it recorded it (dataset, training subset,
    validation split, input, kNN bank), or another --dataset whole."""
    from simsiam_tf.config import TrainConfig

    recorded = source["dataset"] or "digits"  # exports of older versions do not say: digits
    if args.dataset is None or args.dataset == recorded:
        config = TrainConfig(
            dataset=recorded, image_size=source["image_size"], data_dir=args.data_dir or source["data_dir"],
            train_limit=source["train_limit"], val_fraction=source["val_fraction"], input=source["input"],
            knn_train_limit=source["knn_train_limit"], knn_k=source["knn_k"], knn_temperature=source["knn_temperature"],
        )
    else:
        config = TrainConfig(dataset=args.dataset, image_size=source["image_size"], data_dir=args.data_dir,
                             val_fraction=0.0, knn_k=source["knn_k"], knn_temperature=source["knn_temperature"])
    return config if args.train_limit is None else config.replace(train_limit=args.train_limit)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError, load_config, write_json_atomic

    try:
        if args.run and not os.path.isdir(args.run):
            raise UsageError(f"--run {args.run!r} is not a directory")
        if args.run:
            load_config(os.path.join(args.run, "config.json"))  # a run directory, checked before TensorFlow
        if args.saved_model and not os.path.isdir(args.saved_model):
            raise UsageError(f"--saved-model {args.saved_model!r} is not a directory")
        tf_quiet.import_tensorflow()  # only for a plausible command
        from simsiam_tf import input as input_lib
        from simsiam_tf.diagnostics import evaluation

        if args.run:
            embed, source = evaluation.run_encoder(args.run, args.checkpoint)
            out = args.json or os.path.join(args.run, "evaluation.json")
        else:
            embed, source = evaluation.saved_model_encoder(args.saved_model)
            out = args.json or "evaluation.json"
        config = _data_config(args, source)
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--json {out!r}: directory {out_dir!r} does not exist")
        data, _ = input_lib.open_input(config)
        if args.run and args.checkpoint == "init":
            evaluation.calibrate_initial(embed, data, config)
        result = {"source": source, **evaluation.evaluate(
            embed, data, config.knn_k, config.knn_temperature, bank_limit=config.knn_train_limit,
        )}
        write_json_atomic(out, result)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    probe = result["linear_probe"]
    described = source["path"] + (f" ({source['selection']}: {source['checkpoint']})" if source["kind"] == "run" else "")
    print(
        f"{described} on {result['dataset']} ({result['input']}): {result['train_images']:,} train / "
        f"{result['test_images']:,} test images, {result['embedding_dim']}-d embedding"
    )
    lost = result["undecodable"]
    undecodable = "".join(
        f"; {n:,} {split} image(s) could not be decoded and are not counted" for split, n in lost.items() if n
    )
    print(
        f"kNN top-1 (k={result['knn']['k']}, T={result['knn']['temperature']}, bank of {result['knn']['bank_images']:,}) "
        f"on the test split: {result['knn']['top1']:.4f}{undecodable}"
    )
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
