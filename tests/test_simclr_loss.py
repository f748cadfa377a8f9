"""SimCLR's NT-Xent loss against its definition, and its negatives across replicas."""

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import losses


def _nt_xent_reference(z1, z2, t):
    """Chen et al. 2020, Eq. 1, summed over all 2N anchors and divided by 2N (float64)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2  # the other view of anchor i's image
        others = [s[i, k] for k in range(n2) if k != i]
        total += -(s[i, j] - np.log(np.sum(np.exp(others))))
    return total / n2


@pytest.mark.parametrize("n, d, t", [(4, 3, 0.5), (7, 16, 0.1), (1, 5, 1.0)])
def test_values_and_gradients_match_the_definition(n, d, t):
    rng = np.random.default_rng(n * d)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a, b = tf.Variable(z1, dtype=tf.float32), tf.Variable(z2, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.nt_xent(a, b, temperature=t)
    np.testing.assert_allclose(float(loss), _nt_xent_reference(z1, z2, t), rtol=1e-5, atol=1e-6)
    grads = tape.gradient(loss, [a, b])
    # Central differences of the float64 reference.
    eps = 1e-5
    for g, which in zip(grads, (0, 1)):
        numeric = np.zeros((n, d))
        for i in range(n):
            for k in range(d):
                plus, minus = [z1.copy(), z2.copy()], [z1.copy(), z2.copy()]
                plus[which][i, k] += eps
                minus[which][i, k] -= eps
                numeric[i, k] = (_nt_xent_reference(*plus, t) - _nt_xent_reference(*minus, t)) / (2 * eps)
        np.testing.assert_allclose(g.numpy(), numeric, rtol=1e-3, atol=1e-5)


def test_known_values():
    # Identical views, orthogonal images: the positive has similarity 1 and every
    # negative 0, so l = -log(e^(1/t) / (e^(1/t) + 2N - 2)).
    z = np.eye(3)
    t = 0.5
    expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 4))
    np.testing.assert_allclose(float(losses.nt_xent(z, z, t)), expected, rtol=1e-6)
    # A collapsed batch: every similarity 1, l = log(2N - 1), chance among the others.
    same = np.ones((3, 4))
    np.testing.assert_allclose(float(losses.nt_xent(same, same, t)), np.log(5), rtol=1e-6)


def test_two_replicas_see_the_whole_global_batch(mirrored):
    # z = x W on each replica, half the images each: the replicas' losses (each divided
    # by the number of replicas, as train_step does) sum to the one-device loss on the
    # global batch, and the summed gradients of W equal the one-device gradient, which
    # holds only if each replica's anchors meet the other replica's views as negatives
    # and the gradient flows back through the gather to the rows' owners.
    rng = np.random.default_rng(0)
    x1, x2 = (rng.normal(size=(8, 5)).astype(np.float32) for _ in range(2))
    w0 = rng.normal(size=(5, 6)).astype(np.float32)
    t = 0.2

    w = tf.Variable(w0)
    with tf.GradientTape() as tape:
        single = losses.nt_xent(x1 @ w, x2 @ w, t)
    single_grad = tape.gradient(single, w)

    with mirrored.scope():
        wm = tf.Variable(w0)

    def replica_step(a, b):
        with tf.GradientTape() as tape:
            loss = losses.nt_xent(tf.matmul(a, wm), tf.matmul(b, wm), t) / mirrored.num_replicas_in_sync
        return loss, tape.gradient(loss, wm)

    halves = tf.data.Dataset.from_tensors((x1, x2)).unbatch().batch(8)
    (a, b) = next(iter(mirrored.experimental_distribute_dataset(halves)))
    loss, grad = tf.function(lambda a, b: mirrored.run(replica_step, args=(a, b)))(a, b)
    total = mirrored.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
    grad = mirrored.reduce(tf.distribute.ReduceOp.SUM, grad, axis=None)
    np.testing.assert_allclose(float(total), float(single), rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), single_grad.numpy(), rtol=1e-4, atol=1e-6)
    # The same step with each replica's negatives limited to its own half differs.
    local = sum(float(losses.nt_xent(x1[h] @ w0, x2[h] @ w0, t)) / 2 for h in (slice(0, 4), slice(4, 8)))
    assert abs(local - float(single)) > 1e-2
