"""Render a report of one or more runs: report.md and PNG plots, runs overlaid.

    python analyze.py --run runs/digits-sg --run runs/digits-nosg --out docs/report
    python analyze.py --run runs/20261128-034500            # writes RUN/report/
    python analyze.py --run runs/simsiam --run runs/simclr --out report   # the two methods

Plots: loss (a panel per method); z_std with the 1/sqrt(d) line; kNN accuracy; the
singular-value spectrum and effective rank of the mean representations; the shard
ratio and the predictor-optimality cosine (SimSiam only: SimCLR has no predictor); the
within-image volume; alignment and uniformity. The report's tables hold the numbers per
epoch. Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import os
import sys

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser


def build_parser():
    p = Parser(prog="analyze.py", description=__doc__)
    p.add_argument("--run", action="append", required=True, help="run directory written by train.py; repeat to overlay runs")
    p.add_argument("--out", help="output directory (default: RUN/report for one run, ./report for several)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError

    try:
        from simsiam_tf.diagnostics import report

        labels = report.unique_labels(args.run)
        with tf_quiet.first_import():  # load_run imports TensorFlow once a run's files are checked
            runs = [report.load_run(path, label) for path, label in zip(args.run, labels)]
        out = args.out or (os.path.join(args.run[0], "report") if len(runs) == 1 else "report")
        path = report.write_report(runs, out)
    except UsageError as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {len(report.PLOTS)} plots in {os.path.dirname(path) or '.'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
