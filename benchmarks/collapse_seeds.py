"""How far apart collapsed and healthy runs fall, seed by seed: the spread that
tests/test_collapse.py's bounds must leave room for.

    python benchmarks/collapse_seeds.py                  # seeds 0-5, with and without the stop-gradient
    python benchmarks/collapse_seeds.py --seeds 0,1 --only collapsed

Each run is tests/test_collapse.py's recipe (the digits preset at width 8, 20 epochs,
diagnostics after the last epoch, no kNN, float32) with another seed, trained through
`training.run` in a temporary directory. Per run it prints the final loss, the training
batches' z_std as a multiple of 1/sqrt(d), the epoch at which the collapse warning
fired (none: it did not), and on the fixed probe set the effective rank of the mean
representations, the shard ratio and the fraction of parallel view pairs (cosine >
0.95). About a minute per run on 2 cores.

How fast a run without the stop-gradient collapses depends on the CPU's kernels: seed
0 needed 8 epochs on an AVX2-only EPYC and 16 on an AVX512-BF16 one. To see the
AVX2 kernels' behaviour on a newer CPU, cap oneDNN's instruction set:
`ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/collapse_seeds.py` (the JSON line records it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, positive_int, report  # noqa: E402

EPOCHS = 20  # tests/test_collapse.py


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0-5 or 0,3,4, got {text!r}")
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative seeds like 0-5 or 0,3,4, got {text!r}")
    return seeds


def measure(seed: int, stop_gradient: bool, workdir: str, epochs: int = EPOCHS) -> dict:
    """Train one run of the test's recipe and measure its collapse signals."""
    from simsiam_tf import training
    from simsiam_tf.callbacks import CollapseWarning
    from simsiam_tf.config import make_config
    from simsiam_tf.input import split_images
    from simsiam_tf.diagnostics import metrics, probe
    from simsiam_tf.export import load_run

    config = make_config(
        "digits", width=8, epochs=epochs, stop_gradient=stop_gradient, seed=seed,
        knn_every=0, diag_every=epochs, projector_images=0, precision="float32",
    )
    path = os.path.join(workdir, f"seed{seed}-{'sg' if stop_gradient else 'nosg'}")
    summary = training.run(config, path, verbose=0)
    diag = probe.read_records(path)[-1]
    steps = summary["train_images"] // config.batch_size // max(1, epochs - 1)  # the first epoch is not counted
    warned = [step // steps for step, _ in CollapseWarning.written(path)]
    _, model, _ = load_run(path, "last")
    images = probe.probe_images(split_images("digits", config.image_size)[0], config.diag_images)
    z, _ = probe.ProbeSet(images, config.diag_views, config.image_size, config.seed).embed(model)
    return {
        "seed": seed,
        "stop_gradient": stop_gradient,
        "loss": summary["loss"],
        "z_std_train_over_ref": summary["z_std"] / diag["z_std_reference"],
        "effective_rank": diag["effective_rank"],
        "shard_ratio": diag["shard_ratio"],
        "parallel_pairs": metrics.parallel_fraction(z, 0.95),
        "z_std_by_epoch": [round(h["z_std"] / diag["z_std_reference"], 3) for h in summary["history"]],
        "warned_at_epoch": warned[0] if warned else None,
    }


def main(argv=None) -> int:
    p = Parser(prog="collapse_seeds.py", description=__doc__)
    p.add_argument("--seeds", type=_seeds, default=list(range(6)), help="e.g. 0-5 (default) or 0,3,4")
    p.add_argument("--only", choices=("collapsed", "healthy"), help="only the runs without / with the stop-gradient")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS, help=f"epochs per run (default {EPOCHS}, the test's)")
    args = p.parse_args(argv)
    modes = {"collapsed": [False], "healthy": [True]}.get(args.only, [False, True])
    rows = []
    with tempfile.TemporaryDirectory(prefix="collapse-seeds-") as workdir:
        for stop_gradient in modes:
            for seed in args.seeds:
                rows.append(measure(seed, stop_gradient, workdir, args.epochs))
                print(f"seed {seed}, stop-gradient {stop_gradient}: done", file=sys.stderr, flush=True)
    ranges = {}
    for stop_gradient in modes:
        group = [r for r in rows if r["stop_gradient"] == stop_gradient]
        ranges["healthy" if stop_gradient else "collapsed"] = {
            k: [min(r[k] for r in group), max(r[k] for r in group)]
            for k in ("loss", "z_std_train_over_ref", "effective_rank", "shard_ratio", "parallel_pairs")
        }
    columns = [("seed", "seed"), ("stop_gradient", "stop-grad"), ("loss", "loss"),
               ("z_std_train_over_ref", "z_std train (1/sqrt d)"), ("effective_rank", "eff. rank"),
               ("shard_ratio", "shard ratio"), ("parallel_pairs", "parallel pairs"), ("warned_at_epoch", "warned at epoch")]
    for name, r in ranges.items():
        print(f"{name}: " + ", ".join(f"{k} {lo:.3f}..{hi:.3f}" for k, (lo, hi) in r.items()))
    report("collapse_seeds", rows, columns, {"epochs": args.epochs, "ranges": ranges})
    return 0


if __name__ == "__main__":
    sys.exit(main())
