"""Representation diagnostics for SimSiam, as pure NumPy functions.

Every function takes the projections of a probe set seen through several augmentations:

    z: float [N, V, D]   projection z = projector(backbone(view)) of view v of image n
    p: float [N, V, D]   predictor output h(z) for the same views

and returns plain floats or arrays. Nothing here depends on TensorFlow, so each
definition can be checked on constructed inputs whose answer is known
(tests/test_metrics.py).

Notation, after Chen & He (2021) and the analysis this project builds on:
- z̃ = z / ||z||_2, the l2-normalised projection (the loss only sees directions);
- f̄(x) = E_aug[z̃], the mean normalised projection of image x over its augmentations,
  estimated by the mean over the V probe views;
- h*(z) = Σ_x' p(x'|z) f̄(x'), the predictor that minimises the cosine loss given z.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

# Kernel bandwidths (temperatures on the cosine) tried by `select_bandwidth`.
BANDWIDTH_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def l2_normalize(x: np.ndarray, axis: int = -1, dtype=np.float64) -> np.ndarray:
    """x / ||x||_2 along `axis`, computed and returned in `dtype`; zero vectors stay zero
    (as tf.math.l2_normalize). float64 for the diagnostics' statistics; float32 for large
    embedding matrices, where it makes one copy of x, not two."""
    x = np.asarray(x, dtype)
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), 1e-12))


def _flat(z: np.ndarray) -> np.ndarray:
    """[N, V, D] or [M, D] -> [M, D]."""
    z = np.asarray(z)
    return z.reshape(-1, z.shape[-1])


def z_std(z: np.ndarray) -> float:
    """Per-channel std of the l2-normalised z, averaged over channels.

    Definition (Chen & He, 2021, Sec. 4.1 and Fig. 2): with z̃ = z / ||z||, the
    population std of each of the D channels over all samples, then the mean over
    channels. About 1/sqrt(D) when the z̃ spread over the unit sphere (an isotropic
    Gaussian gives exactly that in expectation, up to O(1/D)); 0 when every sample has
    the same direction (collapse).

    Identical to `simsiam_tf.losses.z_std` (TensorFlow), which the training step logs.

    Args:
        z: [N, D] or [N, V, D]; all N * V vectors count as samples.
    """
    zn = l2_normalize(_flat(z))
    return float(np.mean(np.std(zn, axis=0)))


def mean_representations(z: np.ndarray) -> np.ndarray:
    """f̄(x): the mean over views of the l2-normalised projections, [N, V, D] -> [N, D].

    Not renormalised: its norm (the mean resultant length) is 1 when all views of an
    image agree and shrinks as they spread.
    """
    return l2_normalize(z).mean(axis=1)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values of `matrix` [N, D], descending, float64 [min(N, D)]."""
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def effective_rank(matrix: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007).

    Definition: with singular values σ_i of `matrix` (not centred) and
    q_i = σ_i / Σ_j σ_j, erank = exp(-Σ_i q_i log q_i), with 0 log 0 = 0. It lies in
    [1, min(N, D)]: 1 for a rank-1 matrix (every row a multiple of one vector, e.g.
    collapsed representations), min(N, D) when all singular values are equal. A zero
    matrix has no direction at all and gets 0.

    Reference: O. Roy and M. Vetterli, "The effective rank: a measure of effective
    dimensionality", EUSIPCO 2007; used for SSL representations by Garrido et al.,
    "RankMe", ICML 2023.
    """
    return _entropy_rank(singular_values(matrix))


def _entropy_rank(s: np.ndarray) -> float:
    """exp(-Σ q_i log q_i) with q = s / Σs, for non-negative s; 0 when s sums to 0."""
    total = s.sum()
    if total <= 0:
        return 0.0
    q = s[s > 0] / total
    return float(np.exp(-np.sum(q * np.log(q))))


def between_image_effective_rank(z: np.ndarray) -> float:
    """Effective rank of the image means' covariance, corrected for the views' noise.

    `effective_rank(f̄)` is confounded by the within-image spread: f̄ averages only V
    views, so a model whose views spread widely (a large-volume shard) gets noisier
    f̄ and a spuriously higher rank. This estimates the rank of the true image means
    E_aug[z̃] instead. With S_n the unbiased covariance of image n's V views and W their
    mean, the covariance of an image's V-view mean around its true mean is S_n / V, so

        B* = Cov_n(f̄) - W / V      (both unbiased; Cov over the N images)

    is an unbiased estimate of the covariance of the true means. Its eigenvalues,
    clipped at 0 (at 1e-12, below which they are round-off), give σ_i = sqrt(λ_i),
    and the rank is exp of the entropy of σ_i / Σσ_j, as in `effective_rank` (there
    of the singular values of f̄, not centred).
    Needs N >= 2 and V >= 2; 0 when nothing is left after the correction.
    """
    zn = l2_normalize(np.asarray(z))
    n, v, _ = zn.shape
    fbar = zn.mean(axis=1)
    centred = (zn - fbar[:, None, :]).reshape(n * v, -1)
    within = centred.T @ centred / (n * (v - 1))  # a BLAS product: einsum took 40 s at d = 2048, V = 32
    between = np.cov(fbar, rowvar=False)
    lam = np.linalg.eigvalsh(between - within / v)
    return _entropy_rank(np.sqrt(np.where(lam > 1e-12, lam, 0.0)))  # below 1e-12: round-off


def between_image_rank_split(z: np.ndarray, floor: str = "mirror") -> float:
    """Effective rank of the image means' covariance, from two disjoint halves of the views.

    For each image, f_a and f_b are the means of the l2-normalised views 0..V/2-1 and
    V/2..2(V/2)-1 (an odd last view is left out). Their cross-covariance over the N
    images, centred and symmetrised,

        C = (F_aᵀ F_b + F_bᵀ F_a) / (2 (N - 1)),   F_a, F_b centred over images,

    is an unbiased estimate of the covariance of the true image means E_aug[z̃]: the
    view noise of one half is independent of the other's, so it cancels in expectation
    instead of being subtracted (as `between_image_effective_rank` does with W/V).

    What is left of the noise is a symmetric random matrix of mean 0: its eigenvalues
    fall on both sides of 0, about as far below as above. Clipping the negative ones at
    0 (floor="zero") keeps the positive half, and the square root in the rank weighs
    many small eigenvalues heavily, so that alone still reads high. floor="mirror"
    (the default) also drops every eigenvalue no larger than |λ_min|, the magnitude of
    the most negative one: the noise's own estimate of how far it reaches. Signal
    eigenvalues below that edge are lost with it, so the rank can read low when the
    spectrum has a long tail under the noise; the bias is measured in
    benchmarks/rank_calibration.py (docs/evaluation.md#definitions).

    The rank is that of `effective_rank`: exp of the entropy of σ_i / Σσ_j with
    σ_i = √λ_i, the singular values a centred matrix with covariance C would have.
    Centred, like `between_image_effective_rank`; `effective_rank` is not.
    Needs N >= 2 and V >= 2; 0 when nothing is left.
    """
    zn = l2_normalize(np.asarray(z))
    n, v, _ = zn.shape
    half = v // 2
    fa = zn[:, :half].mean(axis=1)
    fb = zn[:, half:2 * half].mean(axis=1)
    fa = fa - fa.mean(axis=0)
    fb = fb - fb.mean(axis=0)
    lam = _symmetric_cross_eigenvalues(fa, fb) / (n - 1)
    if floor == "mirror":
        edge = max(-lam.min(), 1e-12) if lam.size else 1e-12
    elif floor == "zero":
        edge = 1e-12
    else:
        raise ValueError(f"floor must be 'mirror' or 'zero', got {floor!r}")
    return _entropy_rank(np.sqrt(np.where(lam > edge, lam, 0.0)))


def _symmetric_cross_eigenvalues(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Eigenvalues of (aᵀb + bᵀa) / 2 for a, b [N, D], computed in the span of their
    2N rows when that is smaller than D (the rest are 0)."""
    d = a.shape[1]
    if 2 * len(a) >= d:
        m = a.T @ b
        return np.linalg.eigvalsh((m + m.T) / 2)
    q, _ = np.linalg.qr(np.concatenate([a, b]).T)  # [D, 2N], orthonormal columns
    pa, pb = a @ q, b @ q
    m = pa.T @ pb
    return np.linalg.eigvalsh((m + m.T) / 2)


def shard_ratio(z: np.ndarray) -> float:
    """Within-image variance of z̃ across augmentations, divided by its total variance.

    Definition: with z̃_nv the normalised projection of view v of image n, f̄_n the
    mean over views and μ the mean over everything,

        within = mean_{n,v} ||z̃_nv - f̄_n||²,   total = mean_{n,v} ||z̃_nv - μ||²,

    ratio = within / total. Since total = within + mean_n ||f̄_n - μ||² (the law of
    total variance, exact for these 1/V estimates), the ratio lies in [0, 1]:
    0 when each image's views coincide (perfectly separated "shards"), and
    1 - 1/V in expectation when the representation ignores which image a view came
    from. A collapsed representation has total = 0 and gets NaN.
    """
    zn = l2_normalize(np.asarray(z))
    centred_total = zn - zn.reshape(-1, zn.shape[-1]).mean(axis=0)
    within = _within_variance(zn)
    total = np.mean(np.sum(centred_total**2, axis=-1))
    if total <= 1e-12:
        return float("nan")
    return float(within / total)


def _within_variance(zn: np.ndarray) -> float:
    """mean_{n,v} ||z̃_nv - f̄_n||² of normalised views zn [N, V, D]."""
    return float(np.mean(np.sum((zn - zn.mean(axis=1, keepdims=True)) ** 2, axis=-1)))


def _log_volumes(zn: np.ndarray) -> np.ndarray:
    """Mean log-eigenvalue of each group's view covariance within its span, [N].

    zn: normalised views [N, V, D]. Group n's covariance C_n = X_nᵀX_n / V, with X_n
    its views minus their mean, has rank at most r = min(V - 1, D); its r largest
    eigenvalues are those of the small V x V matrix X_n X_nᵀ / V. Eigenvalues are
    floored at 1e-12 so that a group whose views coincide gets a finite -27.6.
    """
    num_views, dim = zn.shape[1], zn.shape[2]
    rank = min(num_views - 1, dim)
    centred = zn - zn.mean(axis=1, keepdims=True)
    gram = centred @ np.swapaxes(centred, 1, 2) / num_views  # [N, V, V]
    eig = np.linalg.eigvalsh(gram)[:, -rank:]  # ascending: the r largest
    return np.mean(np.log(np.maximum(eig, 1e-12)), axis=1)


def within_image_volume(z: np.ndarray) -> dict:
    """How much room each image's augmentations take up: trace and log-volume.

    With z̃_nv the normalised projection of view v of image n and C_n the covariance of
    image n's V views (population, 1/V, as in `shard_ratio`):

        trace      = mean_n tr(C_n) = mean_{n,v} ||z̃_nv - f̄_n||²   (shard_ratio's numerator)
        log_volume = mean_n (1/r) Σ_{i≤r} log λ_i(C_n),   r = min(V - 1, D)

    V views span at most V - 1 dimensions, so a log-determinant over all D dimensions
    would be -inf; log_volume is the log-determinant within the views' own span, per
    dimension: the log of the geometric mean of the r non-zero variances. Where trace
    measures the size of a shard, log_volume also measures its shape: a shard spread
    along one direction has the trace of an isotropic one but a far smaller volume.

    log_volume_gap is log_volume minus the same quantity for "mixed" groups of V views
    from V different images (view v of image n + v, modulo N): 0 when an image's
    views spread as widely as views of unrelated images, negative for tight shards.
    It is scale-free, which lets runs with different D be compared.

    Returns: {"trace": float, "log_volume": float, "log_volume_gap": float}.
    """
    zn = l2_normalize(np.asarray(z))
    n, v, _ = zn.shape
    own = float(np.mean(_log_volumes(zn)))
    mixed_images = (np.arange(n)[:, None] + np.arange(v)[None, :]) % n  # [N, V]: distinct images when V <= N
    mixed = zn[mixed_images, np.arange(v)[None, :]]
    return {"trace": _within_variance(zn), "log_volume": own, "log_volume_gap": own - float(np.mean(_log_volumes(mixed)))}


def _pair_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a_i - b_j||² for all rows of a [..., M, D] and b [..., K, D], [..., M, K]."""
    sq = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * a @ np.swapaxes(b, -1, -2)
    return np.maximum(sq, 0.0)


def alignment(z: np.ndarray, alpha: float = 2.0) -> float:
    """Alignment (Wang & Isola, 2020): E ||z̃_a - z̃_b||^alpha over positive pairs.

    Positive pairs are all pairs of distinct views of one image (V(V-1)/2 per image).
    0 when views of an image coincide; 2 for independent directions on a
    high-dimensional sphere (alpha = 2). Lower is better aligned.

    Reference: T. Wang and P. Isola, "Understanding Contrastive Representation
    Learning through Alignment and Uniformity on the Hypersphere", ICML 2020
    (`align_loss`, alpha = 2).
    """
    zn = l2_normalize(np.asarray(z))
    num_views = zn.shape[1]
    a, b = np.triu_indices(num_views, k=1)
    sq = _pair_sq_distances(zn, zn)[:, a, b]  # [N, V(V-1)/2]
    return float(np.mean(sq ** (alpha / 2.0)))


def uniformity(z: np.ndarray, t: float = 2.0) -> float:
    """Uniformity (Wang & Isola, 2020): log E exp(-t ||z̃_x - z̃_y||²) over x, y from
    different images.

    All views of all pairs of distinct images are used: the same quantity as the
    paper's one-view-per-image estimate, with less variance. 0 when everything
    collapses to a point; about -2t (= -4) for points uniform on a high-dimensional
    sphere, where ||z̃_x - z̃_y||² concentrates at 2. Lower is more uniform.

    Reference: Wang and Isola (2020), `uniform_loss`, t = 2.
    """
    zn = l2_normalize(np.asarray(z)).astype(np.float32)
    n, v, _ = zn.shape
    flat = zn.reshape(n * v, -1)
    # Squared distances of unit vectors lie in [0, 4], so exp(-t sq) needs no shift.
    kernel = np.exp(-t * _pair_sq_distances(flat, flat), dtype=np.float32)
    same = np.exp(-t * _pair_sq_distances(zn, zn), dtype=np.float32)  # [N, V, V] blocks
    total = kernel.sum(dtype=np.float64) - same.sum(dtype=np.float64)
    return float(np.log(total / (n * v * (n - 1) * v)))


def parallel_fraction(z: np.ndarray, threshold: float = 0.95) -> float:
    """The fraction of all pairs of views (of any images) whose z̃ have cosine above
    `threshold`: near 0 for a healthy representation, near 1 when nearly every output
    points one way (how this implementation collapses: docs/collapse.md).

    z: [N, V, D] or [M, D]; all M(M-1)/2 pairs of its rows are counted.
    """
    zn = l2_normalize(_flat(z))
    cos = (zn @ zn.T)[np.triu_indices(len(zn), 1)]
    return float(np.mean(cos > threshold))


def _shifted_cosines(zn: np.ndarray) -> np.ndarray:
    """cos(z_i, z_j) - max_j' cos(z_i, z_j') over j, j' != i, for all views of
    normalised zn [N, V, D]; float32 [N*V, N*V] with -inf on the diagonal.

    The shift makes each row's nearest other view exp(0) = 1 under any bandwidth, so
    kernel sums never underflow, even at small bandwidths in float32; it cancels in
    the posterior.
    """
    flat = zn.reshape(-1, zn.shape[-1]).astype(np.float32)
    cos = flat @ flat.T
    np.fill_diagonal(cos, -np.inf)  # z must not vote for its own image (leave-one-out)
    cos -= cos.max(axis=1, keepdims=True)
    return cos


def _log_posteriors(shifted: np.ndarray, n: int, v: int, bandwidth: float) -> np.ndarray:
    """log p(x'|z) for every view z of the probe set, leave-one-out, [N*V, N].

    Kernel density estimate: p(z|x') = (1/n) Σ_v exp(cos(z, z̃_x'v) / bandwidth), over
    the n views of x' other than z itself, and a uniform prior over the N probe images.
    The kernel's normalising constant is the same for every x' and cancels.

    Args:
        shifted: `_shifted_cosines` of the probe views, [N*V, N*V].
    """
    m = n * v
    kernel = np.exp(shifted / np.float32(bandwidth))
    density = kernel.reshape(m, n, v).sum(axis=2).astype(np.float64)
    counts = np.full((m, n), float(v))
    counts[np.arange(m), np.repeat(np.arange(n), v)] = v - 1
    density /= counts
    with np.errstate(divide="ignore"):
        return np.log(density) - np.log(density.sum(axis=1, keepdims=True))


def select_bandwidth(z: np.ndarray, grid=BANDWIDTH_GRID) -> float:
    """The kernel bandwidth with the largest leave-one-out log-likelihood of the image.

    For each bandwidth in `grid`, mean over all views z of log p(x_z | z) under the
    leave-one-out kernel estimate of `_log_posteriors`, where x_z is the image z came
    from: the bandwidth that best predicts, from the other views, which image a view
    belongs to. Ties go to the smaller bandwidth.
    """
    zn = l2_normalize(np.asarray(z))
    n, v, _ = zn.shape
    shifted = _shifted_cosines(zn)
    own = np.repeat(np.arange(n), v)
    scores = []
    for b in grid:
        own_log_p = _log_posteriors(shifted, n, v, b)[np.arange(n * v), own]
        scores.append(np.mean(np.maximum(own_log_p, -1e30)))  # log 0 -> very unlikely
    return float(grid[int(np.argmax(scores))])


def optimal_predictor(z: np.ndarray, bandwidth: float) -> np.ndarray:
    """Non-parametric estimate of h*(z) = Σ_x' p(x'|z) f̄(x') for every view, [N, V, D].

    p(x'|z) comes from `_log_posteriors` (softmax kernel over the probe set, leave-one-
    out). f̄ of z's own image is the mean of its other V - 1 views, so z never
    contributes to its own target and an identity predictor gets no credit for it.
    """
    zn = l2_normalize(np.asarray(z))
    n, v, d = zn.shape
    post = np.exp(_log_posteriors(_shifted_cosines(zn), n, v, bandwidth))  # [N*V, N]
    fbar = zn.mean(axis=1)  # [N, D]
    h = post @ fbar
    own = np.repeat(np.arange(n), v)
    flat = zn.reshape(n * v, d)
    loo_fbar = (v * fbar[own] - flat) / (v - 1)
    h += post[np.arange(n * v), own][:, None] * (loo_fbar - fbar[own])
    return h.reshape(n, v, d)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i), for arrays of equal shape [..., D]."""
    return float(np.mean(np.sum(l2_normalize(_flat(a)) * l2_normalize(_flat(b)), axis=-1)))


def predictor_optimality(z: np.ndarray, p: np.ndarray, bandwidth: float | None = None) -> dict:
    """How close the predictor is to the optimal one: mean cos(h(z), ĥ*(z)).

    ĥ* is `optimal_predictor` with the kernel bandwidth from `select_bandwidth` unless
    given. Returns:
        cosine: mean over views of cos(p, ĥ*(z)), in [-1, 1]; 1 = optimal predictor.
        identity_cosine: the same for the identity predictor h(z) = z, the reference
            a predictor that learned nothing would reach.
        bandwidth: the kernel bandwidth used.

    Assumptions of the estimate (docs/evaluation.md): the probe images stand for the
    data distribution with a uniform prior; their V views sample each image's
    augmentation distribution well enough for a kernel density estimate with one
    global bandwidth on the cosine; cos(p, h*) is the right comparison because the
    loss ignores the norm of p.
    """
    if bandwidth is None:
        bandwidth = select_bandwidth(z)
    target = optimal_predictor(z, bandwidth)
    return {
        "cosine": mean_cosine(p, target),
        "identity_cosine": mean_cosine(z, target),
        "bandwidth": float(bandwidth),
    }


def all_metrics(z: np.ndarray, p: np.ndarray | None) -> dict:
    """Every diagnostic of the probe set, as a JSON-ready dict.

    Keys: z_std, z_std_reference (1/sqrt(D)), effective_rank, singular_values (of the
    f̄ matrix, descending), between_rank (`between_image_effective_rank`),
    between_rank_split (`between_image_rank_split`, added later: older diagnostics.jsonl
    files lack it), shard_ratio,
    within_trace, within_log_volume, within_log_volume_gap (`within_image_volume`),
    predictor_cosine, predictor_identity_cosine, bandwidth, alignment, uniformity. A
    model without a predictor (SimCLR) passes p = None: the three predictor keys are
    then None.

    BLAS runs on one thread here: these matrices are small, and multithreaded
    OpenBLAS LAPACK slows down a hundredfold when another process holds a core
    (measured: an SVD of [256, 512] took 2 s instead of 0.01 s on 2 busy cores).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _all_metrics(np.asarray(z, np.float64), None if p is None else np.asarray(p, np.float64))


def _all_metrics(z: np.ndarray, p: np.ndarray | None) -> dict:
    fbar = mean_representations(z)
    pred = predictor_optimality(z, p) if p is not None else dict.fromkeys(("cosine", "identity_cosine", "bandwidth"))
    volume = within_image_volume(z)
    return {
        "z_std": z_std(z),
        "z_std_reference": float(1.0 / np.sqrt(z.shape[-1])),
        "effective_rank": effective_rank(fbar),
        "singular_values": singular_values(fbar).tolist(),  # the spectrum effective_rank summarises
        "between_rank": between_image_effective_rank(z),
        "between_rank_split": between_image_rank_split(z),
        "shard_ratio": shard_ratio(z),
        "within_trace": volume["trace"],
        "within_log_volume": volume["log_volume"],
        "within_log_volume_gap": volume["log_volume_gap"],
        "predictor_cosine": pred["cosine"],
        "predictor_identity_cosine": pred["identity_cosine"],
        "bandwidth": pred["bandwidth"],
        "alignment": alignment(z),
        "uniformity": uniformity(z),
    }
