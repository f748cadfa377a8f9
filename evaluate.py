"""Evaluate a trained encoder: weighted kNN and a linear probe on frozen features.

    python evaluate.py --run runs/20261128-034500                  # the run's best checkpoint
    python evaluate.py --saved-model exports/simsiam/1             # exactly what is served
    python evaluate.py --saved-model exports/simsiam/1 --dataset folder:../shared/datasets/cifar10

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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser():
    p = _Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory written by train.py")
    source.add_argument("--saved-model", help="SavedModel version written by export.py (EXPORT_DIR/N, or EXPORT_DIR for the latest)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="with --run: which checkpoint")
    p.add_argument(
        "--dataset",
        help="digits, folder:PATH, tfrecord:GLOB or a tensorflow-datasets name (default: the run's; digits for "
        "--saved-model). Read in memory or streamed, as train.py --input auto chooses",
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
        from simsiam_tf import inputs  # imports TensorFlow: only for a plausible command
        from simsiam_tf.diagnostics import evaluation

        if args.run:
            embed, source = evaluation.run_encoder(args.run, args.checkpoint)
            dataset = args.dataset or source["dataset"]
            data_dir = args.data_dir or source["data_dir"]
            out = args.json or os.path.join(args.run, "evaluation.json")
        else:
            embed, source = evaluation.saved_model_encoder(args.saved_model)
            dataset, data_dir = args.dataset or "digits", args.data_dir
            out = args.json or "evaluation.json"
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"--json {out!r}: directory {out_dir!r} does not exist")
        data = inputs.open_eval_input(dataset, source["image_size"], data_dir, args.train_limit)
        result = {"source": source, **evaluation.evaluate(embed, data)}
        write_json_atomic(out, result)
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    probe = result["linear_probe"]
    described = source["path"] + (f" ({source['checkpoint']})" if source["kind"] == "run" else "")
    print(
        f"{described} on {result['dataset']}: {result['train_images']:,} train / {result['test_images']:,} "
        f"test images, {result['embedding_dim']}-d embedding"
    )
    print(f"kNN top-1 (k={result['knn']['k']}, T={result['knn']['temperature']}): {result['knn']['top1']:.4f}")
    print(
        f"linear probe top-1: {probe['top1']:.4f} (C={probe['C']:g}, chosen on "
        f"{probe['validation_images']:,} held-out training images)"
    )
    print(f"wrote {out}")
    print(json.dumps({"knn_top1": result["knn"]["top1"], "linear_probe_top1": probe["top1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
