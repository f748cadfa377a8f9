"""TorchSGD reproduces torch.optim.SGD; the schedule is the official per-epoch cosine."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import optim
from simsiam_tf.config import make_config


def _torch_sgd_reference(w0, grads, lrs, momentum, wd):
    """torch.optim.SGD.step, transcribed: d = g + wd*w; buf = m*buf + d; w -= lr*buf."""
    w, buf = w0.copy(), None
    for g, lr in zip(grads, lrs):
        d = g + wd * w
        buf = d.copy() if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


def test_torch_sgd_matches_pytorch_update_with_changing_lr():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(6)]
    schedule = optim.EpochCosine(0.1, steps_per_epoch=2, epochs=3)
    lrs = [float(schedule(i)) for i in range(6)]
    var = keras.Variable(w0)
    opt = optim.TorchSGD(learning_rate=schedule, momentum=0.9, weight_decay=5e-4)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
    expected = _torch_sgd_reference(w0, grads, lrs, 0.9, 5e-4)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weight_decay_is_coupled_not_doubled():
    # One step from zero momentum with a zero gradient: w1 = w0 - lr * wd * w0.
    var = keras.Variable(np.ones(4, np.float32))
    opt = optim.TorchSGD(learning_rate=0.5, momentum=0.9, weight_decay=0.1)
    opt.apply_gradients([(tf.zeros(4), var)])
    np.testing.assert_allclose(var.numpy(), 1 - 0.5 * 0.1, rtol=1e-6)


def test_fixed_lr_variables_ignore_the_schedule():
    schedule = optim.EpochCosine(0.2, steps_per_epoch=1, epochs=2)
    a, b = keras.Variable(np.zeros(2, np.float32)), keras.Variable(np.zeros(2, np.float32))
    opt = optim.TorchSGD(schedule, momentum=0.0, fixed_lr_variables=[b], fixed_lr=0.2)
    g = tf.ones(2)
    opt.apply_gradients([(g, a), (g, b)])  # step 0: lr 0.2 for both
    opt.apply_gradients([(g, a), (g, b)])  # step 1: cosine gives 0.1; b keeps 0.2
    np.testing.assert_allclose(a.numpy(), -(0.2 + 0.1), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), -(0.2 + 0.2), rtol=1e-6)


def test_epoch_cosine_values():
    s = optim.EpochCosine(0.06, steps_per_epoch=10, epochs=4)
    for step, epoch in [(0, 0), (9, 0), (10, 1), (25, 2), (39, 3)]:
        assert float(s(step)) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * epoch / 4)), rel=1e-6)


def test_lr_scales_with_global_batch():
    assert make_config("cifar", batch_size=512).lr == pytest.approx(0.03 * 2)
    assert make_config("imagenet", batch_size=256).lr == pytest.approx(0.05)
