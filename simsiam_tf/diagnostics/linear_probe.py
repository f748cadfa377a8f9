"""Linear probe: l2-regularised logistic regression on frozen features.

The recipe (SimCLR's linear evaluation for transfer, Chen et al. 2020, appendix B.5;
Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"):

1. Features are computed once, without augmentation (evaluation preprocessing only).
2. Each feature is standardised with the mean and std of the training split.
3. Multinomial logistic regression with an l2 penalty, fitted with L-BFGS
   (scikit-learn `LogisticRegression`, at most 1,000 iterations).
4. The inverse regularisation strength C is chosen from `C_GRID` by top-1 accuracy on
   a stratified 20% of the training split held out (fixed seed); ties go to the
   smaller C (stronger regularisation).
5. The classifier is refitted on the whole training split with that C and scored
   once on the test split.

This differs from the SimSiam paper's linear evaluation (SGD or LARS for 90 epochs on
augmented images); it is deterministic, cheap on a CPU, and needs no tuning.
"""

from __future__ import annotations

import warnings

import numpy as np

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
VALIDATION_FRACTION = 0.2


def _fit(features, labels, c, max_iter):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        # A C that needs more iterations is scored as it is: it still counts as a choice.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    c_grid=C_GRID,
    validation_fraction: float = VALIDATION_FRACTION,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Top-1 accuracy of the linear probe described in the module docstring.

    Args:
        train_features, test_features: float [N, F] frozen features.
        train_labels, test_labels: int [N].
    Returns:
        {"top1": test accuracy, "C": the chosen C, "validation_top1": {C: accuracy},
         "train_images", "validation_images"}.
    """
    from sklearn.model_selection import train_test_split

    train_features = np.asarray(train_features, np.float64)
    test_features = np.asarray(test_features, np.float64)
    train_labels = np.asarray(train_labels)
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0)
    std[std == 0] = 1.0  # constant features stay constant (e.g. dead channels)
    train_x = (train_features - mean) / std
    test_x = (test_features - mean) / std

    # Stratify when every class can be in both parts; tiny or skewed sets cannot.
    counts = np.bincount(train_labels)
    classes = int(np.sum(counts > 0))
    held_out = int(np.ceil(validation_fraction * len(train_labels)))
    can_stratify = counts[counts > 0].min() >= 2 and classes <= held_out <= len(train_labels) - classes
    stratify = train_labels if can_stratify else None
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_labels, test_size=validation_fraction, random_state=seed, stratify=stratify
    )
    scores = {}
    for c in c_grid:
        scores[c] = float(np.mean(_fit(fit_x, fit_y, c, max_iter).predict(val_x) == val_y))
    best = max(c_grid, key=lambda c: (scores[c], -c))
    final = _fit(train_x, train_labels, best, max_iter)
    return {
        "top1": float(np.mean(final.predict(test_x) == np.asarray(test_labels))),
        "C": float(best),
        "validation_top1": {f"{c:g}": s for c, s in scores.items()},
        "train_images": int(len(train_x)),
        "validation_images": int(len(val_x)),
    }
