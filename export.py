"""Export a trained encoder as a SavedModel version for TF Serving.

    python export.py --run runs/20261128-034500 --export-dir exports/simsiam
    python export.py --run RUN --export-dir exports/simsiam --version 3 --output projection
    python export.py --run RUN --export-dir exports/simsiam-search --normalize
    python export.py --run RUN --format litert --export-dir exports/simsiam-litert [--quantize dynamic]

Loads the run's best checkpoint (by kNN; the last one if kNN never ran), writes
EXPORT_DIR/N atomically (N defaults to the next integer) and prints the signatures.
`--normalize` serves l2-normalised embeddings (unit length, as the kNN monitor compares
them), for search by dot product; EXPORT_DIR/N/simsiam_export.json records it.
`--format litert` writes EXPORT_DIR/N/model.tflite instead (for ai-edge-litert on a
device: uint8 pixels at the training size in, see simsiam_tf/litert.py), into its own
base path (default exports/simsiam-litert), never one that holds SavedModel versions.
"""

from __future__ import annotations

import argparse
import os
import sys

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser


def _version(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser():
    p = Parser(prog="export.py", description=__doc__)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--export-dir", help="TF Serving model base path (default: exports/simsiam); "
                   "with --format litert its own base path (default: exports/simsiam-litert)")
    p.add_argument("--version", type=_version, help="version number (default: the next integer)")
    p.add_argument("--output", default="features", choices=("features", "projection"),
                   help="embedding to serve: backbone features (default) or the projection z")
    p.add_argument("--normalize", action="store_true",
                   help="serve l2-normalised embeddings (unit length; a dot product is then the cosine)")
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help="best = the checkpoint chosen by kNN on the validation split (the last one when the run has none), or last",
    )
    p.add_argument("--format", default="savedmodel", choices=("savedmodel", "litert"),
                   help="savedmodel (default, for TF Serving) or litert (EXPORT_DIR/N/model.tflite, for ai-edge-litert)")
    p.add_argument("--quantize", default="none", choices=("none", "dynamic"),
                   help="litert only: none (float32, default) or dynamic (dynamic-range: int8 weights, about 4x smaller)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quantize != "none" and args.format != "litert":
        parser.error("--quantize applies to --format litert only; add --format litert or leave --quantize out")
    if args.export_dir is None:
        args.export_dir = os.path.join("exports", "simsiam-litert" if args.format == "litert" else "simsiam")
    from simsiam_tf.config import UsageError, load_config

    try:
        if not os.path.isdir(args.run):
            raise UsageError(f"--run {args.run!r} is not a directory")
        load_config(os.path.join(args.run, "config.json"))  # a run directory, checked before TensorFlow
        tf_quiet.import_tensorflow()
        from simsiam_tf import export

        config, model, source = export.load_run(args.run, args.checkpoint)
        if args.format == "litert":
            from simsiam_tf import litert

            path = litert.export_litert(model, config, args.export_dir, args.version, args.output, source,
                                        normalize=args.normalize, quantize=args.quantize)
        else:
            path = export.export_saved_model(model, config, args.export_dir, args.version, args.output, source,
                                             normalize=args.normalize)
    except UsageError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    what = f"{args.output}, l2-normalised" if args.normalize else args.output
    if args.format == "litert":
        quantized = ", dynamic-range quantised" if args.quantize == "dynamic" else ", float32"
        size = config.image_size
        import json

        with open(os.path.join(os.path.dirname(path), litert.METADATA_FILE)) as f:
            dim = json.load(f)["embedding_dim"]
        print(f"Exported {source} ({export.checkpoint_selection(source)}, {what}{quantized}) to {path} "
              f"({os.path.getsize(path):,} bytes)")
        print(f"Input: images uint8[-1, {size}, {size}, 3], prepared with "
              f"simsiam_tf.litert.prepare_image(path, {size}); output: embedding float32[-1, {dim}]")
        return 0
    print(f"Exported {source} ({export.checkpoint_selection(source)}, {what}) to {path}")
    print("Signatures:")
    print(export.describe_signatures(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
