"""How far do the between-image rank estimators read from the truth? Constructed clouds.

    python benchmarks/rank_calibration.py                  # the full grid, 20 seeds
    python benchmarks/rank_calibration.py --rank 16 --dim 512 --views 8 --seeds 5

Each cloud has N images whose true means lie in an r-dimensional subspace S of R^d;
each of an image's V views is its mean plus Gaussian view noise, then l2-normalised as
the metrics do. The noise is isotropic in all d dimensions ("isotropic"), or isotropic
within 48 dimensions: the first 48 coordinates, which hold S when r <= 48 and lie in S
when r = 64 ("overlapping"), or 48 coordinates outside S ("disjoint"). Its size is set
by the within-image trace the probe would read with 8 views (`within_trace`): 0.17 and
0.38 span the trained runs of docs/contrastive.md (SimCLR 0.17, SimSiam 0.38 on digits;
0.21 and 0.24 on CIFAR-10).

The image means before noise are m = g / |g|, g Gaussian in S with variances 1/i
(i = 1..r), so their effective rank is below r. The truth is the effective rank (as
`metrics.effective_rank` defines it: exp of the entropy of the normalised square roots
of the covariance's eigenvalues) of the covariance of the true means E[z̃ | m] over
20,000 images. E[z̃ | m] is not m: normalising shrinks it, and where the noise is not
isotropic around m, bends it. It is computed, not assumed: with m_A the part of m in
the noise's subspace A and m_o the rest, symmetry within A gives
E[z̃ | m] = α m_o + β m_A, where α = E[1/R] and β = E[(1 + e/|m_A|)/R],
R = |m + noise|, e the noise along m_A; α and β are averages over 4,000 noise draws.

Rows: the bias (estimate − truth, mean and std over seeds) of the centred rank of the
N noiseless means (how far N = 256 images alone read from the truth), the plain rank of f̄
(`effective_rank`, not centred), the same centred, the noise-corrected rank
(`between_image_effective_rank`, Cov(f̄) − W/V clipped at 0), and the split-half rank
(`between_image_rank_split`) with eigenvalues floored at 0 ("split, clip 0") and at the
mirror of the most negative one (its default).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from simsiam_tf.diagnostics import metrics  # noqa: E402

NOISE_DIMS = 48
NOISES = ("isotropic", "overlapping", "disjoint")
PROBE_VIEWS = 8  # the views the real probe has: within_trace is stated as it would read them
TRUTH_IMAGES = 20_000
NOISE_DRAWS = 4_000
ESTIMATORS = (
    ("noiseless", "centred rank of the 256 noiseless means m (the sampling floor)"),
    ("plain", "plain rank of f̄ (not centred)"),
    ("plain_centred", "plain rank of f̄, centred"),
    ("corrected", "noise-corrected: Cov(f̄) − W/V"),
    ("split_zero", "split-half, clip 0"),
    ("split", "split-half, mirror floor"),
)


def noise_dims(noise: str, rank: int, dim: int) -> np.ndarray:
    """The coordinates the view noise lives in."""
    if noise == "isotropic":
        return np.arange(dim)
    if noise == "overlapping":
        return np.arange(NOISE_DIMS)
    if noise == "disjoint":
        if rank + NOISE_DIMS > dim:
            raise ValueError(f"disjoint noise needs rank + {NOISE_DIMS} <= dim, got rank {rank}, dim {dim}")
        return np.arange(rank, rank + NOISE_DIMS)
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def true_means(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """m = g / |g| for n images, g Gaussian in R^rank with variances 1/i: [n, rank]."""
    g = rng.normal(size=(n, rank)) / np.sqrt(np.arange(1, rank + 1))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _expected_views(m: np.ndarray, in_noise: np.ndarray, scale: float, draws: np.ndarray) -> np.ndarray:
    """E[z̃ | m] for means m [n, rank] (unit, in S = the first `rank` coordinates) under
    noise `scale` * N(0, I_A); `in_noise`: which of S's coordinates lie in A;
    draws [K, 2]: standard normal e and chi-square(|A| - 1) pairs. Returns [n, rank]."""
    m_a = np.where(in_noise, m, 0.0)
    m_o = m - m_a
    a_norm = np.linalg.norm(m_a, axis=1, keepdims=True)  # [n, 1]
    e = scale * draws[:, 0][None, :]  # noise along m_A, [1, K]
    rest = scale**2 * draws[:, 1][None, :]  # squared noise orthogonal to m_A within A
    r = np.sqrt(1.0 + 2.0 * a_norm * e + e**2 + rest)  # |m + noise|, |m| = 1
    alpha = np.mean(1.0 / r, axis=1, keepdims=True)
    safe = np.where(a_norm > 0, a_norm, 1.0)
    beta = np.mean((1.0 + e / safe) / r, axis=1, keepdims=True)
    return alpha * m_o + beta * m_a


def _draws(rng: np.random.Generator, noise_size: int) -> np.ndarray:
    return np.stack([rng.normal(size=NOISE_DRAWS), rng.chisquare(noise_size - 1, size=NOISE_DRAWS)], axis=1)


@functools.lru_cache(maxsize=None)
def noise_scale(within_trace: float, rank: int, dim: int, noise: str, seed: int = 0) -> float:
    """The per-coordinate noise std whose normalised views give `within_trace` as an
    8-view probe reads it: (7/8) (1 - mean |E[z̃ | m]|²), since |z̃| = 1."""
    rng = np.random.default_rng(seed)
    dims = noise_dims(noise, rank, dim)
    in_noise = np.isin(np.arange(rank), dims)
    m, draws = true_means(rng, 2000, rank), _draws(rng, len(dims))
    target = within_trace * PROBE_VIEWS / (PROBE_VIEWS - 1)
    lo, hi = 0.0, 10.0
    for _ in range(40):
        mid = (lo + hi) / 2
        spread = 1.0 - np.mean(np.sum(_expected_views(m, in_noise, mid, draws) ** 2, axis=1))
        lo, hi = (mid, hi) if spread < target else (lo, mid)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=None)
def true_rank(rank: int, dim: int, noise: str, scale: float, seed: int = 0) -> float:
    """The effective rank of Cov(E[z̃ | m]) over TRUTH_IMAGES images."""
    rng = np.random.default_rng(10_000 + seed)
    dims = noise_dims(noise, rank, dim)
    in_noise = np.isin(np.arange(rank), dims)
    draws = _draws(rng, len(dims))
    m = true_means(rng, TRUTH_IMAGES, rank)
    mu = np.concatenate([_expected_views(chunk, in_noise, scale, draws) for chunk in np.array_split(m, 20)])
    lam = np.linalg.eigvalsh(np.cov(mu, rowvar=False))
    return metrics._entropy_rank(np.sqrt(np.maximum(lam, 0.0)))


def cloud(rng: np.random.Generator, n: int, views: int, rank: int, dim: int, noise: str, scale: float) -> np.ndarray:
    """z [n, views, dim]: unit means in the first `rank` coordinates plus view noise."""
    z = np.zeros((n, views, dim))
    z[:, :, :rank] = true_means(rng, n, rank)[:, None, :]  # the noiseless means: z[:, 0, :rank] before the noise
    dims = noise_dims(noise, rank, dim)
    z[:, :, dims] += scale * rng.normal(size=(n, views, len(dims)))
    return z


def estimates(z: np.ndarray, means: np.ndarray | None = None) -> dict:
    """Every estimator on z; "noiseless": the same entropy rank of the centred `means`
    (what N images would read with no view noise at all)."""
    fbar = metrics.mean_representations(z)
    return {
        "noiseless": float("nan") if means is None else metrics.effective_rank(means - means.mean(axis=0)),
        "plain": metrics.effective_rank(fbar),
        "plain_centred": metrics.effective_rank(fbar - fbar.mean(axis=0)),
        "corrected": metrics.between_image_effective_rank(z),
        "split_zero": metrics.between_image_rank_split(z, floor="zero"),
        "split": metrics.between_image_rank_split(z),
    }


def calibrate(rank: int, dim: int, views: int, noise: str, within_trace: float, seeds: int, images: int = 256) -> dict:
    """Truth and each estimator's mean and std over `seeds` clouds."""
    scale = noise_scale(within_trace, rank, dim, noise)
    truth = true_rank(rank, dim, noise, scale)
    rows = {key: [] for key, _ in ESTIMATORS}
    for seed in range(seeds):
        z = cloud(np.random.default_rng(seed), images, views, rank, dim, noise, scale)
        means = true_means(np.random.default_rng(seed), images, rank)  # the same draws cloud() made first
        for key, value in estimates(z, means).items():
            rows[key].append(value)
    out = {"rank": rank, "dim": dim, "views": views, "noise": noise, "within_trace": within_trace,
           "noise_std": scale, "truth": truth}
    for key, values in rows.items():
        out[key] = float(np.mean(values))
        out[f"{key}_bias"] = float(np.mean(values) - truth)
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return out


def main(argv=None) -> int:
    from threadpoolctl import threadpool_limits

    from common import Parser, positive_int, report  # noqa: E402  (benchmarks/common.py)

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=positive_int, nargs="+", default=[4, 16, 64], help="true subspace dimensions r")
    p.add_argument("--dim", type=positive_int, nargs="+", default=[128, 512, 2048], help="projection dimensions d")
    p.add_argument("--views", type=positive_int, nargs="+", default=[8, 32], help="views per image V (at least 2)")
    p.add_argument("--noise", choices=NOISES, nargs="+", default=list(NOISES), help="view-noise shapes")
    p.add_argument("--trace", type=float, nargs="+", default=[0.17, 0.38], help="within-image traces (8-view reading)")
    p.add_argument("--seeds", type=positive_int, default=20, help="clouds per case")
    args = p.parse_args(argv)
    if min(args.views) < 2:
        p.error("--views needs at least 2 views per image; pass e.g. --views 8 32")
    rows = []
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        for dim in args.dim:
            for rank in args.rank:
                for noise in args.noise:
                    if noise == "disjoint" and rank + NOISE_DIMS > dim:
                        continue
                    for trace in args.trace:
                        for views in args.views:
                            row = calibrate(rank, dim, views, noise, trace, args.seeds)
                            rows.append(row)
                            biases = "  ".join(f"{key} {row[key + '_bias']:+.2f}" for key, _ in ESTIMATORS)
                            print(f"# {time.perf_counter() - started:.0f} s: r {rank} d {dim} V {views} {noise} "
                                  f"trace {trace} truth {row['truth']:.2f}  bias: {biases}", file=sys.stderr, flush=True)
    columns = [("rank", "r"), ("dim", "d"), ("views", "V"), ("noise", "noise"), ("within_trace", "trace"),
               ("truth", "truth")] + [(f"{key}_bias", f"bias: {name}") for key, name in ESTIMATORS]
    report("rank_calibration", rows, columns, {"seeds": args.seeds, "images": 256})
    return 0


if __name__ == "__main__":
    sys.exit(main())
