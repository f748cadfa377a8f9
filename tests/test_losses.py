"""The loss against the paper's definition (Eq. 1-4) and its invariants."""

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import losses


def _rand(shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def test_identical_inputs_give_minus_one():
    z = _rand([16, 32], 0)
    assert losses.negative_cosine(z, z).numpy() == pytest.approx(-1.0, abs=1e-6)
    assert losses.simsiam_loss(z, z, z, z).numpy() == pytest.approx(-1.0, abs=1e-6)


def test_opposite_inputs_give_plus_one():
    z = _rand([16, 32], 1)
    assert losses.negative_cosine(-z, z).numpy() == pytest.approx(1.0, abs=1e-6)
    assert losses.simsiam_loss(-z, -z, z, z).numpy() == pytest.approx(1.0, abs=1e-6)


def test_matches_the_definition_in_numpy():
    p, z = _rand([8, 5], 2).numpy(), _rand([8, 5], 3).numpy()
    expected = -np.mean(np.sum(p * z, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1)))
    assert losses.negative_cosine(p, z).numpy() == pytest.approx(expected, abs=1e-6)


def test_scale_invariant():
    p, z = _rand([8, 5], 4), _rand([8, 5], 5)
    assert losses.negative_cosine(3.0 * p, 0.1 * z).numpy() == pytest.approx(
        losses.negative_cosine(p, z).numpy(), abs=1e-6
    )


def test_symmetric_in_the_two_views():
    p1, p2, z1, z2 = (_rand([8, 6], s) for s in range(10, 14))
    a = losses.simsiam_loss(p1, p2, z1, z2).numpy()
    b = losses.simsiam_loss(p2, p1, z2, z1).numpy()
    assert a == pytest.approx(b, abs=1e-7)
    half = 0.5 * losses.negative_cosine(p1, z2) + 0.5 * losses.negative_cosine(p2, z1)
    assert a == pytest.approx(half.numpy(), abs=1e-7)


def test_no_gradient_reaches_the_stopped_side():
    p1, p2 = tf.Variable(_rand([8, 6], 20)), tf.Variable(_rand([8, 6], 21))
    z1, z2 = tf.Variable(_rand([8, 6], 22)), tf.Variable(_rand([8, 6], 23))
    with tf.GradientTape(persistent=True) as tape:
        loss = losses.simsiam_loss(p1, p2, z1, z2, stop_gradient=True)
    assert tape.gradient(loss, z1) is None and tape.gradient(loss, z2) is None
    assert np.abs(tape.gradient(loss, p1).numpy()).sum() > 0
    assert np.abs(tape.gradient(loss, p2).numpy()).sum() > 0


def test_without_stop_gradient_the_target_gets_gradient():
    p, z = tf.Variable(_rand([8, 6], 30)), tf.Variable(_rand([8, 6], 31))
    with tf.GradientTape() as tape:
        loss = losses.negative_cosine(p, z, stop_gradient=False)
    assert np.abs(tape.gradient(loss, z).numpy()).sum() > 0


def test_z_std_collapsed_and_isotropic():
    collapsed = tf.tile(_rand([1, 64], 40), [256, 1])
    assert losses.z_std(collapsed).numpy() == pytest.approx(0.0, abs=1e-6)
    d = 64
    iso = _rand([20000, d], 41)
    assert losses.z_std(iso).numpy() == pytest.approx(1 / np.sqrt(d), rel=0.03)


def test_global_z_std_equals_z_std_on_one_device_and_across_replicas(mirrored):
    z = _rand([64, 32], 50)
    assert losses.global_z_std(z).numpy() == pytest.approx(losses.z_std(z).numpy(), rel=1e-5)
    strategy = mirrored
    halves = strategy.experimental_distribute_values_from_function(lambda ctx: z[ctx.replica_id_in_sync_group * 32 :][:32])
    per_replica = strategy.run(tf.function(losses.global_z_std), args=(halves,))
    for value in strategy.experimental_local_results(per_replica):
        assert value.numpy() == pytest.approx(losses.z_std(z).numpy(), rel=1e-5)
