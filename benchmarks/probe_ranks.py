"""The between-image ranks of finished runs, measured again with more views per image.

    python benchmarks/probe_ranks.py --run runs/contrastive/digits-*-s? --views 32

Training's probe set sees 256 fixed images through 8 views. This script rebuilds each
run's model from a checkpoint (`--checkpoint`, default last: the weights the run's last
diagnostics describe), takes the same probe images the run used (`diag_images` fixed
training images, its seed) and embeds each through `--views` views, then prints, per
run, the rank measures of docs/evaluation.md: the plain effective rank of the image
means f̄, the noise-corrected rank (`between_image_effective_rank`) and the split-half
rank (`between_image_rank_split`). benchmarks/rank_calibration.py measured on
constructed clouds how far each reads from the truth, and how more views shrink the
bias of the first two; with 8 views the printed ranks at V = 8 equal the run's own
diagnostics for the same weights.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, positive_int, report  # noqa: E402


def probe_ranks(run_dir: str, views: int, which: str) -> dict:
    """Rank measures of one run's probe images seen through `views` views."""
    from simsiam_tf.diagnostics import metrics, probe
    from simsiam_tf.export import load_run
    from simsiam_tf.input import open_input

    config, model, _ = load_run(run_dir, which)
    data, _ = open_input(config)
    images, _ = data.eval_split("train", config.diag_images).materialize()  # as training.py takes them
    probe_set = probe.ProbeSet(probe.probe_images(images, config.diag_images), views, config.image_size, config.seed)
    z, _ = probe_set.embed(model)
    return {
        "run": run_dir,
        "method": config.method,
        "proj_dim": config.proj_dim,
        "seed": config.seed,
        "views": views,
        "effective_rank": metrics.effective_rank(metrics.mean_representations(z)),
        "between_rank": metrics.between_image_effective_rank(z),
        "between_rank_split": metrics.between_image_rank_split(z),
        "within_trace": metrics.within_image_volume(z)["trace"],
    }


def main(argv=None) -> int:
    p = Parser(prog="probe_ranks.py", description=__doc__)
    p.add_argument("--run", nargs="+", required=True, type=existing_dir, help="run directories written by train.py")
    p.add_argument("--views", type=positive_int, default=32, help="views per probe image (default 32; training's probe uses 8)")
    p.add_argument("--checkpoint", default="last", choices=("last", "best"), help="which weights (default last)")
    args = p.parse_args(argv)
    if args.views < 2:
        p.error(f"--views must be at least 2 (the split-half rank needs two halves), got {args.views}")
    from simsiam_tf import tf_quiet

    tf_quiet.import_tensorflow()
    rows = [probe_ranks(run, args.views, args.checkpoint) for run in args.run]
    columns = [
        ("run", "run"), ("method", "method"), ("proj_dim", "d"), ("seed", "seed"),
        ("effective_rank", "rank of f̄"), ("between_rank", "noise-corrected"),
        ("between_rank_split", "split-half"), ("within_trace", "within trace"),
    ]
    report("probe_ranks", rows, columns, {"views": args.views, "checkpoint": args.checkpoint})
    return 0


if __name__ == "__main__":
    sys.exit(main())
