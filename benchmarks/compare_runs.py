"""Do two groups of finished runs differ in accuracy by more than their run-to-run spread?

    python evaluate.py --run RUN --checkpoint last          # once per run: writes evaluation.json
    python benchmarks/compare_runs.py --a runs/seed*-fp32 --b runs/seed*-bf16

For kNN and linear-probe top-1 (from each run's evaluation.json), and for the last
probe-set diagnostics of each run (diagnostics.jsonl: effective ranks, shard ratio,
within-image trace, log-volume and its gap, alignment, uniformity; the rows every run
has), it prints each group's mean, standard deviation and range, the difference of means (b - a), and a two-sided
permutation p-value: the share of all ways of splitting the pooled runs into groups of
the same sizes whose difference of means is at least as large. Exact for up to 200,000
splits, else 200,000 random splits with a fixed seed. A small p says the groups differ
by more than the runs within a group do; a large p says the data cannot tell them apart.

When the runs pair by seed (each seed, from each run's config.json, once in each
group: same initialisation and data order), it also prints a paired sign-flip p: the
share of all 2^n sign patterns of the n per-seed differences b - a whose mean is at
least as large in size as the observed one. Otherwise it prints "unpaired" and no
paired p. Both p are Holm-Bonferroni adjusted over the family of all rows this call
prints (p_holm, p_paired_holm). p_min and p_paired_min are the smallest p each test
can give with these counts: 2 / C(n_a + n_b, n_a) for the permutation test (1 / C when
n_a != n_b, where no split mirrors another), 2 / 2^n for the sign flips.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, report  # noqa: E402

METRICS = (("knn", "kNN top-1"), ("linear_probe", "linear probe top-1"))
DIAGNOSTICS = (
    ("effective_rank", "effective rank of f̄"),
    ("between_rank", "rank of the image means, noise-corrected"),
    ("between_rank_split", "rank of the image means, split-half"),
    ("shard_ratio", "shard ratio"),
    ("within_trace", "within-image trace"),
    ("within_log_volume", "within-image log-volume"),
    ("within_log_volume_gap", "log-volume gap to mixed groups"),
    ("alignment", "alignment"),
    ("uniformity", "uniformity"),
)
EXACT_LIMIT = 200_000


def read_run(path: str) -> dict:
    """The top-1 scores evaluate.py wrote for `path`, with the run's precision and seed."""
    file = os.path.join(path, "evaluation.json")
    if not os.path.exists(file):
        raise SystemExit(f"error: {file} not found; run `python evaluate.py --run {path} --checkpoint last` first")
    with open(file) as f:
        evaluation = json.load(f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    out = {"run": path, "precision": config.get("precision"), "seed": config.get("seed"),
           "method": config.get("method", "simsiam"), "proj_dim": config.get("proj_dim")}
    for key, _ in METRICS:
        out[key] = float(evaluation[key]["top1"])
    records = os.path.join(path, "diagnostics.jsonl")
    if os.path.exists(records):
        with open(records) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            out["diagnostics_epoch"] = lines[-1]["epoch"]
            for key, _ in DIAGNOSTICS:
                if lines[-1].get(key) is not None:
                    out[key] = float(lines[-1][key])
    return out


def permutation_p(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Two-sided p-value of |mean(b) - mean(a)| under random relabelling of the runs.

    Written out rather than scipy.stats.permutation_test: top-1 scores are multiples of
    1/len(test set), so many splits tie the observed gap exactly, and differences of
    means that are equal in exact arithmetic differ in the last bit here. scipy's
    tie tolerance (relative to the gap) misses those; an absolute 1e-12 counts them.
    """
    pooled = np.concatenate([a, b])
    observed = abs(b.mean() - a.mean())
    n, k = len(pooled), len(b)
    if math.comb(n, k) <= EXACT_LIMIT:
        splits = (list(c) for c in itertools.combinations(range(n), k))
    else:
        rng = np.random.default_rng(seed)
        splits = (rng.choice(n, k, replace=False) for _ in range(EXACT_LIMIT))
    total = pooled.sum()
    hits = count = 0
    for idx in splits:
        b_sum = pooled[idx].sum()
        diff = b_sum / k - (total - b_sum) / (n - k)
        hits += abs(diff) >= observed - 1e-12
        count += 1
    return hits / count


def permutation_p_min(n_a: int, n_b: int) -> float:
    """The smallest two-sided permutation p with groups of n_a and n_b runs: only the
    observed split (and its mirror image, when n_a == n_b) reaches the largest gap."""
    return (2 if n_a == n_b else 1) / math.comb(n_a + n_b, n_a)


def sign_flip_p(differences: np.ndarray, seed: int = 0) -> float:
    """Two-sided paired p-value: the share of sign patterns s in {-1, +1}^n for which
    |mean(s * d)| >= |mean(d)|, d the per-pair differences. Exact (all 2^n patterns)
    up to 2^17, else EXACT_LIMIT random patterns with a fixed seed; ties count, with
    the absolute 1e-12 of `permutation_p`."""
    d = np.asarray(differences, np.float64)
    n = len(d)
    if 2**n <= EXACT_LIMIT:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(EXACT_LIMIT, n))
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= abs(d.mean()) - 1e-12))


def sign_flip_p_min(n: int) -> float:
    """The smallest two-sided sign-flip p with n pairs: the observed signs and their
    negation."""
    return 2 / 2**n


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values over the family of the given ones (None
    entries are left out of the family and stay None): the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def pairs_by_seed(a_runs: list[dict], b_runs: list[dict]) -> list[tuple[int, int]] | None:
    """(index in a, index in b) for each seed, when each seed appears once in each
    group and the groups hold the same seeds; else None (unpaired)."""
    a_seeds = [r.get("seed") for r in a_runs]
    b_seeds = [r.get("seed") for r in b_runs]
    if None in a_seeds or len(set(a_seeds)) != len(a_seeds) or sorted(a_seeds) != sorted(b_seeds):
        return None
    return [(i, b_seeds.index(seed)) for i, seed in enumerate(a_seeds)]


def compare(a_runs: list[dict], b_runs: list[dict]) -> list[dict]:
    """One row per measure every run has: means, spread, difference, the permutation p,
    the paired sign-flip p (None when the runs do not pair by seed), each test's
    smallest possible p, and both p Holm-adjusted over all rows returned."""
    pairs = pairs_by_seed(a_runs, b_runs)
    rows = []
    for key, name in METRICS + DIAGNOSTICS:
        if not all(key in r for r in a_runs + b_runs):
            continue  # a diagnostic some run did not record
        a = np.array([r[key] for r in a_runs])
        b = np.array([r[key] for r in b_runs])
        rows.append({
            "metric": name,
            "a_mean": float(a.mean()), "a_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "a_range": f"{a.min():.3f} to {a.max():.3f}",
            "b_mean": float(b.mean()), "b_std": float(b.std(ddof=1)) if len(b) > 1 else 0.0,
            "b_range": f"{b.min():.3f} to {b.max():.3f}",
            "b_minus_a": float(b.mean() - a.mean()),
            "p": permutation_p(a, b),
            "p_min": permutation_p_min(len(a), len(b)),
            "p_paired": None if pairs is None else sign_flip_p(np.array([b[j] - a[i] for i, j in pairs])),
            "p_paired_min": None if pairs is None else sign_flip_p_min(len(pairs)),
        })
    for key in ("p", "p_paired"):
        for row, adjusted in zip(rows, holm([r[key] for r in rows])):
            row[f"{key}_holm"] = adjusted
    return rows


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", required=True, type=existing_dir, metavar="RUN", help="run directories of the first group")
    p.add_argument("--b", nargs="+", required=True, type=existing_dir, metavar="RUN", help="run directories of the second group")
    args = p.parse_args(argv)
    a_runs = [read_run(r) for r in args.a]
    b_runs = [read_run(r) for r in args.b]
    for group, runs in (("a", a_runs), ("b", b_runs)):
        for r in runs:
            diagnostics = "".join(f"  {key} {r[key]:.3f}" for key, _ in DIAGNOSTICS if key in r)
            print(f"{group}  {r['run']}  {r['method']}  d={r['proj_dim']}  {r['precision']}  seed {r['seed']}  "
                  f"kNN {r['knn']:.3f}  linear {r['linear_probe']:.3f}{diagnostics}")
    print()
    rows = compare(a_runs, b_runs)
    paired = pairs_by_seed(a_runs, b_runs) is not None
    print(f"runs {'pair by seed: paired sign-flip p shown' if paired else 'unpaired (seeds differ): no paired p'}; "
          f"Holm over the {len(rows)} rows below")
    columns = [("metric", "metric"), ("a_mean", "a mean"), ("a_std", "a std"), ("a_range", "a range"),
               ("b_mean", "b mean"), ("b_std", "b std"), ("b_range", "b range"), ("b_minus_a", "b - a"),
               ("p", "p"), ("p_min", "p min"), ("p_holm", "p Holm")]
    if paired:
        columns += [("p_paired", "paired p"), ("p_paired_min", "paired p min"), ("p_paired_holm", "paired p Holm")]
    report("compare_runs", rows, columns,
           {"pairing": "seed" if paired else "unpaired", "holm_family": len(rows), "a": a_runs, "b": b_runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
