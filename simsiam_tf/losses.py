"""SimSiam's loss: the symmetric negative cosine similarity with a stop-gradient.

Paper (Chen & He, 2021, Eq. 1-4):

    D(p, z) = - p / ||p||_2 . z / ||z||_2
    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2

L lies in [-1, 1]; -1 means each prediction points exactly at the other view's
projection. The stop-gradient is what keeps training from collapsing to a constant
(the paper's Fig. 2); `stop_gradient=False` is that ablation.
"""

from __future__ import annotations

import tensorflow as tf


def negative_cosine(p: tf.Tensor, z: tf.Tensor, stop_gradient: bool = True) -> tf.Tensor:
    """D(p, z): minus the cosine similarity of rows of p and z, averaged over the batch.

    Args:
        p: [B, D] predictions.
        z: [B, D] projections (the target side).
        stop_gradient: treat z as a constant, as the paper does.
    Returns:
        float32 scalar in [-1, 1].
    """
    p = tf.cast(p, tf.float32)
    z = tf.cast(z, tf.float32)
    if stop_gradient:
        z = tf.stop_gradient(z)
    p = tf.math.l2_normalize(p, axis=1)
    z = tf.math.l2_normalize(z, axis=1)
    return -tf.reduce_mean(tf.reduce_sum(p * z, axis=1))


def simsiam_loss(p1, p2, z1, z2, stop_gradient: bool = True) -> tf.Tensor:
    """L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2."""
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(p2, z1, stop_gradient)


def z_std(z: tf.Tensor) -> tf.Tensor:
    """Per-channel std of the l2-normalised z over the batch, averaged over channels.

    The paper's collapse signal (Sec. 4.1, Fig. 2 middle): about 1/sqrt(D) when the
    outputs spread over the unit sphere, 0 when they collapse to a point.
    """
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))


def global_z_std(z: tf.Tensor) -> tf.Tensor:
    """`z_std` over the global batch, inside a replica context of any strategy.

    Per-channel sums of z and z^2 are all-reduced (2 x D + 1 numbers), so the value equals
    `z_std` of the whole global batch, not an average of smaller per-replica estimates.
    """
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)
    # One packed all-reduce [count, sum z, sum z^2]: a single collective per call, so
    # replicas running eagerly in separate threads cannot pair up different reductions.
    packed = tf.concat(
        [tf.cast(tf.shape(z)[:1], tf.float32), tf.reduce_sum(z, axis=0), tf.reduce_sum(tf.square(z), axis=0)],
        axis=0,
    )
    total = tf.distribute.get_replica_context().all_reduce("sum", packed)
    dim = tf.shape(z)[1]
    count = total[0]
    mean = total[1 : 1 + dim] / count
    mean_sq = total[1 + dim :] / count
    return tf.reduce_mean(tf.sqrt(tf.maximum(mean_sq - tf.square(mean), 0.0)))

