"""bfloat16 mixed precision trains like float32: the same gradients and the same losses.

Both precisions start from the same float32 weights and see the same augmented digits
batches. Under `mixed_bfloat16` the variables stay float32 and only the matmuls and
convolutions run in bfloat16 (8 bits of mantissa), so the two differ by rounding, not
by behaviour. A fresh network's loss is near 0, where any tolerance is loose, so the
loss comparison starts from weights float32 training has already moved to a loss
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


def test_first_step_gradients_point_the_same_way(setup):
    init, batches = setup
    x1, x2 = batches[0]
    grads = {}
    for precision in ("float32", "bfloat16"):
        model = _model(precision, init)
        with tf.GradientTape() as tape:
            p1, p2, z1, z2 = model.forward_pair(x1, x2)
            loss = losses.simsiam_loss(p1, p2, z1, z2)
        grads[precision] = [(v.path, g.numpy()) for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))]
    keras.mixed_precision.set_global_policy("float32")
    compared = 0
    for (path, g32), (_, g16) in zip(grads["float32"], grads["bfloat16"]):
        if "kernel" not in path or not np.any(g32):
            continue  # zero-init residual: a block's inner convolutions get no gradient at step 1
        cos = np.sum(g32 * g16) / (np.linalg.norm(g32) * np.linalg.norm(g16))
        assert cos > 0.85, (path, cos)
        compared += 1
    assert compared >= 8  # stem, 3 shortcut convolutions, 2 projector and 2 predictor layers


def test_losses_agree_on_the_first_steps_of_a_trained_network(setup):
    init, batches = setup
    warm, compare = batches[:WARM_STEPS], batches[WARM_STEPS:]
    warm_losses, warmed = _fit("float32", init, warm, steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    assert warm_losses[-5:].mean() < -0.15  # a network that has learned something
    start = warmed.get_weights()
    loss_32, _ = _fit("float32", start, compare, steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    loss_16, model_16 = _fit("bfloat16", start, compare, steps_per_epoch=WARM_STEPS + COMPARE_STEPS)
    keras.mixed_precision.set_global_policy("float32")
    assert model_16.backbone.layers[1].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model_16.weights)
    # Measured: at most 0.002 apart, while the losses range over -0.18 .. -0.38 from
    # batch to batch, so a step on the wrong batch or weights would not pass.
    np.testing.assert_allclose(loss_16, loss_32, atol=0.01)
