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
    from simsiam_tf.input import split_images

    # Full batches of the images it trains on: the 96, less the validation split held out.
    trained_on = len(split_images(train_limit=96, val_fraction=config.val_fraction)[0])
    steps = trained_on // 32
    assert steps >= 2
    assert [(e, b) for e, b, _ in seen] == [(e, b) for e in range(3) for b in range(steps)]
    for epoch, _, lr in seen:
        assert lr == pytest.approx(config.lr * 0.5 * (1 + math.cos(math.pi * epoch / 3)), rel=1e-6)
    assert len({lr for _, _, lr in seen}) == 3  # one rate per epoch, three different ones


# -- fix_pred_lr (the ImageNet preset) on real weight updates -----------------------------


def _fix_pred_lr_config():
    # The ImageNet preset (fix_pred_lr, momentum 0.9, weight decay 1e-4) on a tiny network.
    # A large base lr makes the updates large against float32 round-off of the weights;
    # batch 32 scales it to lr = base_lr / 8, so a fixed rate of base_lr would show.
    config = make_config("imagenet", backbone="resnet18", width=4, image_size=16, proj_dim=32, pred_dim=8,
                         batch_size=32, epochs=4, base_lr=4.0)
    assert config.fix_pred_lr and config.momentum == 0.9 and config.weight_decay == 1e-4
    return config


def _check_fixed_predictor_lr(strategy):
    """One training step at the start of epoch 2 of 4 (cosine factor 0.5): every
    predictor variable moves at the fixed lr, every other one at half of it.

    On the first step of a fresh TorchSGD the momentum buffer is d = g + wd * w itself,
    so a variable moves by exactly -lr * d, with g the gradient of the SimSiam loss on
    one device (taken here with a GradientTape on a copy of the initial model).
    """
    from simsiam_tf import losses
    from simsiam_tf.model import build_simsiam

    config = _fix_pred_lr_config()
    steps_per_epoch, epoch = 3, 2
    keras.utils.set_random_seed(0)
    reference = build_simsiam(config)
    init = reference.get_weights()
    from simsiam_tf.input import batches
    from simsiam_tf.model import normalize_uint8

    batch = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 2, 16, 16, 3)), tf.uint8)  # the input's format
    with tf.GradientTape() as tape:
        p1, p2, z1, z2 = reference.forward_pair(*map(normalize_uint8, batches.unpack(batch)), training=True)
        loss = losses.simsiam_loss(p1, p2, z1, z2)
    grads = tape.gradient(loss, reference.trainable_variables)
    d = [g.numpy() + config.weight_decay * w for g, w in zip(grads, (v.numpy() for v in reference.trainable_variables))]

    with strategy.scope():
        model = build_simsiam(config, sync_bn=strategy.num_replicas_in_sync > 1)
        model.set_weights(init)
        # Eagerly: the same train_step and optimiser fit() traces, without the tracing.
        model.compile(optimizer=optim.make_optimizer(model, config, steps_per_epoch), run_eagerly=True)
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(epoch * steps_per_epoch)  # the first step of epoch 2
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    after = [v.numpy() for v in model.trainable_variables]

    predictor = {id(v) for v in model.predictor.trainable_variables}
    cosine_lr = config.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    assert cosine_lr == pytest.approx(0.5 * config.lr)
    checked = {True: 0, False: 0}
    for v, w0, w1, d_v in zip(model.trainable_variables, before, after, d):
        step = w1 - w0
        lr = config.lr if id(v) in predictor else cosine_lr
        # Element by element: float32 rounding of the new weight (2 ulps) and of the
        # gradient, computed twice (1e-3 of the largest move). Where the loss gives no
        # gradient (a residual branch behind a zero-initialised gamma) d is the weight
        # decay alone, 1e-4 * w: a move of hundreds of ulps, so its lr shows too.
        tol = 2 * np.spacing(np.abs(w0)) + 1e-3 * np.abs(lr * d_v).max()
        if not (np.abs(step + lr * d_v) <= tol).all():
            used = -float(np.sum(step * d_v) / max(np.sum(d_v * d_v), 1e-30))
            pytest.fail(f"{v.path}: moved at lr {used:.5g}, expected {lr:.5g} (fixed {config.lr}, cosine {cosine_lr})")
        checked[id(v) in predictor] += bool(np.any(d_v))
    # Predictor: fc1 kernel, bn1 gamma and beta, fc2 kernel and bias; and the rest.
    assert checked[True] == 5 and checked[False] > 40


def test_fix_pred_lr_keeps_the_predictor_at_the_base_lr():
    _check_fixed_predictor_lr(tf.distribute.get_strategy())


def test_fix_pred_lr_under_mirrored_strategy(mirrored):
    # Two replicas of 16 images: synchronised BatchNorm and summed gradients make the
    # step the single-device step on 32, so the same moves are expected.
    _check_fixed_predictor_lr(mirrored)
