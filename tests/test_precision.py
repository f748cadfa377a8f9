"""bfloat16 mixed precision trains like float32: the same gradients and the same losses.

Both precisions start from the same float32 weights and see the same augmented digits
batches. Under `mixed_bfloat16` the variables stay float32 and only the matmuls and
convolutions run in bfloat16 (8 bits of mantissa), so the two differ by rounding, not
by behaviour. A fresh network's loss is near 0, where any tolerance is loose, so the
comparisons start from weights float32 training has already moved to a loss
around -0.25.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf import losses
from simsiam_tf.config import make_config
from simsiam_tf.data import load, pair_dataset
from simsiam_tf.model import build_simsiam
from simsiam_tf.optim import make_optimizer

SMALL = dict(width=8, proj_dim=64, pred_dim=16, batch_size=64)
WARM_STEPS = 60
COMPARE_STEPS = 5


def _model(precision, weights):
    model = build_simsiam(make_config("digits", precision=precision, **SMALL))
    model.set_weights(weights)
    return model


def _fit(precision, weights, batches, steps_per_epoch):
    """Train on `batches` one step per epoch; the losses of each step and the model."""
    config = make_config("digits", precision=precision, **SMALL)
    model = _model(precision, weights)
    model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=steps_per_epoch))
    ds = tf.data.Dataset.from_tensor_slices(tuple(tf.stack(views) for views in zip(*batches)))
    history = model.fit(ds, epochs=len(batches), steps_per_epoch=1, verbose=0, shuffle=False)
    return np.array(history.history["loss"], np.float64).reshape(-1), model


@pytest.fixture(scope="module")
def setup():
    keras.utils.set_random_seed(0)
    init = build_simsiam(make_config("digits", **SMALL)).get_weights()
    images = load("digits", 32).train_images
    augment = aug.SimSiamAugment(aug.AugmentSpec.for_image_size(32))
    batches = list(pair_dataset(images, 64, augment, seed=0, epochs=4).take(WARM_STEPS + COMPARE_STEPS))
    yield init, batches
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def warmed(setup):
    """Weights after WARM_STEPS float32 steps (loss near -0.25), and their losses."""
    init, batches = setup
    warm_losses, model = _fit("float32", init, batches[:WARM_STEPS], steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    return model.get_weights(), warm_losses


def test_gradients_of_a_trained_network_point_the_same_way(setup, warmed):
    # On the trained network, not the fresh one: at initialisation the loss is near 0
    # and the early convolutions' gradients are so small that rounding the input
    # images alone to bfloat16 turns them by 15 degrees (measured on an AVX2 CPU
    # without native bfloat16, where one kernel's cosine fell to 0.73).
    _, batches = setup
    start, _ = warmed
    x1, x2 = batches[WARM_STEPS]
    grads = {}
    for precision in ("float32", "bfloat16"):
        model = _model(precision, start)
        with tf.GradientTape() as tape:
            p1, p2, z1, z2 = model.forward_pair(x1, x2)
            loss = losses.simsiam_loss(p1, p2, z1, z2)
        grads[precision] = [(v.path, g.numpy()) for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))]
    keras.mixed_precision.set_global_policy("float32")
    compared = 0
    for (path, g32), (_, g16) in zip(grads["float32"], grads["bfloat16"]):
        if "kernel" not in path:
            continue
        cos = np.sum(g32 * g16) / (np.linalg.norm(g32) * np.linalg.norm(g16))
        # Measured: 0.939 at worst (a shortcut convolution) on an AVX2 CPU, 0.98 or
        # more for most kernels; the gradient of another batch gives 0 or less (measured).
        assert cos > 0.9, (path, cos)
        compared += 1
    assert compared == 24  # 20 convolutions (stem, 16 in blocks, 3 shortcuts), 2 + 2 in the heads


def test_losses_agree_on_the_first_steps_of_a_trained_network(setup, warmed):
    _, batches = setup
    compare = batches[WARM_STEPS:]
    start, warm_losses = warmed
    assert warm_losses[-5:].mean() < -0.15  # a network that has learned something
    loss_32, _ = _fit("float32", start, compare, steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    loss_16, model_16 = _fit("bfloat16", start, compare, steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    keras.mixed_precision.set_global_policy("float32")
    assert model_16.backbone.layers[1].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model_16.weights)
    # Measured: at most 0.002 apart, while the losses range over -0.18 .. -0.38 from
    # batch to batch, so a step on the wrong batch or weights would not pass.
    np.testing.assert_allclose(loss_16, loss_32, atol=0.01)
