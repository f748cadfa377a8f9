"""float16 mixed precision: it learns, overflowing steps are skipped, the export is float32,
and `--precision auto` chooses it on GPUs of compute capability 7.x.

`--precision float16` is Keras's `mixed_float16` policy (float32 variables, the heads'
last layers and the loss in float32) with dynamic loss scaling (`optim.LossScaleOptimizer`
around `TorchSGD`). It is meant for V100/T4-class GPUs; these tests run it on the CPU,
where it is slower than float32 but computes the same thing.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf import distribute, export, optim, training
from simsiam_tf.config import make_config
from simsiam_tf.model import build_simsiam

TINY = dict(width=8, proj_dim=64, pred_dim=16, knn_k=20, diag_every=0, projector_images=0)


def _views(batch=16, seed=1):
    """A batch in the input's format: uint8 [B, 2, S, S, 3]."""
    return tf.cast(tf.random.uniform([batch, 2, 32, 32, 3], 0, 256, tf.int32, seed=seed), tf.uint8)


def _compiled(precision="float16", strategy=None, sync_bn=True):
    config = make_config("digits", precision=precision, batch_size=16, **TINY)
    keras.utils.set_random_seed(0)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = build_simsiam(config, sync_bn=sync_bn and strategy.num_replicas_in_sync > 1)
        model.compile(optimizer=optim.make_optimizer(model, config, steps_per_epoch=100), jit_compile=False)
        model.optimizer.build(model.trainable_variables)
    return model


def _step(model, views):
    return model.fit(tf.data.Dataset.from_tensors(views).repeat(), steps_per_epoch=1, epochs=1, verbose=0,
                     shuffle=False).history


def _state(model):
    sgd = optim.base_optimizer(model.optimizer)
    return [v.numpy() for v in model.trainable_variables], [m.numpy() for m in sgd.momentums]


def test_float16_run_learns_on_digits(tmp_path):
    # 4 epochs of 8 steps (512 digits, batch 64). Measured epoch-mean losses on a 2-core
    # AMD EPYC (AVX512-BF16), seed 0: -0.014, -0.040, -0.060, -0.070 (loss scale 32768
    # throughout), float32 from the same start -0.011 -> -0.084; seeds 1 and 2 in
    # float16 fell by 0.097 and 0.150. A fall of 0.03 is about half the smallest
    # measured one. 45-80 s on 2 cores.
    config = make_config(
        "digits", precision="float16", batch_size=64, epochs=4, train_limit=512, val_fraction=0.0, knn_every=4, **TINY
    )
    summary = training.run(config, str(tmp_path / "run"), verbose=0)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] - 0.03, losses
    assert all(np.isfinite(losses))
    assert summary["precision"] == "float16"
    # The loss scale is logged per epoch; a scale that collapsed would mean every step
    # overflowed and nothing trained.
    scales = [h["loss_scale"] for h in summary["history"]]
    assert all(2.0**10 <= s <= 2.0**16 for s in scales), scales
    assert summary["knn_top1"] is not None


def test_an_overflowing_step_is_skipped_and_the_scale_halves():
    model = _compiled()
    lso = model.optimizer
    assert isinstance(lso, keras.optimizers.LossScaleOptimizer)
    assert model.backbone.layers[1].compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    _step(model, _views(seed=1))  # a normal step first, so that the momentum is not zero
    assert int(lso.iterations.numpy()) == 1
    weights, momentum = _state(model)
    assert max(np.abs(m).max() for m in momentum) > 0
    # A scale this large makes the gradients reaching the float16 layers overflow (the
    # loss times 2**100 is still finite in float32).
    lso.dynamic_scale.assign(2.0**100)
    logs = _step(model, _views(seed=2))
    after_w, after_m = _state(model)
    for a, b in zip(weights, after_w):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(momentum, after_m):
        np.testing.assert_array_equal(a, b)
    assert float(lso.dynamic_scale.numpy()) == 2.0**99
    assert logs["loss_scale"][-1] == 2.0**99
    # The skipped step still counts as a step (optim.LossScaleOptimizer): the schedule,
    # the augmentation seeds and --resume read the steps from it.
    assert int(lso.iterations.numpy()) == 2
    # With a sane scale, the next step updates the weights again.
    lso.dynamic_scale.assign(2.0**15)
    _step(model, _views(seed=3))
    assert max(np.abs(a - b).max() for a, b in zip(after_w, _state(model)[0])) > 0


def test_an_overflow_on_one_replica_skips_the_step_on_all(mirrored):
    # Keras's LossScaleOptimizer judges each replica's own gradients before they are
    # summed; without model._agree_on_overflow the first replica's verdict decides, and
    # an overflow on the second reaches the weights (measured: they became non-finite
    # and the scale stayed). Synchronised BatchNorm (what training builds with several
    # replicas) usually carries an overflow to every replica through its all-reduced
    # statistics; per-replica BatchNorm does not, so it is what this test uses.
    model = _compiled(strategy=mirrored, sync_bn=False)
    original = model.pair_loss

    def pair_loss(x1, x2):
        loss, z1 = original(x1, x2)
        second = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 1)
        return loss * tf.where(second, 2.0**100, 1.0), z1

    model.pair_loss = pair_loss
    before = [v.numpy() for v in model.trainable_variables]
    _step(model, _views(seed=4))
    after = [v.numpy() for v in model.trainable_variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**14
    model.pair_loss = original
    model.train_function = None  # traced with the patched pair_loss: trace again
    _step(model, _views(seed=5))  # and a step without overflow still trains
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    assert max(np.abs(a - v.numpy()).max() for a, v in zip(after, model.trainable_variables)) > 0


def test_export_of_a_float16_run_computes_in_float32(tmp_path):
    run = str(tmp_path / "f16")
    config = make_config("digits", precision="float16", batch_size=32, epochs=1, train_limit=64, knn_every=1, **TINY)
    training.run(config, run, verbose=0)
    config, model, source = export.load_run(run)
    assert model.backbone.layers[1].compute_dtype == "float16"
    path = export.export_saved_model(model, config, str(tmp_path / "m"), source=source)
    loaded = tf.saved_model.load(path)
    for name in ("serving_default", "serving_pixels"):
        assert loaded.signatures[name].structured_outputs["embedding"].dtype == tf.float32
    with open(os.path.join(path, export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["precision"] == "float16" and meta["serving_precision"] == "float32"

    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    served = loaded.signatures["serving_pixels"](images=tf.constant(images))["embedding"]
    assert served.dtype == tf.float32
    x = aug.eval_preprocess(images, 32)
    float32_model = build_simsiam(config.replace(precision="float32"))
    export._load_model_weights(float32_model, source)
    expected = float32_model.backbone(x, training=False).numpy()
    # Measured: at most 4.8e-7 (float32 round-off between the reloaded graph and the
    # in-process model, features up to 2.0; test_export.py allows 1e-5 for float32
    # runs). The float16 network's own features differ from them by up to 0.0013
    # (measured), so the bound tells a float32 graph from a float16 one.
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)
    in_float16 = tf.cast(model.backbone(x, training=False), tf.float32).numpy()
    assert np.abs(in_float16 - expected).max() > 1e-4


class _Device:
    def __init__(self, name):
        self.name, self.device_type = name, "GPU"


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ([(9, 0)], "bfloat16"),  # H100
        ([(8, 0), (8, 6)], "bfloat16"),  # A100 + RTX 30xx
        ([(7, 0)], "float16"),  # V100
        ([(7, 5), (7, 5)], "float16"),  # T4s
        ([(8, 0), (7, 5)], "float16"),  # the oldest decides
        ([(6, 1)], "float32"),  # P40: no float16 tensor cores
        ([(3, 7)], "float32"),  # K80
    ],
)
def test_auto_precision_on_gpus_follows_the_compute_capability(monkeypatch, capabilities, expected):
    gpus = [_Device(f"/physical_device:GPU:{i}") for i in range(len(capabilities))]
    details = {g.name: {"compute_capability": c} for g, c in zip(gpus, capabilities)}
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else real(kind))
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device.name])
    precision, reason = distribute.resolve_precision("auto", tf.distribute.get_strategy())
    assert precision == expected
    assert str(min(capabilities)) in reason
    # An explicit choice is kept whatever the hardware.
    assert distribute.resolve_precision("float16", tf.distribute.get_strategy()) == ("float16", "--precision float16")


def test_auto_precision_on_cpus(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert distribute.resolve_precision("auto", tf.distribute.get_strategy())[0] == "bfloat16"
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert distribute.resolve_precision("auto", tf.distribute.get_strategy())[0] == "bfloat16"
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"avx2", "avx512f", "f16c"})  # float16 conversions only
    assert distribute.resolve_precision("auto", tf.distribute.get_strategy())[0] == "float32"
