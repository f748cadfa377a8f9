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


def test_every_step_of_a_run_uses_its_epochs_cosine_rate(tmp_path):
    # Over a whole run, as training wires it: the schedule must get the steps per epoch
    # that fit() runs, so that every step of epoch k (0-based) uses
    # lr * 0.5 * (1 + cos(pi * k / epochs)) and the rate changes exactly at epoch ends.
    from simsiam_tf import training

    config = make_config("digits", width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=3, train_limit=96,
                         knn_every=0, diag_every=0, precision="float32")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            seen.append((self._epoch, batch, float(optimizer.learning_rate)))

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    training.run(config, str(tmp_path / "run"), verbose=0, extra_callbacks=[Record()])
    steps = 96 // 32
    assert [(e, b) for e, b, _ in seen] == [(e, b) for e in range(3) for b in range(steps)]
    for epoch, _, lr in seen:
        assert lr == pytest.approx(config.lr * 0.5 * (1 + math.cos(math.pi * epoch / 3)), rel=1e-6)
    assert len({lr for _, _, lr in seen}) == 3  # one rate per epoch, three different ones
