"""MirroredStrategy on two logical CPU devices equals single-device training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import distribute
from simsiam_tf.config import UsageError, make_config
from simsiam_tf.model import build_model
from simsiam_tf.optim import make_optimizer


def _step(strategy, config, weights, batch, steps=1):
    with strategy.scope():
        model = build_model(config, sync_bn=strategy.num_replicas_in_sync > 1)
        model.set_weights(weights)
        model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=10))
    ds = tf.data.Dataset.from_tensors(batch).repeat(steps)
    history = model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return history.history["loss"][-1], [v.numpy() for v in model.weights]


@pytest.mark.parametrize("method", ["simsiam", "simclr"])
def test_mirrored_steps_equal_single_device(mirrored, method):
    # Two steps: the second starts from the first's weights, BatchNorm statistics and
    # momentum, so a difference in any of them shows. For SimCLR it also shows that
    # each replica's anchors meet the other replica's views as negatives, through fit().
    steps = 2
    config = make_config("digits", width=8, proj_dim=64, pred_dim=16, batch_size=16, weight_decay=5e-4, method=method)
    keras.utils.set_random_seed(0)
    init = build_model(config).get_weights()
    batch = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 2, 32, 32, 3)), tf.uint8)  # the input's format

    loss_1, w_1 = _step(tf.distribute.get_strategy(), config, init, batch, steps)
    loss_2, w_2 = _step(mirrored, config, init, batch, steps)

    assert loss_2 == pytest.approx(loss_1, abs=1e-5)  # local negatives would be ~0.7 lower for SimCLR
    # Weights to float32 round-off, measured over three random batches (2026-12-05, AMD
    # EPYC with AVX512-BF16): at most 5.6e-6 apart for SimSiam and 2.7e-5 for SimCLR,
    # whose all-gathered negatives add a reduction in another order.
    atol = 1e-5 if method == "simsiam" else 1e-4
    changed = 0
    for a, b, w0 in zip(w_1, w_2, init):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol)
        changed += not np.allclose(a, w0)
    assert changed > len(init) // 2  # the step really moved the weights


def test_make_strategy_choices():
    assert distribute.make_strategy("default").num_replicas_in_sync == 1
    assert distribute.make_strategy("mirrored", cpu_replicas=2).num_replicas_in_sync == 2
    with pytest.raises(UsageError, match="TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(UsageError, match="only applies"):
        distribute.make_strategy("default", cpu_replicas=2)


def test_auto_precision_follows_the_hardware(monkeypatch):
    strategy = tf.distribute.get_strategy()
    assert distribute.resolve_precision("float32", strategy)[0] == "float32"
    assert distribute.resolve_precision("bfloat16", strategy)[0] == "bfloat16"
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert distribute.resolve_precision("auto", strategy) == ("bfloat16", "auto: CPU with avx512_bf16")
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert distribute.resolve_precision("auto", strategy)[0] == "bfloat16"
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert distribute.resolve_precision("auto", strategy) == ("float32", "auto: no native bfloat16 on this CPU")


def test_library_configs_are_float32_whatever_the_cpu():
    # Only train.py asks for --precision auto. Tests build their runs from make_config
    # and TrainConfig, so these must not follow the CPU: a test's outcome would then
    # depend on whether the machine has native bfloat16.
    from simsiam_tf.config import PRESETS, TrainConfig

    assert TrainConfig().precision == "float32"
    assert {name: make_config(name).precision for name in PRESETS} == {name: "float32" for name in PRESETS}
