"""A hyper-parameter sweep of finished runs, chosen on the validation split.

    python benchmarks/sweep_table.py --run runs/sweep/simsiam-lr*-s? --by base_lr

Groups the runs by one config.json key (`--by`, e.g. base_lr), and for each value
prints the number of runs (seeds), the validation kNN that chooses (per run, the mean
of its last `--last` validation evaluations in summary.json's history, default 3: one
image of a small validation split moves a single evaluation by a whole step, the mean
breaks such ties), that score's mean, standard deviation and range over the runs, and
the test kNN of the last epoch beside it, which is reported and never used. The value
with the highest mean validation score is marked "chosen". The difference to the next
best is printed against the seed-to-seed standard deviation, so a reader can judge
whether the sweep separates them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, positive_int, report  # noqa: E402


def read_run(path: str, by: str, last: int) -> dict:
    """The swept value, the validation score that chooses and the last test kNN of a run."""
    for name in ("config.json", "summary.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"error: {path} has no {name}; pass run directories written by train.py")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if by not in config:
        raise SystemExit(f"error: {path}/config.json has no key {by!r}; pass --by with a key it has")
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    evaluated = [h for h in summary.get("history", []) if h.get("knn_val_top1") is not None]
    if len(evaluated) < last:
        raise SystemExit(
            f"error: {path} has {len(evaluated)} validation evaluation(s), fewer than --last {last}; "
            "train with --knn-every and a validation split, or lower --last"
        )
    chosen = evaluated[-last:]
    return {
        "run": path,
        "value": config[by],
        "seed": config.get("seed"),
        "val_score": float(np.mean([h["knn_val_top1"] for h in chosen])),
        "val_epochs": [h["epoch"] for h in chosen],
        "test_knn_last": evaluated[-1].get("knn_top1"),
    }


def table(runs: list[dict]) -> list[dict]:
    """One row per swept value: count, mean/std/range of the validation score, mean test kNN."""
    rows = []
    for value in sorted({r["value"] for r in runs}):
        group = [r for r in runs if r["value"] == value]
        scores = np.array([r["val_score"] for r in group])
        tests = [r["test_knn_last"] for r in group if r["test_knn_last"] is not None]
        rows.append({
            "value": value,
            "runs": len(group),
            "seeds": sorted(r["seed"] for r in group),
            "val_mean": float(scores.mean()),
            "val_std": float(scores.std(ddof=1)) if len(group) > 1 else None,
            "val_min": float(scores.min()),
            "val_max": float(scores.max()),
            "test_mean": float(np.mean(tests)) if tests else None,
        })
    best = max(rows, key=lambda r: r["val_mean"])
    for r in rows:
        r["chosen"] = "chosen" if r is best else ""
        r["behind_best"] = best["val_mean"] - r["val_mean"]
    return rows


def main(argv=None) -> int:
    p = Parser(prog="sweep_table.py", description=__doc__)
    p.add_argument("--run", nargs="+", required=True, type=existing_dir, help="run directories written by train.py")
    p.add_argument("--by", default="base_lr", help="the config.json key the sweep varies (default base_lr)")
    p.add_argument("--last", type=positive_int, default=3, help="validation evaluations averaged per run (default 3)")
    args = p.parse_args(argv)
    runs = [read_run(path, args.by, args.last) for path in args.run]
    rows = table(runs)
    columns = [
        ("value", args.by), ("runs", "runs"), ("val_mean", "validation kNN (mean)"), ("val_std", "std"),
        ("val_min", "min"), ("val_max", "max"), ("behind_best", "behind best"),
        ("test_mean", "test kNN, last (not used)"), ("chosen", ""),
    ]
    for r in runs:
        test = "-" if r["test_knn_last"] is None else f"{r['test_knn_last']:.4f}"
        print(f"{args.by}={r['value']}  seed {r['seed']}  validation {r['val_score']:.4f} "
              f"(epochs {', '.join(map(str, r['val_epochs']))})  test {test}  {r['run']}")
    report("sweep_table", rows, columns, {"by": args.by, "last": args.last})
    return 0


if __name__ == "__main__":
    sys.exit(main())
