"""Weighted k-nearest-neighbour classification of frozen features.

The monitor used by lightly's benchmarks and InstDisc (Wu et al., 2018): cosine
similarities to a labelled feature bank, the k nearest neighbours each vote for their
class with weight exp(sim / T), and the class with the largest total wins. k = 200 and
T = 0.1 by default.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def knn_predict(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted labels [Q] for query features [Q, D] from a bank [N, D] with labels [N].

    Features are l2-normalised here, so any scale is accepted.
    """
    bank_t = tf.math.l2_normalize(tf.constant(bank, tf.float32), axis=1)
    onehot = tf.one_hot(tf.constant(bank_labels, tf.int32), num_classes)
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(queries), chunk):
        q = tf.math.l2_normalize(tf.constant(queries[start : start + chunk], tf.float32), axis=1)
        sim = tf.matmul(q, bank_t, transpose_b=True)
        top_sim, top_idx = tf.math.top_k(sim, k=k)
        weights = tf.exp(top_sim / temperature)
        votes = tf.reduce_sum(tf.gather(onehot, top_idx) * weights[..., None], axis=1)
        preds.append(tf.argmax(votes, axis=1, output_type=tf.int32).numpy())
    return np.concatenate(preds) if preds else np.zeros([0], np.int32)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=200, temperature=0.1) -> float:
    """Top-1 accuracy of `knn_predict` on labelled queries."""
    preds = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return float(np.mean(preds == np.asarray(query_labels)))
