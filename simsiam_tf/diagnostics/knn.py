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


class KnnProbe:
    """kNN top-1 of a backbone's features: bank = the train split, queries = the test
    split and, when there is one, the validation split (`input.contract.EvalSplit`s:
    held in memory, or read from disk at every evaluation)."""

    def __init__(self, bank, test, image_size: int, k: int, temperature: float, num_classes: int | None = None,
                 val=None):
        self.bank = bank
        self.queries = {"test": test} if val is None else {"val": val, "test": test}
        self.num_classes = num_classes
        self.image_size = image_size
        self.k = k
        self.temperature = temperature
        self._extractors = {}

    def __call__(self, backbone) -> dict[str, float]:
        """Top-1 per query split: {"test": ..., "val": ...} (no "val" without one)."""
        from simsiam_tf.diagnostics.embed import FeatureExtractor

        if id(backbone) not in self._extractors:
            self._extractors[id(backbone)] = FeatureExtractor(backbone, self.image_size)
        extract = self._extractors[id(backbone)]
        bank, bank_labels = extract.embed_split(self.bank)
        top1 = {}
        for name, split in self.queries.items():
            queries, labels = extract.embed_split(split)
            num_classes = max(self.num_classes or 0, int(max(bank_labels.max(), labels.max())) + 1)
            top1[name] = knn_accuracy(bank, bank_labels, queries, labels, num_classes, self.k, self.temperature)
        return top1

    def skipped(self) -> dict[str, int]:
        """Images of each query split that could not be decoded in the last evaluation."""
        return {name: split.skipped for name, split in self.queries.items()}
