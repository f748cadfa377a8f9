"""SimSiam's loss: the symmetric negative cosine similarity with a stop-gradient; and
SimCLR's NT-Xent, the contrastive baseline it is compared with (`nt_xent`).

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



def nt_xent(z1: tf.Tensor, z2: tf.Tensor, temperature: float = 0.5) -> tf.Tensor:
    """SimCLR's NT-Xent loss (Chen et al., 2020, Eq. 1) over the global batch.

    Every view is an anchor; its positive is the other view of its image, its
    negatives are the 2N - 2 other views of the global batch (N images over all
    replicas). With s the cosine similarity and t the temperature:

        l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) )

    and the loss is the mean of l over all 2N anchors.

    Inside a replica context of several replicas, the projections of every replica
    are all-gathered, so negatives come from the whole global batch; each replica
    returns the mean over its own 2n anchors, and TensorFlow's all-gather gradient
    sends every replica the gradient for its own rows from all replicas' anchors.
    Dividing by the number of replicas and summing gradients across replicas (what
    `train_step` does) is then exactly the single-device step on the global batch.

    Args:
        z1, z2: [n, D] projections of this replica's n images, one row per image.
        temperature: t > 0.
    Returns:
        float32 scalar.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=1)
    n = tf.shape(z1)[0]
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        keys1, keys2 = context.all_gather(z1, axis=0), context.all_gather(z2, axis=0)
        offset = tf.cast(context.replica_id_in_sync_group, tf.int32) * n
    else:
        keys1, keys2, offset = z1, z2, 0
    total = tf.shape(keys1)[0]
    keys = tf.concat([keys1, keys2], axis=0)  # [2N, D]: view 1 of every image, then view 2
    anchors = tf.concat([z1, z2], axis=0)  # [2n, D]
    logits = tf.matmul(anchors, keys, transpose_b=True) / temperature
    rows = offset + tf.range(n)
    itself = tf.concat([rows, rows + total], axis=0)  # each anchor's own column
    positive = tf.concat([rows + total, rows], axis=0)  # the other view of its image
    logits -= 1e9 * tf.one_hot(itself, 2 * total, dtype=logits.dtype)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=logits)
    return tf.reduce_mean(loss)
