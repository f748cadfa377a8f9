"""Backbone features of evaluation images, and BatchNorm statistics estimated from data.

Both use the one evaluation preprocessing (`augment.eval_preprocess`), so the kNN
monitor, the probe diagnostics, the projector and `evaluate.py` see an image as the
exported model does.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug


class FeatureExtractor:
    """Backbone features (float32 [N, F]) of uint8 images, with the evaluation preprocessing."""

    def __init__(self, backbone: keras.Model, image_size: int, batch_size: int = 256):
        self.backbone = backbone
        self.batch_size = batch_size
        self.dim = backbone.output.shape[-1]

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def embed(x):
            return tf.cast(backbone(aug.eval_preprocess(x, image_size), training=False), tf.float32)

        self._embed = embed

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [
            self._embed(tf.constant(images[i : i + self.batch_size])).numpy()
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros([0, self.dim], np.float32)

    def embed_split(self, split) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and labels of an evaluation split (`input.contract.EvalSplit`), batch
        by batch, so a streamed split is never held whole."""
        features, labels = [], []
        for images, batch_labels in split.batches(self.batch_size):
            features.append(self._embed(tf.constant(images)).numpy())
            labels.append(batch_labels)
        if not features:
            return np.zeros([0, self.dim], np.float32), None
        return np.concatenate(features), None if labels[0] is None else np.concatenate(labels)


def calibrate_batchnorm(backbone: keras.Model, split, image_size: int, steps: int = 30, batch_size: int = 256):
    """Estimate BatchNorm's moving statistics from data without changing any weight.

    A freshly initialised network has moving mean 0 and variance 1, so its inference-mode
    features are not normalised at all, and kNN on them understates what random features
    can do. Running the backbone in training mode updates only the moving statistics
    (momentum 0.9: after 30 steps, 4% of the initial values remain). Training itself is
    unaffected: in training mode BatchNorm uses batch statistics.

    `split` is an evaluation split (`calibration_batches`).
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def forward(x):
        backbone(aug.eval_preprocess(x, image_size), training=True)

    for images in split.calibration_batches(steps, batch_size):
        forward(tf.constant(images))
