"""Weighted kNN against hand-checked cases."""

import numpy as np
import pytest

from simsiam_tf.diagnostics import knn


def test_separated_clusters_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    bank_labels = np.repeat(np.arange(5), 40)
    bank = centres[bank_labels] + rng.normal(size=(200, 16))
    query_labels = np.repeat(np.arange(5), 10)
    queries = centres[query_labels] + rng.normal(size=(50, 16))
    assert knn.knn_accuracy(bank, bank_labels, queries, query_labels, 5, k=20) == 1.0


def test_votes_are_weighted_by_exp_similarity():
    # Two neighbours of class 0 at cosine 0.5, one of class 1 at cosine 1.0.
    # T = 0.1: 2 * e^5 < e^10, so class 1 wins; with T = 10 the count wins.
    bank = np.array([[0.5, np.sqrt(0.75)], [0.5, -np.sqrt(0.75)], [1.0, 0.0]])
    labels = np.array([0, 0, 1])
    query = np.array([[1.0, 0.0]])
    assert knn.knn_predict(bank, labels, query, 2, k=3, temperature=0.1)[0] == 1
    assert knn.knn_predict(bank, labels, query, 2, k=3, temperature=10.0)[0] == 0


def test_k_larger_than_bank_and_chunking():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 8))
    labels = rng.integers(0, 3, 30)
    queries = rng.normal(size=(2500, 8))
    a = knn.knn_predict(bank, labels, queries, 3, k=200, chunk=1024)
    b = knn.knn_predict(bank, labels, queries, 3, k=30, chunk=100000)
    np.testing.assert_array_equal(a, b)


def test_random_features_give_chance():
    rng = np.random.default_rng(2)
    bank, bank_labels = rng.normal(size=(2000, 32)), rng.integers(0, 10, 2000)
    queries, query_labels = rng.normal(size=(1000, 32)), rng.integers(0, 10, 1000)
    acc = knn.knn_accuracy(bank, bank_labels, queries, query_labels, 10)
    assert acc == pytest.approx(0.1, abs=0.04)
    # Chance by spreading the votes, not by a degenerate answer: a classifier that always
    # answers one class also scores ~0.1 on balanced labels. Every class is predicted,
    # none for more than twice its share (1000 / 10 = 100).
    counts = np.bincount(knn.knn_predict(bank, bank_labels, queries, 10), minlength=10)
    assert counts.min() > 0 and counts.max() < 200, counts


def test_a_classifier_that_always_answers_one_class_fails_the_chance_test():
    # The check above must be able to fail: a constant bank label gives one class only.
    rng = np.random.default_rng(2)
    bank, queries = rng.normal(size=(2000, 32)), rng.normal(size=(1000, 32))
    counts = np.bincount(knn.knn_predict(bank, np.full(2000, 3), queries, 10), minlength=10)
    assert not (counts.min() > 0 and counts.max() < 200)
